"""``tileattn bench demo``: the CPU check that the tiled algorithm is exact and its memory does not grow
with the sequence length the way standard attention's does.

At S = 1024 and 4096 (B = 1, H = 8, D = 64, fp32) it runs naive attention (materialized scores) and
tileattn's tiled path: the max error between them, their time per call (median of :data:`REPEATS`
interleaved repeats), and each one's peak extra memory, measured in a fresh process so that the growth of
its resident memory (``report.ResidentPeak``) measures that call's peak alone.
"""

from __future__ import annotations

import torch

from .report import (Interruptible, Progress, ResidentPeak, environment, flag_notes, in_fresh_process,
                     interleaved_timings, markdown_table, timing_cell, write_results)

IMPLEMENTATIONS = {"naive": "naive", "torch": "tileattn (tiled torch)"}  # backend -> label
REPEATS = 5


def _peak_mib_in_fresh_process(backend: str, shape, causal: bool) -> float:
    """In a fresh process: one call of ``backend`` on random inputs; its peak growth of resident memory."""
    from tileattn import attention

    q, k, v = (torch.randn(*shape) for _ in range(3))
    with ResidentPeak() as peak:
        attention(q, k, v, causal=causal, backend=backend)
    return peak.mib


def run(out_dir, *, seqlens=(1024, 4096), batch=1, heads=8, head_dim=64, causal=False, progress=None):
    from tileattn import attention

    env = environment()
    progress = progress or Progress(len(seqlens), "demo")
    rows = []
    with Interruptible() as run_state:  # Ctrl-C keeps what was measured
        for s in seqlens:
            shape = (batch, heads, s, head_dim)
            q, k, v = (torch.randn(*shape) for _ in range(3))
            calls = {b: lambda b=b: attention(q, k, v, causal=causal, backend=b) for b in IMPLEMENTATIONS}
            err = float((calls["torch"]() - calls["naive"]()).abs().max())
            timings = interleaved_timings(calls, REPEATS)
            peaks = {b: in_fresh_process(_peak_mib_in_fresh_process, b, shape, causal) for b in IMPLEMENTATIONS}
            for backend, label in IMPLEMENTATIONS.items():
                rows.append(dict(impl=label, seqlen=s, batch=batch, heads=heads, head_dim=head_dim, causal=causal,
                                 **timings[backend].scaled(1e-3).fields("seconds"), peak_extra_mib=peaks[backend],
                                 max_abs_err_vs_naive=err))
            progress.step(f"S={s}: max |tiled - naive| = {err:.2e}; peak extra memory naive "
                          f"{peaks['naive']:.0f} MiB, tiled {peaks['torch']:.0f} MiB")
    table = markdown_table(
        ["implementation", "S", "seconds per call", "peak extra MiB", "max abs err vs naive"],
        [[r["impl"], r["seqlen"], timing_cell(r["seconds"], r["seconds_q1"], r["seconds_q3"], r["noisy"]),
          r["peak_extra_mib"], r["max_abs_err_vs_naive"]] for r in rows])
    note = (f"CPU demo: B={batch}, H={heads}, D={head_dim}, fp32, causal={causal}. Peak extra memory: the peak "
            "growth of a fresh process's resident memory during one call.\n\n")
    return write_results(out_dir, "demo", env, rows, note + table + "\n" + flag_notes(rows, "tileattn bench demo", REPEATS),
                         run_state.interrupted)
