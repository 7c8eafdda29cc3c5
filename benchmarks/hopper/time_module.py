"""TFLOP/s of tileattn's prefill through the library (the Hopper plan from S = 2048 on) beside SDPA's cuDNN and
flash (FA2) kernels and the portable Triton kernel, on one GPU; a markdown and a JSON table into --out.

    PYTHONPATH=. python benchmarks/hopper/time_module.py --out DIR [--quick]

Shapes: B x S = 16k tokens, 32 heads, fp16 and bf16, head dims 64 and 128, causal or not, S in {512, 2048, 4096,
8192} (512 stays on the portable kernel: the "plan" column shows which plan the library built). FLOPs: 4 B H S^2 D,
half of it causal (Sq == Sk here, so SDPA's top-left causal equals tileattn's bottom-right). Each time is the
median of triton.testing.do_bench (CUDA events, L2 flushed between runs).
"""

import argparse
import datetime
import json
import os
import platform
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import tileattn
from tileattn.kernels import prefill

TOKENS, HEADS = 16384, 32
IMPLEMENTATIONS = ("tileattn", "cudnn", "flash", "portable")


def portable_plan(q, k, v, causal):
    """The plan the library builds with ``TILEATTN_HOPPER=0`` (the portable kernel), kept out of the plan cache."""
    previous = os.environ.get("TILEATTN_HOPPER")
    os.environ["TILEATTN_HOPPER"] = "0"
    prefill._plans.clear()
    try:
        return prefill.prefill_plan(q, k, v, window=(-1, 0) if causal else (-1, -1), scale=q.shape[-1] ** -0.5)
    finally:
        if previous is None:
            del os.environ["TILEATTN_HOPPER"]
        else:
            os.environ["TILEATTN_HOPPER"] = previous
        prefill._plans.clear()


def milliseconds(fn, rep):
    try:
        return do_bench(fn, warmup=10, rep=rep, return_mode="median")
    except RuntimeError as error:  # an SDPA backend that does not take this call
        print(f"    ({str(error).splitlines()[0][:100]})", file=sys.stderr)
        return float("nan")


def measure(dtype, d, causal, s, rep):
    b = TOKENS // s
    q, k, v = (torch.randn(b, HEADS, s, d, device="cuda", dtype=dtype) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    plan = prefill.prefill_plan(q, k, v, window=(-1, 0) if causal else (-1, -1), scale=d**-0.5)
    portable = portable_plan(q, k, v, causal)

    def with_backend(backend):
        def run():
            with sdpa_kernel([backend]):
                sdpa(q, k, v, is_causal=causal)
        return run

    calls = dict(tileattn=lambda: tileattn.attention(q, k, v, causal=causal, backend="triton"),
                 cudnn=with_backend(SDPBackend.CUDNN_ATTENTION), flash=with_backend(SDPBackend.FLASH_ATTENTION),
                 portable=lambda: portable.run(q, k, v))
    flops = 4 * b * HEADS * s * s * d / (2 if causal else 1)
    row = dict(dtype=str(dtype).removeprefix("torch."), head_dim=d, causal=causal, seqlen=s, batch=b, heads=HEADS,
               plan=type(plan).__name__)
    for name, fn in calls.items():
        row[name] = flops / milliseconds(fn, rep) / 1e9
    return row


def markdown(rows, header):
    lines = [header, "", "TFLOP/s (median of triton.testing.do_bench); B x S = 16k tokens, 32 heads.", "",
             "| dtype | D | causal | S | B | plan | " + " | ".join(IMPLEMENTATIONS) + " | tileattn / cuDNN |",
             "|---|---|---|---|---|---|" + "---|" * (len(IMPLEMENTATIONS) + 1)]
    for r in rows:
        ratio = r["tileattn"] / r["cudnn"] if r["cudnn"] == r["cudnn"] else float("nan")
        lines.append(f"| {r['dtype']} | {r['head_dim']} | {'yes' if r['causal'] else 'no'} | {r['seqlen']} | "
                     f"{r['batch']} | {r['plan']} | " + " | ".join(f"{r[n]:.0f}" for n in IMPLEMENTATIONS)
                     + f" | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="bf16 only, S in {512, 8192}")
    ap.add_argument("--rep", type=int, default=50, help="do_bench's rep (ms) per measurement")
    a = ap.parse_args()
    device = torch.cuda.get_device_name()
    env = dict(device=device, torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__,
               python=platform.python_version(), date=datetime.date.today().isoformat())
    dtypes = (torch.bfloat16,) if a.quick else (torch.bfloat16, torch.float16)
    lengths = (512, 8192) if a.quick else (512, 2048, 4096, 8192)
    rows = []
    print("dtype     D causal     S   B  plan         " + " ".join(f"{n:>9s}" for n in IMPLEMENTATIONS), flush=True)
    for dtype in dtypes:
        for d in (64, 128):
            for causal in (False, True):
                for s in lengths:
                    r = measure(dtype, d, causal, s, a.rep)
                    rows.append(r)
                    print(f"{r['dtype']:8s} {d:3d} {causal!s:>6s} {s:5d} {r['batch']:3d}  {r['plan']:12s} "
                          + " ".join(f"{r[n]:9.1f}" for n in IMPLEMENTATIONS), flush=True)
    os.makedirs(a.out, exist_ok=True)
    stem = os.path.join(a.out, f"hopper-module-{device.lower().replace(' ', '-')}-{env['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(environment=env, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows, f"# Hopper prefill module, {device} ({', '.join(f'{k} {v}' for k, v in env.items())})"))
    print(f"wrote {stem}.md / .json")


if __name__ == "__main__":
    main()
