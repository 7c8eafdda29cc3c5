"""Writing new tokens' K/V into a contiguous or paged cache: one launch for both tensors.

The same thing in PyTorch indexing (``tileattn.cache.write_kv``) takes several small kernels and ~35-60 us of
host time per call, as much as the attention that follows it in a decode step.
"""

import functools

import triton
import triton.language as tl

from .common import NOT_PAGED, cdiv, next_power_of_2
from .launch import Launcher


@triton.jit
def _append_kv_kernel(
    KNew, VNew, KCache, VCache, CacheSeqlens, BlockTable,
    stride_knb, stride_knh, stride_knm, stride_knd,
    stride_vnb, stride_vnh, stride_vnm, stride_vnd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bt, num_heads_kv, num_new, capacity, page_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PAGED: tl.constexpr,
):
    """New token ``t`` of sequence ``b`` goes to cache position ``cache_seqlens[b] + t``: row ``b`` of a contiguous
    cache, or page ``block_table[b, pos // page_size]``, slot ``pos % page_size``. Offsets are 64-bit. Positions
    past the capacity are not written (lengths the caller did not check never make us write outside the cache)."""
    off_b = (tl.program_id(1) // num_heads_kv).to(tl.int64)
    off_h = (tl.program_id(1) % num_heads_kv).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    pos = (tl.load(CacheSeqlens + off_b) + tokens).to(tl.int64)
    in_cache = (tokens < num_new) & (pos >= 0) & (pos < capacity)
    ok = in_cache[:, None] & (offs_d < HEAD_DIM)[None, :]
    if PAGED != NOT_PAGED:
        page = tl.load(BlockTable + off_b * stride_bt + pos // page_size, mask=in_cache, other=0).to(tl.int64)
        k_dst = page * stride_kb + (pos % page_size) * stride_kn
        v_dst = page * stride_vb + (pos % page_size) * stride_vn
    else:
        k_dst = off_b * stride_kb + pos * stride_kn
        v_dst = off_b * stride_vb + pos * stride_vn
    tokens = tokens.to(tl.int64)
    k = tl.load(KNew + off_b * stride_knb + off_h * stride_knh + tokens[:, None] * stride_knm
                + offs_d[None, :] * stride_knd, mask=ok)
    v = tl.load(VNew + off_b * stride_vnb + off_h * stride_vnh + tokens[:, None] * stride_vnm
                + offs_d[None, :] * stride_vnd, mask=ok)
    tl.store(KCache + off_h * stride_kh + k_dst[:, None] + offs_d[None, :] * stride_kd, k, mask=ok)
    tl.store(VCache + off_h * stride_vh + v_dst[:, None] + offs_d[None, :] * stride_vd, v, mask=ok)


_append = Launcher(_append_kv_kernel)


def append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None):
    """Write ``k_new``/``v_new`` ``[B, Hkv, Sq, D]`` at positions ``cache_seqlens[b] ..`` of each sequence of a
    contiguous ``[B, Hkv, S_max, D]`` or paged ``[num_pages, Hkv, page_size, D]`` cache (with ``block_table``).
    Same contract as :func:`tileattn.cache.write_kv`: bounds are the caller's to check."""
    b, hkv, num_new, d = k_new.shape
    paged = block_table is not None
    block_t, num_warps, constexprs = _plan(d, num_new, paged)
    _append((cdiv(num_new, block_t), b * hkv, 1),
            (k_new, v_new, k_cache, v_cache, cache_seqlens, block_table if paged else cache_seqlens),
            (*k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
             block_table.stride(0) if paged else 0, hkv, num_new,
             block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2], k_cache.shape[2] if paged else 1),
            (), constexprs, num_warps, 1)


@functools.lru_cache(maxsize=256)
def _plan(head_dim, num_new, paged):
    """``(tokens per program, num_warps, constexprs)``: up to 16 tokens of one sequence and head per program."""
    block_d = max(16, next_power_of_2(head_dim))
    block_t = max(1, min(16, next_power_of_2(num_new)))
    constexprs = _append.constexprs(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t,
                                    PAGED=1 if paged else NOT_PAGED.value)
    return block_t, 4 if block_d * block_t >= 2048 else 1, constexprs

