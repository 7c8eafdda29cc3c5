"""ALiBi slopes and attention sinks in the Triton kernels: their speed beside the plain call (issue 14's bar: no
more than 10% below it), prefill and decode, on a GPU.

Prefill: ``tileattn.attention(backend="triton")`` on ``[B, 32, S, D]`` bf16 (B x S = 16k tokens), TFLOP/s
(CUDA events, ``triton.testing.do_bench`` medians, interleaved round-robin). Decode:
``attention_with_kvcache(check_bounds=False)`` on one query token per sequence over a full cache, replayed from
CUDA graphs, TB/s of K/V read. Each option is checked against the float64 oracle before it is timed.

    python benchmarks/bias_speed.py [--out benchmarks/results] [--quick]
"""

from __future__ import annotations

import argparse
import functools

import torch

import tileattn
from tileattn.bench.decode import capture
from tileattn.bench.kernels import gpu_ms
from tileattn.bench.report import environment, interleaved_timings, markdown_table, timing_cell, write_results
from tileattn.reference import naive_attention

OPTIONS = ("plain", "alibi", "sinks", "alibi+sinks")
REPEATS = 5


def biases(option, heads, device):
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], device=device)  # ALiBi's geometric
    sinks = torch.randn(heads, device=device)
    return dict(alibi_slopes=slopes if "alibi" in option else None, sinks=sinks if "sinks" in option else None)


def check(out, q, k, v, causal, kwargs):
    """The kernel's output against the float64 oracle, within a bf16 bound (inputs are unit normal)."""
    expected = naive_attention(q.double(), k.double(), v.double(), causal=causal, **kwargs)
    err = (out.double() - expected).abs().max().item()
    if not err < 2e-2:
        raise AssertionError(f"error {err} against the oracle")


def prefill_rows(quick):
    rows = []
    shapes = [(128, 2048), (128, 8192), (64, 8192)] if quick else [(128, 512), (128, 2048), (128, 8192), (64, 2048),
                                                                    (64, 8192)]
    for d, s in shapes:
        for causal in (False, True):
            b = max(1, 16384 // s)
            q, k, v = (torch.randn(b, 32, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            calls = {}
            for option in OPTIONS:
                kwargs = biases(option, 32, "cuda")
                calls[option] = functools.partial(tileattn.attention, q, k, v, causal=causal, backend="triton", **kwargs)
                if s <= 2048:
                    small = [t[:1, :, :512] for t in (q, k, v)]
                    check(tileattn.attention(*small, causal=causal, backend="triton", **kwargs), *small, causal, kwargs)
            timings = interleaved_timings(calls, REPEATS, time_one=gpu_ms)
            flops = 4 * b * 32 * s * s * d / (2 if causal else 1)
            plain = timings["plain"].median
            for option, t in timings.items():
                rows.append(dict(kind="prefill", head_dim=d, causal=causal, seqlen=s, batch=b, option=option,
                                 **t.fields("ms"), tflops=flops / t.median / 1e9, vs_plain=plain / t.median))
            print(f"prefill D={d} causal={causal} S={s}: " + ", ".join(
                f"{r['option']} {r['tflops']:.0f}" for r in rows[-len(OPTIONS):]) + " TFLOP/s", flush=True)
    return rows


def decode_rows(quick):
    rows = []
    for b, length, hkv in ((1, 16384, 8), (16, 4096, 8)) if quick else ((1, 16384, 8), (16, 4096, 8), (64, 4096, 8),
                                                                       (16, 4096, 32)):
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, hkv, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        seqlens = torch.full((b,), length, dtype=torch.int32, device="cuda")
        graphs = {}
        for option in OPTIONS:
            kwargs = biases(option, 32, "cuda")
            call = functools.partial(tileattn.attention_with_kvcache, q, k, v, seqlens, check_bounds=False, **kwargs)
            small = (q[:1], k[:1, :, :1024], v[:1, :, :1024])
            got = tileattn.attention_with_kvcache(*small, seqlens[:1].clamp(max=1024), check_bounds=False,
                                                  backend="triton", **kwargs)
            check(got, *small, False, kwargs)
            graphs[option] = capture(call)
        timings = interleaved_timings({o: g.replay for o, g in graphs.items()}, REPEATS, time_one=gpu_ms)
        kv_bytes = 2 * k.numel() * k.element_size()
        plain = timings["plain"].median
        for option, t in timings.items():
            us = t.scaled(1e3)
            rows.append(dict(kind="decode", batch=b, seqlen=length, kv_heads=hkv, option=option, **us.fields("us"),
                             tb_per_s=kv_bytes / us.median / 1e6, vs_plain=plain / t.median))
        print(f"decode B={b} L={length} Hkv={hkv}: " + ", ".join(
            f"{r['option']} {r['tb_per_s']:.2f}" for r in rows[-len(OPTIONS):]) + " TB/s", flush=True)
    return rows


def summarize(rows):
    pre = [r for r in rows if r["kind"] == "prefill"]
    dec = [r for r in rows if r["kind"] == "decode"]
    return ("Prefill, bf16, 32 heads, B x S = 16k tokens, `backend=\"triton\"`, TFLOP/s (median of "
            f"{REPEATS} interleaved do_bench medians) and speed relative to the plain call:\n\n"
            + markdown_table(["head_dim", "causal", "S", "option", "ms", "TFLOP/s", "vs plain"],
                             [[r["head_dim"], r["causal"], r["seqlen"], r["option"],
                               timing_cell(r["ms"], r["ms_q1"], r["ms_q3"], r["noisy"]), r["tflops"], r["vs_plain"]]
                              for r in pre])
            + "\nDecode, one query token, 32 query heads, head_dim 128, bf16, CUDA-graph replays, TB/s of K/V:\n\n"
            + markdown_table(["batch", "keys", "kv heads", "option", "us", "TB/s", "vs plain"],
                             [[r["batch"], r["seqlen"], r["kv_heads"], r["option"],
                               timing_cell(r["us"], r["us_q1"], r["us_q3"], r["noisy"]), r["tb_per_s"], r["vs_plain"]]
                              for r in dec]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bias_speed.py times the Triton kernels on a GPU; no CUDA device here")
    rows = prefill_rows(args.quick) + decode_rows(args.quick)
    json_path, md_path = write_results(args.out, "bias-speed", environment(), rows, summarize(rows))
    print(md_path.read_text())


if __name__ == "__main__":
    main()
