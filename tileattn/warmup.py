"""Compile, before a model serves, the kernels its attention calls will launch: :func:`warmup`, ``tileattn warmup``.

The first call of each Triton kernel specialization compiles it. Triton keeps what it compiled in its on-disk cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``), so one warmup run on the serving GPU type (a container's build
step, a deploy script) spares every later process the compile. What a new process still pays on its first calls is
loading those binaries, and, where ``auto`` picks one of SDPA's kernels, that kernel's own first-call setup (cuDNN
builds its graph, kept in memory only): a server that calls :func:`warmup` at startup pays both before its first
request.

A specialization is the kernel (prefill, split-KV decode over a contiguous or a paged cache), its compile-time
switches, chosen from the call (tile sizes, head dims, causal, a mask, one key split or several), and Triton's
specialization of integer arguments (one equal to 1, or divisible by 16, compiles separately: cache lengths, split
counts). So the calls run here are those a Transformers model's attention makes, in the layout it passes
(``[B, S, H, D]`` projections viewed as ``[B, H, S, D]``; causal but for single-query steps, as the integration
passes them), for each batch size and prompt length given:

- the prefill, and over a padded batch's ``[B, Skv]`` mask too when ``B > 1``;
- every decode step up to ``max_new_tokens``, over a contiguous cache one key longer each step (Transformers'
  ``DynamicCache``): the split count the kernel picks grows with the cache, so each length is run;
- with ``paged_block_size``, a decode step through :func:`tileattn.attention_with_kvcache` over a paged cache whose
  block table holds the longest sequence, writing the new token in the same launch (the serving loop of
  :class:`tileattn.cache.PagedKVCache`; its launch depends on the table's width, not on the lengths).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from . import api


class WarmedCall(NamedTuple):
    """What :func:`warmup` ran for one call (a decode entry: every step of the sweep): its description, the backend
    it ran on (that of the last step), and its host-to-finish seconds the first time (compiles or loads from
    Triton's on-disk cache included) and run again, warm."""

    call: str
    backend: str
    first_s: float
    warm_s: float


def warmup(num_heads: int, num_kv_heads: int, head_dim: int, *, head_dim_v: int | None = None,
           dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cuda", batch_sizes=(1,),
           prompt_lengths=(512,), max_new_tokens: int = 256, paged_block_size: int | None = None,
           backend: str = "auto") -> list[WarmedCall]:
    """Run, twice, the attention calls a model of this shape makes at these batch sizes and prompt lengths, on
    random inputs (which calls: the module docstring); returns what each cost.

    Args:
        num_heads, num_kv_heads: query and K/V heads (``num_heads % num_kv_heads == 0``).
        head_dim, head_dim_v: q/k's and v's head dims (``head_dim_v`` defaults to ``head_dim``).
        dtype, device: the model's (float16, bfloat16 or float32; the Triton kernels compile on CUDA only).
        batch_sizes, prompt_lengths: non-empty sequences of positive ints.
        max_new_tokens: decode steps after each prompt (an int >= 0).
        paged_block_size: also warm decode over a paged cache of pages this many tokens long.
        backend: as in :func:`tileattn.attention` (the Transformers integration passes its ``register(backend=)``).
    Returns:
        One :class:`WarmedCall` per call, in the order run.
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
                        ("head_dim_v", head_dim_v)):
        if type(value) is not int or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    for name, values in (("batch_sizes", batch_sizes), ("prompt_lengths", prompt_lengths)):
        if not values or any(type(x) is not int or x < 1 for x in values):
            raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    if type(max_new_tokens) is not int or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if paged_block_size is not None and (type(paged_block_size) is not int or paged_block_size < 1):
        raise ValueError(f"paged_block_size must be a positive int or None, got {paged_block_size!r}")
    shapes = _Shapes(num_heads, num_kv_heads, head_dim, head_dim_v, dtype, torch.device(device))
    warmed = []
    with torch.no_grad():
        for batch in batch_sizes:
            for prompt in prompt_lengths:
                for label, steps in _calls(shapes, batch, prompt, max_new_tokens, paged_block_size):
                    warmed.append(_run_twice(label, steps, backend, shapes.device))
    return warmed


class _Shapes(NamedTuple):
    heads: int
    kv_heads: int
    d: int
    dv: int
    dtype: torch.dtype
    device: torch.device


def _calls(shapes, batch, prompt, max_new_tokens, page):
    """``(label, steps)`` for each call of one batch size and prompt length; ``steps``: ``(fn, inputs)`` pairs."""

    def projections(tokens, heads, dim):  # a [B, S, H, D] projection seen as [B, H, S, D], as Transformers does
        return torch.randn(batch, tokens, heads, dim, dtype=shapes.dtype, device=shapes.device).transpose(1, 2)

    at = f"B={batch} S={prompt}"
    q, k, v = (projections(prompt, shapes.heads, shapes.d), projections(prompt, shapes.kv_heads, shapes.d),
               projections(prompt, shapes.kv_heads, shapes.dv))
    yield f"prefill {at}", [(_attention_call, (q, k, v))]
    if batch > 1:  # a padded batch: the first row's first key is padding
        padding = torch.ones(batch, prompt, dtype=torch.bool, device=shapes.device)
        padding[0, 0] = False
        yield f"prefill {at}, padded batch", [(_attention_call, (q, k, v, padding[:, None, None, :]))]
    if max_new_tokens == 0:
        return
    longest = prompt + max_new_tokens
    step_q = projections(1, shapes.heads, shapes.d)
    # Each step's cache is a contiguous [B, Hkv, L, D] view of one buffer, as DynamicCache's concatenation gives.
    k_buffer, v_buffer = (torch.randn(batch * shapes.kv_heads * longest * dim, dtype=shapes.dtype, device=shapes.device)
                          for dim in (shapes.d, shapes.dv))
    steps = [(_attention_call, (step_q, k_buffer[:batch * shapes.kv_heads * length * shapes.d].view(
                 batch, shapes.kv_heads, length, shapes.d),
             v_buffer[:batch * shapes.kv_heads * length * shapes.dv].view(batch, shapes.kv_heads, length, shapes.dv)))
             for length in range(prompt + 1, longest + 1)]
    yield f"decode {at}, cache {prompt + 1}..{longest}", steps
    if page is not None:
        yield (f"paged decode {at}, pages of {page} (table for {longest})",
               [(_paged_decode_call, _paged_inputs(step_q, prompt, longest, page, shapes))])


def _attention_call(q, k, v, mask=None, *, backend):
    # causal as the Transformers integration passes it: a single query row sees every key either way
    return api.attention(q, k, v, causal=q.shape[2] > 1, mask=mask, backend=backend)


def _paged_decode_call(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, *, backend):
    return api.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new,
                                      block_table=block_table, backend=backend)


def _paged_inputs(q, held, longest, page, shapes):
    """A paged cache holding ``held`` tokens per sequence, its block table wide enough for ``longest`` (pages in
    the ``[pages, page, Hkv, D]`` storage serving engines use, seen as ``[pages, Hkv, page, D]``), and the step's
    new token, written at position ``held``."""
    batch, pages_per_seq = q.shape[0], -(-longest // page)
    k_pages, v_pages = (torch.randn(batch * pages_per_seq, page, shapes.kv_heads, dim, dtype=shapes.dtype,
                                    device=shapes.device).transpose(1, 2) for dim in (shapes.d, shapes.dv))
    block_table = torch.randperm(batch * pages_per_seq, device=shapes.device).to(torch.int32).view(batch, -1)
    cache_seqlens = torch.full((batch,), held, dtype=torch.int32, device=shapes.device)
    k_new, v_new = (torch.randn(batch, shapes.kv_heads, 1, dim, dtype=shapes.dtype, device=shapes.device)
                    for dim in (shapes.d, shapes.dv))
    return q, k_pages, v_pages, cache_seqlens, block_table, k_new, v_new


def _run_twice(label, steps, backend, device) -> WarmedCall:
    times = []
    for _ in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for fn, inputs in steps:
            fn(*inputs, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    fn, inputs = steps[-1]
    return WarmedCall(label, _backend_of(fn, inputs, backend), times[0], times[1])


def _backend_of(fn, inputs, backend) -> str:
    if fn is _paged_decode_call:
        q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new = inputs
        return api._prepare_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, True, None, None,
                                    None, False, 0, backend).backend
    q, k, v, *mask = inputs
    return api.explain(q, k, v, causal=q.shape[2] > 1, mask=mask[0] if mask else None, backend=backend).backend
