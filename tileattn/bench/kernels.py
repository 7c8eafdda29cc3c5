"""``tileattn bench kernels``: prefill throughput and peak extra memory on a GPU.

For each head dim, causal or not, and sequence length S (batch = tokens // S, so every point does
the same work per token), it times tileattn's Triton kernel, PyTorch SDPA's flash (FlashAttention-2)
and cuDNN backends (and memory-efficient), and naive attention, all in one process on the same inputs,
interleaved round-robin: each of :data:`REPEATS` repeats takes one ``triton.testing.do_bench`` median
(CUDA events) of every implementation in turn. FLOPs of one forward are ``4 * B * H * S * S * D``, halved when causal. Peak extra memory is what
the first call allocates on top of its inputs (its output included). tileattn's output is checked against
SDPA's before timing.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..reference import naive_attention
from .report import (Interruptible, Progress, environment, flag_notes, interleaved_timings, markdown_table,
                     rate_cell, write_results)

SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
IMPLS = ("tileattn", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "naive")
REPEATS = 5


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


def peak_mib(fn, *args) -> float | None:
    """Peak extra MiB of one ``fn(*args)`` call (also its warm-up); None if it runs out of memory."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        fn(*args)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def gpu_ms(fn) -> float:
    """One timing sample: the median ms of ``fn`` over ~20 ms of calls, CUDA events, L2 flushed between calls."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=20, return_mode="median")


def run(out_dir, *, head_dims=(64, 128), seqlens=SEQLENS, tokens=16384, heads=32, dtype=torch.bfloat16,
        causal_modes=(False, True), impls=IMPLS, progress=None):
    env = environment()
    fns = implementations()
    progress = progress or Progress(len(head_dims) * len(causal_modes) * len(seqlens), "kernels")
    rows = []
    with Interruptible() as run_state:  # Ctrl-C keeps what was measured
        for d in head_dims:
            for causal in causal_modes:
                for s in seqlens:
                    b = max(1, tokens // s)
                    q, k, v = (torch.randn(b, heads, s, d, device="cuda", dtype=dtype) for _ in range(3))
                    flops = 4 * b * heads * s * s * d / (2 if causal else 1)
                    reference = fns["sdpa_flash"](q, k, v, causal)
                    check = (fns["tileattn"](q, k, v, causal).float() - reference.float()).abs().max().item()
                    del reference
                    peaks = {name: peak_mib(fns[name], q, k, v, causal) for name in impls}
                    calls = {name: functools.partial(fns[name], q, k, v, causal)
                             for name in impls if peaks[name] is not None}
                    try:
                        timings = interleaved_timings(calls, REPEATS, time_one=gpu_ms, warmup=0)
                    except torch.cuda.OutOfMemoryError:  # do_bench's L2-flush buffer on top of naive's scores
                        torch.cuda.empty_cache()
                        timings = {}
                    for name in impls:
                        row = dict(impl=name, head_dim=d, causal=causal, seqlen=s, batch=b, heads=heads,
                                   dtype=str(dtype).removeprefix("torch."), ms=None, tflops=None,
                                   peak_extra_mib=peaks[name], flops=flops, max_abs_diff_tileattn_vs_sdpa_flash=check)
                        if name in timings:
                            row.update(timings[name].fields("ms"), tflops=flops / timings[name].median / 1e9)
                        rows.append(row)
                    progress.step(f"D={d} causal={causal} S={s} B={b}: " + ", ".join(
                        f"{r['impl']} " + ("OOM" if r["ms"] is None else f"{r['tflops']:.0f}"
                                           + (" (noisy)" if r["noisy"] else "")) for r in rows[-len(impls):])
                        + " TFLOP/s")
                    del q, k, v
    return write_results(out_dir, "kernels", env, rows, summarize(rows), run_state.interrupted)


def summarize(rows) -> str:
    """One table per (head dim, causal): TFLOP/s of each implementation (median and interquartile range),
    tileattn's ratios, memory."""
    def get(impl, d, causal, s):
        return next((r for r in rows if (r["impl"], r["head_dim"], r["causal"], r["seqlen"]) == (impl, d, causal, s)),
                    {})

    parts = []
    for d, causal in sorted({(r["head_dim"], r["causal"]) for r in rows}):
        table = []
        for s in sorted({r["seqlen"] for r in rows if r["head_dim"] == d and r["causal"] == causal}):
            at = {impl: get(impl, d, causal, s) for impl in IMPLS}
            tf = {impl: at[impl].get("tflops") for impl in IMPLS}

            def ratio(other):
                return None if not tf["tileattn"] or not tf[other] else tf["tileattn"] / tf[other]

            table.append([s, at["tileattn"].get("batch"),
                          *(rate_cell(at[i]["flops"] / 1e9, at[i]) if at[i] else None for i in IMPLS),
                          ratio("sdpa_flash"), ratio("sdpa_cudnn"), at["tileattn"].get("peak_extra_mib"),
                          at["sdpa_flash"].get("peak_extra_mib"), at["naive"].get("peak_extra_mib"),
                          at["tileattn"].get("max_abs_diff_tileattn_vs_sdpa_flash")])
        headers = ["S", "B", *(f"{i} TFLOP/s" for i in IMPLS), "tileattn / FA2", "tileattn / cuDNN",
                   "tileattn MiB", "FA2 MiB", "naive MiB", "max |tileattn - FA2|"]
        parts.append(f"## head_dim {d}, {'causal' if causal else 'non-causal'}\n\n" + markdown_table(headers, table))
    return "\n".join(parts) + "\n" + flag_notes(rows, "tileattn bench kernels", REPEATS)
