"""``tileattn bench longctx``: long contexts, where offsets pass 2^31 elements (GPU only).

- decode, one query token over a 1M-token cache (GQA 32/8 and MHA 32/32, head_dim 128, bf16): the MHA cache is
  [1, 32, 1M, 128] per tensor, 2^32 elements, so its token offsets need 64 bits (``INT64_INDEX``);
- prefill of 128k tokens (causal, 32 heads of 128, bf16).

Each beside SDPA's kernels where they run the shape; time (CUDA events, median with IQR over interleaved
repeats) and peak memory beyond the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import gpu_ms
from .report import (Interruptible, Progress, environment, flag_notes, interleaved_timings, markdown_table, rate_cell,
                     timing_cell, write_results)

REPEATS = 5


def _peak_extra_gib(fn) -> float | None:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        fn()
    except (RuntimeError, torch.cuda.OutOfMemoryError):
        return None
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _sdpa(backend, q, k, v, **options):
    from torch.nn.attention import sdpa_kernel

    def call():
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, **options)
    return call


def _usable(fn) -> bool:
    try:
        fn()
        torch.cuda.synchronize()
        return True
    except (RuntimeError, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return False


def run(out_dir, *, decode_keys=1 << 20, prefill_tokens=1 << 17, progress=None):
    import tileattn
    from torch.nn.attention import SDPBackend

    env = environment()
    progress = progress or Progress(3, "longctx")
    rows = []
    kernels = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    with Interruptible() as run_state:
        for hkv in (8, 32):
            k, v = (torch.randn(1, hkv, decode_keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
            impls = {"tileattn": lambda: tileattn.attention(q, k, v)}
            impls.update({name: _sdpa(b, q, k, v, enable_gqa=hkv != 32) for name, b in kernels.items()})
            impls = {name: fn for name, fn in impls.items() if _usable(fn)}
            timings = interleaved_timings(impls, REPEATS, time_one=gpu_ms)
            kv_bytes = 2 * k.numel() * k.element_size()
            for name, t in timings.items():
                rows.append(dict(kind="decode", impl=name, heads=f"32/{hkv}", tokens=decode_keys, work=kv_bytes / 1e9,
                                 **t.fields("ms"), peak_extra_gib=_peak_extra_gib(impls[name])))
            del k, v
            torch.cuda.empty_cache()
            progress.step(f"decode over {decode_keys} keys, 32/{hkv} heads")
        q, k, v = (torch.randn(1, 32, prefill_tokens, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        impls = {"tileattn": lambda: tileattn.attention(q, k, v, causal=True, backend="triton")}
        impls.update({name: _sdpa(b, q, k, v, is_causal=True) for name, b in kernels.items()})
        impls = {name: fn for name, fn in impls.items() if _usable(fn)}
        timings = interleaved_timings(impls, REPEATS, time_one=gpu_ms)
        flops = 4 * 32 * prefill_tokens**2 * 128 / 2
        for name, t in timings.items():
            rows.append(dict(kind="prefill", impl=name, heads="32/32", tokens=prefill_tokens, work=flops / 1e9,
                             **t.fields("ms"), peak_extra_gib=_peak_extra_gib(impls[name])))
        progress.step(f"causal prefill of {prefill_tokens} tokens")
    return write_results(out_dir, "longctx", env, rows, summarize(rows), interrupted=run_state.interrupted)


def summarize(rows) -> str:
    # work is GB (decode: K+V bytes read) or GFLOP (prefill), so work / ms is TB/s or TFLOP/s.
    table = [[r["kind"], r["heads"], r["tokens"], r["impl"], timing_cell(r["ms"], r["ms_q1"], r["ms_q3"], r["noisy"]),
              rate_cell(r["work"], r) + (" TB/s" if r["kind"] == "decode" else " TFLOP/s"), r["peak_extra_gib"]]
             for r in rows]
    return ("Long contexts, bf16, head_dim 128, batch 1: decode of one query token over the whole cache, causal "
            "prefill; ms median [IQR] over interleaved repeats (CUDA events); +GiB: peak memory beyond the inputs. "
            "An implementation missing from a row could not run the shape.\n\n"
            + markdown_table(["kind", "heads q/kv", "tokens", "implementation", "ms", "rate", "+GiB"], table)
            + "\n" + flag_notes(rows, "tileattn bench longctx", REPEATS))
