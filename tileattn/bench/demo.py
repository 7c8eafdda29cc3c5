"""``tileattn bench demo``: the CPU check that the tiled algorithm is exact and its memory does not grow
with the sequence length the way standard attention's does.

At S = 4096 (B = 1, H = 8, D = 64, fp32) it runs naive attention (materialized scores) and tileattn's
tiled path, each in a fresh process so that the OS's high-water mark of resident memory (``ru_maxrss``)
measures that call's peak alone, and prints the max error between them.
"""

from __future__ import annotations

import resource
import time

import torch

from .report import Progress, environment, in_fresh_process, markdown_table, write_results


def _resident_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def _run_one(impl: str, shape, seed: int, causal: bool):
    """In a fresh process: build inputs, run ``impl`` once; returns (output, seconds, peak extra MiB)."""
    from tileattn import attention

    torch.manual_seed(seed)
    q, k, v = (torch.randn(*shape) for _ in range(3))
    before = _resident_kib()
    start = time.perf_counter()
    out = attention(q, k, v, causal=causal, backend=impl)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return out.numpy(), seconds, max(0, peak_kib - before) / 1024  # numpy: pickled by value


def run(out_dir, *, seqlens=(1024, 4096), batch=1, heads=8, head_dim=64, causal=False, progress=None):
    env = environment()
    progress = progress or Progress(len(seqlens), "demo")
    rows = []
    for s in seqlens:
        shape = (batch, heads, s, head_dim)
        results = {impl: in_fresh_process(_run_one, impl, shape, s, causal) for impl in ("naive", "torch")}
        err = float(abs(results["torch"][0] - results["naive"][0]).max())
        for impl, (_, seconds, peak) in results.items():
            rows.append(dict(impl="naive" if impl == "naive" else "tileattn (tiled torch)", seqlen=s, batch=batch,
                             heads=heads, head_dim=head_dim, causal=causal, seconds=seconds,
                             peak_extra_mib=peak, max_abs_err_vs_naive=err))
        progress.step(f"S={s}: max |tiled - naive| = {err:.2e}; peak extra memory naive "
                 f"{results['naive'][2]:.0f} MiB, tiled {results['torch'][2]:.0f} MiB")
    table = markdown_table(
        ["implementation", "S", "seconds (one call)", "peak extra MiB", "max abs err vs naive"],
        [[r["impl"], r["seqlen"], r["seconds"], r["peak_extra_mib"], r["max_abs_err_vs_naive"]] for r in rows])
    note = (f"CPU demo: B={batch}, H={heads}, D={head_dim}, fp32, causal={causal}. Each call runs in a fresh "
            "process; peak extra memory is the growth of its resident-set high-water mark during the call.\n\n")
    return write_results(out_dir, "demo", env, rows, note + table)
