"""``tileattn bench overhead``: what a call costs the host, and what that does to small-batch generation.

Two tables:

- host microseconds per call of every entry point beside the PyTorch SDPA call that does the same work, with
  tiny GPU work (so the time between two synchronizations over many calls is the host's): prefill and
  decode-shaped ``attention``, with and without a padding mask, ``attention_with_kvcache`` (with and without
  new tokens, with and without its bounds check), ``PagedKVCache.attention``, ``attention_varlen`` and
  ``flash_attn_compat.flash_attn_with_kvcache``;
- Transformers ``generate()``: decode milliseconds per step for eager / sdpa / tileattn at batch 1 (prompts of
  512 and 4096 tokens) and batch 8 (1024) on a LLaMA-7B-shaped model (GQA 32/8, bf16, random weights), eager
  mode, and the same with a static cache, which Transformers compiles with CUDA graphs (how small-batch decode
  is run when speed matters).

Implementations are timed round-robin within each repeat (so a noisy moment hits all of them) and reported as
the median with the interquartile range. On CPU the first table uses small fp32 shapes (whole calls: PyTorch
computes there) and the generation rows a 2-layer model;
what needs CUDA is listed as skipped.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .report import (Interruptible, Progress, environment, flag_notes, interleaved_timings, markdown_table, timing_cell,
                     write_results)

CALLS_PER_REPEAT = 300
REPEATS = 11


def _host_us(fn, device, calls) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def wall_ms(fn, device) -> float:
    """Wall milliseconds of one call of ``fn``, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def host_cases(device):
    """``(case, {implementation: fn})``: the SDPA call first, then tileattn's entry points doing the same work."""
    import tileattn
    from tileattn import flash_attn_compat
    from tileattn.cache import PagedKVCache

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads, kv_heads, head_dim, cache_len = (32, 8, 128, 1024) if device.type == "cuda" else (8, 2, 64, 256)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    cases = []
    q, k, v = randn(1, heads, 16, head_dim), randn(1, heads, 16, head_dim), randn(1, heads, 16, head_dim)
    pad = torch.ones(1, 16, dtype=torch.bool, device=device)
    pad[:, :3] = False
    prefill = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
               "tileattn.attention (auto)": lambda: tileattn.attention(q, k, v, causal=True)}
    if device.type == "cuda":
        prefill["tileattn.attention (triton)"] = lambda: tileattn.attention(q, k, v, causal=True, backend="triton")
    cases.append(("prefill causal [1, H, 16, D]", prefill))
    causal_pad = torch.tril(torch.ones(16, 16, dtype=torch.bool, device=device)) & pad[:, None, None, :]
    cases.append(("prefill, padding mask [1, H, 16, D]", {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=causal_pad),
        "tileattn.attention": lambda: tileattn.attention(q, k, v, causal=True, mask=pad[:, None, None, :]),
    }))
    qd, kc, vc = randn(1, heads, 1, head_dim), randn(1, kv_heads, cache_len, head_dim), randn(1, kv_heads, cache_len, head_dim)
    key_pad = torch.ones(1, 1, 1, cache_len, dtype=torch.bool, device=device)
    key_pad[..., :5] = False
    cases.append((f"decode, GQA {heads}/{kv_heads}, {cache_len} keys", {
        "sdpa": lambda: F.scaled_dot_product_attention(qd, kc, vc, enable_gqa=True),
        "tileattn.attention": lambda: tileattn.attention(qd, kc, vc),
    }))
    cases.append((f"decode, GQA, padding mask, {cache_len} keys", {
        "sdpa": lambda: F.scaled_dot_product_attention(qd, kc, vc, attn_mask=key_pad, enable_gqa=True),
        "tileattn.attention": lambda: tileattn.attention(qd, kc, vc, mask=key_pad),
    }))
    k_cache, v_cache = randn(1, kv_heads, 2 * cache_len, head_dim), randn(1, kv_heads, 2 * cache_len, head_dim)
    lengths = torch.full((1,), cache_len, dtype=torch.int32, device=device)
    k_new, v_new = randn(1, kv_heads, 1, head_dim), randn(1, kv_heads, 1, head_dim)
    paged = PagedKVCache(num_pages=2 * cache_len // 64 + 2, page_size=64, kv_heads=kv_heads, head_dim=head_dim,
                         max_seqs=1, max_pages_per_seq=2 * cache_len // 64 + 2, dtype=dtype, device=device)
    seq = paged.add_sequence()
    paged.append(seq, randn(kv_heads, cache_len, head_dim), randn(kv_heads, cache_len, head_dim))

    def paged_step():  # one decode step that appends a token, then drop it again so the loop stays in bounds
        paged.attention([seq], qd, k_new=k_new, v_new=v_new)
        paged._lengths[seq] -= 1
        paged.seqlens[seq] -= 1

    q_bshd = qd.transpose(1, 2)
    k_bshd, v_bshd = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    new_bshd = k_new.transpose(1, 2), v_new.transpose(1, 2)
    cases.append((f"KV-cache decode, GQA, {cache_len} cached", {
        "sdpa": lambda: F.scaled_dot_product_attention(qd, kc, vc, enable_gqa=True),
        "attention_with_kvcache(check_bounds=False)": lambda: tileattn.attention_with_kvcache(
            qd, k_cache, v_cache, lengths, check_bounds=False),
        "  + k_new/v_new": lambda: tileattn.attention_with_kvcache(
            qd, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new, check_bounds=False),
        "  default check_bounds (a device sync)": lambda: tileattn.attention_with_kvcache(
            qd, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new),
        "flash_attn_compat.flash_attn_with_kvcache + k/v": lambda: flash_attn_compat.flash_attn_with_kvcache(
            q_bshd, k_bshd, v_bshd, *new_bshd, cache_seqlens=lengths, causal=True),
        "PagedKVCache.attention + k/v (pages of 64)": paged_step,
    }))
    packed = randn(48, heads, head_dim)
    cu = torch.tensor([0, 16, 32, 48], dtype=torch.int32, device=device)
    q3 = packed.view(3, 16, heads, head_dim).transpose(1, 2)
    cases.append(("varlen, 3 sequences of 16", {
        "sdpa": lambda: F.scaled_dot_product_attention(q3, q3, q3, is_causal=True),
        "attention_varlen": lambda: tileattn.attention_varlen(packed, packed, packed, cu, cu, 16, 16, causal=True),
    }))
    return cases


def measure_host(device, progress=None) -> list[dict]:
    rows = []
    for case, fns in host_cases(device):
        timings = interleaved_timings(fns, REPEATS, time_one=lambda fn: _host_us(fn, device, CALLS_PER_REPEAT))
        sdpa = timings["sdpa"].median
        for name, t in timings.items():
            rows.append(dict(kind="host", case=case, impl=name, **t.fields("us"), vs_sdpa=t.median / sdpa))
        if progress:
            progress.step(case)
    return rows


GENERATE_SHAPES = {"cuda": ((1, 512), (1, 4096), (8, 1024)), "cpu": ((1, 64),)}
NEW_TOKENS = 32
GENERATE_REPEATS = 5  # whole generate() calls are host-bound: 3 rounds were too few on a noisy host


def measure_generate(device, progress=None, caches=("dynamic", "static")) -> list[dict]:
    """Decode ms per step of ``generate()`` per implementation: (time of NEW_TOKENS + 1 tokens - time of 1 token)
    / NEW_TOKENS, so prefill is excluded; interleaved round-robin, median of GENERATE_REPEATS."""
    from . import e2e

    on_gpu = device.type == "cuda"
    spec = dict(e2e.MODELS["llama-7b" if on_gpu else "llama-tiny"])
    spec["shape"] = dict(spec["shape"], num_key_value_heads=spec["shape"]["num_attention_heads"] // 4)
    model = e2e.build_model(spec, device)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    rows = []
    runs = [(b, p, "dynamic") for b, p in GENERATE_SHAPES[device.type]] if "dynamic" in caches else []
    if on_gpu and "static" in caches:
        runs.append((1, 512, "static"))
    for batch, prompt, cache in runs:
        ids = torch.randint(3, spec["shape"]["vocab_size"], (batch, prompt), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)
        options = dict(do_sample=False, cache_implementation="static") if cache == "static" else dict(do_sample=False)

        def generate(tokens):
            with torch.no_grad():
                model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, **options)

        def step_ms(_):
            return (wall_ms(lambda: generate(NEW_TOKENS + 1), device) - wall_ms(lambda: generate(1), device)) / NEW_TOKENS

        def warm_up_both_lengths():  # a static cache is sized by the generated length: one compiled graph per size
            generate(NEW_TOKENS + 1)
            generate(1)

        warm_up = {impl: warm_up_both_lengths for impl in ("eager", "sdpa", "tileattn")}
        try:
            timings = interleaved_timings(warm_up, GENERATE_REPEATS, time_one=step_ms,
                                          before=lambda impl: e2e.use(model, impl))
        except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:  # e.g. a compile failure: keep the other rows
            if on_gpu:
                torch.cuda.empty_cache()
            if progress:
                progress.note(f"generate B={batch} prompt={prompt} {cache} cache failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
            timings = {}
        for impl, t in timings.items():
            rows.append(dict(kind="generate", batch=batch, prompt=prompt, cache=cache, impl=impl,
                             **t.fields("ms_per_step"), tokens_per_s=batch * 1e3 / t.median))
        if progress:
            progress.step(f"generate B={batch} prompt={prompt} {cache} cache")
    if on_gpu and "dynamic" in caches:  # the short prefill, where a call's host time shows in a whole forward
        ids = torch.randint(3, spec["shape"]["vocab_size"], (1, 512), generator=torch.Generator().manual_seed(0))
        ids = ids.to(device)

        def forward():
            with torch.no_grad():
                model(input_ids=ids, use_cache=False)

        timings = interleaved_timings({impl: forward for impl in ("eager", "sdpa", "tileattn")}, 9,
                                      time_one=lambda fn: wall_ms(fn, device), before=lambda impl: e2e.use(model, impl))
        for impl, t in timings.items():
            rows.append(dict(kind="prefill", batch=1, prompt=512, impl=impl, **t.fields("ms")))
    return rows


def summarize(rows, device) -> str:
    host = [r for r in rows if r["kind"] == "host"]
    parts = [f"Host time per call (us over {CALLS_PER_REPEAT} calls between two synchronizations, tiny GPU work); "
             "ratio of medians to the SDPA call of the same case:\n\n"
             + markdown_table(["case", "implementation", "us/call", "vs sdpa"],
                              [[r["case"], r["impl"], timing_cell(r["us"], r["us_q1"], r["us_q3"], r["noisy"]),
                                r["vs_sdpa"]] for r in host]) + "\n" + flag_notes(host, "tileattn bench overhead", REPEATS)]
    gen = [r for r in rows if r["kind"] == "generate"]
    if gen:
        parts.append(f"Transformers generate(), decode ms per step ({NEW_TOKENS} steps, prefill excluded; median of "
                     f"{GENERATE_REPEATS}), "
                     "GQA 32/8 LLaMA shape, random weights; static: a static cache, which Transformers compiles "
                     "(CUDA graphs):\n\n"
                     + markdown_table(["batch", "prompt", "cache", "implementation", "ms/step", "tokens/s"],
                                      [[r["batch"], r["prompt"], r["cache"], r["impl"],
                                        timing_cell(r["ms_per_step"], r["ms_per_step_q1"], r["ms_per_step_q3"],
                                                    r["noisy"]), r["tokens_per_s"]] for r in gen])
                     + "\n" + flag_notes(gen, "tileattn bench overhead", GENERATE_REPEATS))
    prefill = [r for r in rows if r["kind"] == "prefill"]
    if prefill:
        sdpa = next(r["ms"] for r in prefill if r["impl"] == "sdpa")
        parts.append("The same model's prefill of 512 tokens at batch 1 (no cache; median of 9):\n\n"
                     + markdown_table(["implementation", "ms", "speedup vs sdpa"],
                                      [[r["impl"], timing_cell(r["ms"], r["ms_q1"], r["ms_q3"], r["noisy"]),
                                        sdpa / r["ms"]] for r in prefill]))
    if device.type != "cuda":
        parts.append("On CPU the first table times whole calls (PyTorch computes there; no launch to hide). Skipped "
                     "without CUDA: the LLaMA-7B generate() and prefill rows and the static-cache (CUDA graph) rows.")
    return "\n".join(parts)


def run(out_dir, progress=None, generate=True):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment()
    progress = progress or Progress(6 + (len(GENERATE_SHAPES[device.type]) + (device.type == "cuda")) * generate,
                                    "overhead")
    rows = []
    with Interruptible() as run_state:  # Ctrl-C keeps what was measured
        rows += measure_host(device, progress)
        if generate:
            rows += measure_generate(device, progress)
    return write_results(out_dir, "overhead", env, rows, summarize(rows, device), interrupted=run_state.interrupted)
