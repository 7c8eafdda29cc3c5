"""``tileattn bench kernels``: prefill throughput and peak extra memory on a GPU, forward and backward.

For each pass (forward, backward, forward + backward), head dim, causal or not, and sequence length S (batch =
tokens // S, so every point does the same work per token), it times tileattn's Triton kernels, PyTorch SDPA's flash
(FlashAttention-2) and cuDNN backends (and memory-efficient), and naive attention (forward only: its backward
stores the S x S matrix twice), all in one process on the same inputs, interleaved round-robin: each of
:data:`REPEATS` repeats takes one ``triton.testing.do_bench`` median (CUDA events) of every implementation in turn.
FLOPs of one forward are ``4 * B * H * S * S * D``, halved when causal; a backward counts 2.5x that (five matrix
products of the forward's size against two, flash-attn's convention), forward + backward 3.5x. The backward pass
times ``torch.autograd.grad`` of a retained forward graph. Peak extra memory is what the first call allocates on top
of its inputs (its outputs included). tileattn's output (or its gradients) is checked against SDPA's before timing.
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
PASSES = ("forward", "backward", "forward+backward")
FLOPS_PER_FORWARD = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}
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


def pass_call(fn, q, k, v, causal, grad_out, which):
    """A callable running ``which`` pass of ``fn``: its forward, the backward of one retained forward graph
    (``torch.autograd.grad``), or both; and the forward's output (for the backward, its gradients) to check."""
    if which == "forward":
        return functools.partial(fn, q, k, v, causal), fn(q, k, v, causal)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if which == "backward":
        out = fn(q, k, v, causal)
        call = functools.partial(torch.autograd.grad, out, (q, k, v), grad_out, retain_graph=True)
    else:
        def call():
            return torch.autograd.grad(fn(q, k, v, causal), (q, k, v), grad_out)
    return call, torch.cat([g.flatten() for g in call()])


def run(out_dir, *, head_dims=(64, 128), seqlens=SEQLENS, tokens=16384, heads=32, dtype=torch.bfloat16,
        causal_modes=(False, True), impls=IMPLS, passes=PASSES, progress=None):
    env = environment()
    fns = implementations()
    progress = progress or Progress(len(passes) * len(head_dims) * len(causal_modes) * len(seqlens), "kernels")
    rows = []
    with Interruptible() as run_state:  # Ctrl-C keeps what was measured
        for which in passes:
            names = [name for name in impls if which == "forward" or name != "naive"]
            for d in head_dims:
                for causal in causal_modes:
                    for s in seqlens:
                        rows += _measure(fns, names, which, d, causal, s, max(1, tokens // s), heads, dtype)
                        progress.step(f"{which} D={d} causal={causal} S={s}: " + ", ".join(
                            f"{r['impl']} " + ("OOM" if r["ms"] is None else f"{r['tflops']:.0f}"
                                               + (" (noisy)" if r["noisy"] else "")) for r in rows[-len(names):])
                            + " TFLOP/s")
    return write_results(out_dir, "kernels", env, rows, summarize(rows), run_state.interrupted)


def _measure(fns, names, which, d, causal, s, b, heads, dtype):
    """The rows of one (pass, head dim, causal, S) point: every implementation in ``names``, timed round-robin."""
    q, k, v, grad_out = (torch.randn(b, heads, s, d, device="cuda", dtype=dtype) for _ in range(4))
    flops = FLOPS_PER_FORWARD[which] * 4 * b * heads * s * s * d / (2 if causal else 1)
    calls, peaks, check, reference = {}, {}, None, None
    for name in sorted(names, key=lambda n: n != "sdpa_flash"):  # SDPA's flash first: the reference for the check
        try:
            call, result = pass_call(fns[name], q, k, v, causal, grad_out, which)
        except RuntimeError as exc:  # out of memory, or an SDPA backend without this pass on this GPU
            if name == "tileattn" and not isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            torch.cuda.empty_cache()
            peaks[name] = None
            continue
        if name == "sdpa_flash":
            reference = result
        elif name == "tileattn" and reference is not None:
            check = (result.float() - reference.float()).abs().max().item()
        del result
        peaks[name] = peak_mib(call)
        if peaks[name] is not None:
            calls[name] = call
    del reference
    try:
        timings = interleaved_timings(calls, REPEATS, time_one=gpu_ms, warmup=0)
    except torch.cuda.OutOfMemoryError:  # do_bench's L2-flush buffer on top of naive's scores
        torch.cuda.empty_cache()
        timings = {}
    rows = []
    for name in names:
        row = dict(impl=name, **{"pass": which}, head_dim=d, causal=causal, seqlen=s, batch=b, heads=heads,
                   dtype=str(dtype).removeprefix("torch."), ms=None, tflops=None, noisy=False,
                   peak_extra_mib=peaks.get(name), flops=flops, max_abs_diff_tileattn_vs_sdpa_flash=check)
        if name in timings:
            row.update(timings[name].fields("ms"), tflops=flops / timings[name].median / 1e9)
        rows.append(row)
    return rows


def summarize(rows) -> str:
    """One table per (pass, head dim, causal): TFLOP/s of each implementation (median and interquartile range),
    tileattn's ratios, memory."""
    def get(which, impl, d, causal, s):
        return next((r for r in rows if (r.get("pass", "forward"), r["impl"], r["head_dim"], r["causal"],
                                         r["seqlen"]) == (which, impl, d, causal, s)), {})

    parts = []
    groups = dict.fromkeys((r.get("pass", "forward"), r["head_dim"], r["causal"]) for r in rows)
    for which, d, causal in sorted(groups, key=lambda g: (PASSES.index(g[0]), g[1], g[2])):
        impls = [i for i in IMPLS if any(get(which, i, d, causal, r["seqlen"]) for r in rows)]
        naive = "naive" in impls
        table = []
        for s in sorted({r["seqlen"] for r in rows if (r.get("pass", "forward"), r["head_dim"], r["causal"])
                         == (which, d, causal)}):
            at = {impl: get(which, impl, d, causal, s) for impl in impls}
            tf = {impl: at[impl].get("tflops") for impl in impls}

            def ratio(other):
                return None if not tf.get("tileattn") or not tf.get(other) else tf["tileattn"] / tf[other]

            at.setdefault("tileattn", {})
            at.setdefault("sdpa_flash", {})
            table.append([s, at["tileattn"].get("batch"),
                          *(rate_cell(at[i]["flops"] / 1e9, at[i]) if at[i] else None for i in impls),
                          ratio("sdpa_flash"), ratio("sdpa_cudnn"), at["tileattn"].get("peak_extra_mib"),
                          at["sdpa_flash"].get("peak_extra_mib"), *([at["naive"].get("peak_extra_mib")] if naive else []),
                          at["tileattn"].get("max_abs_diff_tileattn_vs_sdpa_flash")])
        headers = ["S", "B", *(f"{i} TFLOP/s" for i in impls), "tileattn / FA2", "tileattn / cuDNN",
                   "tileattn MiB", "FA2 MiB", *(["naive MiB"] if naive else []),
                   "max |tileattn - FA2|" + ("" if which == "forward" else " (gradients)")]
        parts.append(f"## {which}, head_dim {d}, {'causal' if causal else 'non-causal'}\n\n"
                     + markdown_table(headers, table))
    return "\n".join(parts) + "\n" + flag_notes(rows, "tileattn bench kernels", REPEATS)
