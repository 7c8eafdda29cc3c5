"""``tileattn bench kernels``: prefill throughput and peak extra memory on a GPU.

For each head dim, causal or not, and sequence length S (batch = tokens // S, so every point does
the same work per token), it times tileattn's Triton kernel, PyTorch SDPA's flash (FlashAttention-2)
and cuDNN backends (and memory-efficient), and naive attention, all in one process on the same inputs. FLOPs of one forward
are ``4 * B * H * S * S * D``, halved when causal. Peak extra memory is what the call allocates on top
of its inputs (its output included). tileattn's output is checked against SDPA's before timing.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..reference import naive_attention
from .report import Progress, environment, markdown_table, write_results

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
IMPLS = ("tileattn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "naive")


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def implementations():
    import tileattn

    return {
        "tileattn": lambda q, k, v, causal: tileattn.attention(q, k, v, causal=causal, backend="triton"),
        "sdpa_flash": _sdpa("FLASH_ATTENTION"),
        "sdpa_cudnn": _sdpa("CUDNN_ATTENTION"),
        "sdpa_efficient": _sdpa("EFFICIENT_ATTENTION"),
        "naive": lambda q, k, v, causal: naive_attention(q, k, v, causal=causal),
    }


def measure(fn, *args):
    """(median milliseconds, peak extra MiB) of ``fn(*args)``; None, None if it runs out of memory."""
    from triton.testing import do_bench

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        fn(*args)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median")
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None
    return ms, peak


def run(out_dir, *, head_dims=(64, 128), seqlens=SEQLENS, tokens=16384, heads=32, dtype=torch.bfloat16,
        causal_modes=(False, True), impls=IMPLS, progress=None):
    env = environment()
    fns = implementations()
    progress = progress or Progress(len(head_dims) * len(causal_modes) * len(seqlens) * len(impls), "kernels")
    rows = []
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C keeps what was measured
        for d in head_dims:
            for causal in causal_modes:
                for s in seqlens:
                    b = max(1, tokens // s)
                    q, k, v = (torch.randn(b, heads, s, d, device="cuda", dtype=dtype) for _ in range(3))
                    flops = 4 * b * heads * s * s * d / (2 if causal else 1)
                    reference = fns["sdpa_flash"](q, k, v, causal)
                    check = (fns["tileattn"](q, k, v, causal).float() - reference.float()).abs().max().item()
                    del reference
                    for name in impls:
                        ms, peak = measure(fns[name], q, k, v, causal)
                        row = dict(impl=name, head_dim=d, causal=causal, seqlen=s, batch=b, heads=heads,
                                   dtype=str(dtype).removeprefix("torch."), ms=ms, peak_extra_mib=peak,
                                   tflops=None if ms is None else flops / ms / 1e9,
                                   max_abs_diff_tileattn_vs_sdpa_flash=check)
                        rows.append(row)
                        progress.step(f"D={d} causal={causal} S={s} B={b} {name:>10}: "
                                 + ("OOM" if ms is None else f"{row['tflops']:.0f} TFLOP/s, {peak:.0f} MiB"))
                    del q, k, v
    return write_results(out_dir, "kernels", env, rows, summarize(rows))


def summarize(rows) -> str:
    """One table per (head dim, causal): TFLOP/s of each implementation, tileattn's ratios, memory."""
    def get(impl, d, causal, s, key):
        for r in rows:
            if (r["impl"], r["head_dim"], r["causal"], r["seqlen"]) == (impl, d, causal, s):
                return r[key]
        return None

    parts = []
    for d, causal in sorted({(r["head_dim"], r["causal"]) for r in rows}):
        table = []
        for s in sorted({r["seqlen"] for r in rows if r["head_dim"] == d and r["causal"] == causal}):
            tf = {impl: get(impl, d, causal, s, "tflops") for impl in IMPLS}
            mem = {impl: get(impl, d, causal, s, "peak_extra_mib") for impl in IMPLS}

            def ratio(other):
                return None if not tf["tileattn"] or not tf[other] else tf["tileattn"] / tf[other]

            table.append([s, get("tileattn", d, causal, s, "batch"), *(tf[i] for i in IMPLS),
                          ratio("sdpa_flash"), ratio("sdpa_cudnn"), mem["tileattn"], mem["sdpa_flash"], mem["naive"],
                          get("tileattn", d, causal, s, "max_abs_diff_tileattn_vs_sdpa_flash")])
        headers = ["S", "B", *(f"{i} TFLOP/s" for i in IMPLS), "tileattn / FA2", "tileattn / cuDNN",
                   "tileattn MiB", "FA2 MiB", "naive MiB", "max |tileattn - FA2|"]
        parts.append(f"## head_dim {d}, {'causal' if causal else 'non-causal'}\n\n" + markdown_table(headers, table))
    return "\n".join(parts)
