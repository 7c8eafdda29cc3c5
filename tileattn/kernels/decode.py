"""Split-KV ("flash-decoding") attention over a KV cache, contiguous or paged, and its launcher.

Decoding reads the whole cache for a handful of query tokens: it is memory-bound, and one program
per (sequence, head) leaves most SMs idle when the batch is small. So:

* one program serves all ``G = Hq / Hkv`` query heads that read a KV head (times the ``Sq`` query
  tokens): its ``G * Sq`` rows share every K/V tile, and each K/V byte is read from memory once;
* each sequence's keys are cut into ``num_splits`` contiguous ranges, one program each, so even
  one sequence fills the GPU. Each split writes a normalized partial output and its LSE, and
  ``_combine_kernel`` merges them: ``out = sum_s exp(lse_s - lse) * out_s``, ``lse = logsumexp_s lse_s``.

With ``num_splits == 1`` the split kernel writes the final output directly.
"""

import functools

import torch
import triton
import triton.language as tl

from .common import (
    MASK_NONE, NOT_PAGED, PAGED_PER_KEY, PAGED_PER_TILE, attend_keys, finalize, key_block_ranges, load_tile,
    cdiv, mask_arguments, next_power_of_2,
)


@triton.jit
def _decode_split_kernel(
    Q, K, V, Out, Lse, BlockTable, CacheSeqlens, Mask,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_os, stride_od,
    stride_lb, stride_lh, stride_lm, stride_ls,
    stride_bt,
    stride_mb, stride_mh, stride_mm, stride_mn,
    num_heads_kv, group_size, seqlen_q, new_tokens, keys_per_split, page_size,
    sm_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, HAS_SEQLENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    off_b = (tl.program_id(1) // num_heads_kv).to(tl.int64)
    off_hkv = (tl.program_id(1) % num_heads_kv).to(tl.int64)
    seqlen_k = new_tokens  # without cache lengths (a plain attention call) every sequence has new_tokens keys
    if HAS_SEQLENS:
        seqlen_k += tl.load(CacheSeqlens + off_b)

    # Row r of this program is query token r % Sq of query head hkv * G + r // Sq.
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_pos = rows % seqlen_q
    heads = off_hkv * group_size + rows // seqlen_q
    row_ok = rows < group_size * seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = (Q + off_b * stride_qb + heads[:, None] * stride_qh + q_pos[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    q = load_tile(q_ptrs, rows[:, None], offs_d[None, :], group_size * seqlen_q, HEAD_DIM, BLOCK_D, True)

    if PAGED != NOT_PAGED:  # key j is in page block_table[b, j // page_size], slot j % page_size
        k_base = K + off_hkv * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + off_hkv * stride_vh + offs_d[None, :] * stride_vd
    else:
        k_base = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + off_b * stride_vb + off_hkv * stride_vh + offs_d[None, :] * stride_vd
    block_table = BlockTable + off_b * stride_bt
    mask_base = Mask
    if MASK_KIND != MASK_NONE:
        mask_base = Mask + off_b * stride_mb
        if not MASK_PER_KEY:  # rows past the last head (never stored) read head 0's mask, inside the tensor
            mask_heads = tl.where(row_ok, heads, 0)
            mask_base = mask_base + mask_heads[:, None] * stride_mh + q_pos[:, None] * stride_mm

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The window's key ranges for all query tokens, clipped to this split's keys.
    diag = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = key_block_ranges(
        0, seqlen_q - 1, seqlen_k, diag, window_left, window_right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    split_lo = split * keys_per_split
    split_hi = split_lo + keys_per_split
    hi = tl.minimum(hi, split_hi)
    lo = tl.minimum(tl.maximum(lo, split_lo), hi)
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.minimum(tl.maximum(full_hi, full_lo), hi)
    acc, m_i, l_i = attend_keys(
        acc, m_i, l_i, q, k_base, v_base, mask_base, block_table, lo, full_lo, full_hi, hi, q_pos, offs_n, offs_d,
        stride_kn, stride_vn, stride_mn, stride_kb, stride_vb, page_size,
        seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
        HEAD_DIM, BLOCK_D, BLOCK_N, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_PER_KEY, HAS_SOFTCAP, PAGED, DOT_PRECISION)

    out, lse = finalize(acc, m_i, l_i)
    o_ptrs = (Out + off_b * stride_ob + heads[:, None] * stride_oh + q_pos[:, None] * stride_om
              + split * stride_os + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(Lse + off_b * stride_lb + heads * stride_lh + q_pos * stride_lm + split * stride_ls, lse, mask=row_ok)


@triton.jit
def _combine_kernel(
    PartOut, PartLse, Out, Lse,
    stride_pb, stride_ph, stride_pm, stride_ps, stride_pd,
    stride_plb, stride_plh, stride_plm, stride_pls,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    num_heads, seqlen_q, num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, RETURN_LSE: tl.constexpr,
):
    """One program per (batch, head, query token): merge the splits' partial outputs by their LSE."""
    pid = tl.program_id(0)
    off_b = (pid // (num_heads * seqlen_q)).to(tl.int64)
    off_h = (pid // seqlen_q) % num_heads
    off_m = pid % seqlen_q
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    split_ok = splits < num_splits
    lse_s = tl.load(PartLse + off_b * stride_plb + off_h * stride_plh + off_m * stride_plm + splits * stride_pls,
                    mask=split_ok, other=float("-inf"))
    lse_max = tl.max(lse_s, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # no split saw a key: weights all 0
    weights = tl.exp(lse_s - lse_max)
    total = tl.sum(weights, 0)
    part = tl.load(PartOut + off_b * stride_pb + off_h * stride_ph + off_m * stride_pm
                   + splits[:, None] * stride_ps + offs_d[None, :] * stride_pd,
                   mask=split_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(part * weights[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + off_b * stride_ob + off_h * stride_oh + off_m * stride_om + offs_d * stride_od,
             out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if RETURN_LSE:
        lse = tl.where(total > 0, lse_max + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + off_m * stride_lm, lse)


# (block_n, num_warps, num_stages): from the decode sweeps on an H100 (benchmarks/sweep_decode.py,
# benchmarks/NOTES.md): the most robust tile over contiguous and paged caches with automatic splits, and
# a half-size tile for grids that need splitting to fill the GPU: its ~96 KB of K/V stages let two
# programs share an SM, so short split programs overlap each other's pipeline fill.
_DECODE_CONFIG = (128, 4, 3)
_SMALL_GRID_CONFIG = (64, 4, 3)
_SMALL_GRID_SMALL_PAGES_CONFIG = (128, 4, 2)  # the paged sweep's best for 16-token pages at B = 1
_INTERPRETER_CONFIG = (32, 4, 1)
MAX_SPLITS = 64


def choose_config(batch: int, kv_heads: int, row_blocks: int, sm_count: int, page_size: int = 0):
    """The tile: the half-size one when the grid has fewer programs than SMs before splitting, for contiguous
    caches and pages that hold whole half tiles (``page_size`` 0 = contiguous). With smaller pages the half
    tile gathers keys one by one and measured slower than the full tile, best with two stages (NOTES.md,
    decode v5 and v7)."""
    if batch * kv_heads * row_blocks >= sm_count:
        return _DECODE_CONFIG
    return _SMALL_GRID_CONFIG if page_size % _SMALL_GRID_CONFIG[0] == 0 else _SMALL_GRID_SMALL_PAGES_CONFIG


def fit_config(config, block_m: int, block_d: int, elem_size: int, masked: bool, budget: int):
    """Adapt the tile to the call. Masked tiles of 32 rows or more take 64-key blocks: at 32 x 128 and beyond the
    masked score tile spills registers (2-5x slower; NOTES.md, decode route). Then halve the key block, down to
    16, until the K/V pipeline stages, the Q tile and (with a mask) the fp32 score tile Triton stages through
    shared memory fit ``budget`` bytes, and only then drop stages. The tuned tiles fit as they are up to D = 128
    in 2-byte types on Hopper; D = 256 and fp32 need this (Triton rejects the launch otherwise)."""
    block_n, num_warps, num_stages = config
    if masked and block_m >= 32:
        block_n = min(block_n, 64)

    def needed():
        return (2 * block_n * num_stages + block_m) * block_d * elem_size + (block_m * block_n * 4 if masked else 0)

    while block_n > 16 and needed() > budget:
        block_n //= 2
    while num_stages > 1 and needed() > budget:
        num_stages -= 1
    return block_n, num_warps, num_stages


def choose_num_splits(batch: int, kv_heads: int, row_blocks: int, max_keys: int, sm_count: int,
                      block_n: int, paged: bool) -> int:
    """Key splits per sequence, from the split sweeps on an H100 (benchmarks/NOTES.md): a contiguous cache
    streams best from few long programs (about one per two SMs with the full tile, one per SM with the
    half tile, of which two fit an SM; no split once there are that many sequences x KV heads); a paged
    cache, whose tile addresses wait on a block-table load, wants about two programs per SM and at least
    two splits to hide that latency. Rounded down, never up: a grid just past the target runs a nearly
    empty extra wave. Never fewer than 4 key blocks per split."""
    programs = batch * kv_heads * row_blocks
    if paged:
        target, least = 2 * sm_count, 2
    else:
        target, least = (sm_count if block_n <= _SMALL_GRID_CONFIG[0] else max(1, sm_count // 2)), 1
    most = max(1, max_keys // (4 * block_n))
    return max(1, min(max(target // programs, least), most, MAX_SPLITS))


@functools.cache
def _shared_memory_bytes(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def decode_attention(
    q, k_cache, v_cache, cache_seqlens, *, new_tokens, block_table=None, window=(-1, -1), scale, softcap=None,
    mask=None, return_lse=False, num_splits=0, config=None,
):
    """Attention of ``q`` over each sequence's first ``cache_seqlens[b] + new_tokens`` cached keys.

    Inputs are already validated (see :func:`tileattn.attention_with_kvcache`).
    Args:
        q: ``[B, Hq, Sq, D]``, any strides.
        k_cache, v_cache: contiguous ``[B, Hkv, S_max, D]`` or, with ``block_table`` ``[B, max_pages]`` int32,
            paged ``[num_pages, Hkv, page_size, D]``; any strides.
        cache_seqlens: int32 ``[B]``; new_tokens: tokens appended to the cache for this call (0 or Sq). With
            ``cache_seqlens`` None, every sequence has exactly ``new_tokens`` keys (a plain attention call).
        window: ``(left, right)``, -1 unbounded, causal folded in as ``right = 0``.
        mask: None, or a bool (True = attend) / float (added) tensor expanded to ``[B, Hq, Sq, capacity]`` over
            cache positions (``capacity`` = ``S_max``, or ``max_pages * page_size`` when paged); any strides,
            so a padding mask ``[B, capacity]`` is passed as a stride-0 view over heads and queries.
        num_splits: key splits per sequence; 0 chooses from batch, heads, capacity and SM count.
        config: ``(block_n, num_warps, num_stages)`` instead of the default.
    Returns:
        ``(out [B, Hq, Sq, D] like q, lse fp32 [B, Hq, Sq] or None)``.
    """
    b, hq, sq, d = q.shape
    hkv = k_cache.shape[1]
    group = hq // hkv
    paged = block_table is not None
    page_size = k_cache.shape[2] if paged else 1
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    block_d = max(16, next_power_of_2(d))
    block_m = min(64, max(16, next_power_of_2(group * sq)))
    row_blocks = cdiv(group * sq, block_m)
    interpreted = q.device.type == "cpu"
    sm_count = 4 if interpreted else torch.cuda.get_device_properties(q.device).multi_processor_count
    if config is None and interpreted:
        config = _INTERPRETER_CONFIG
    elif config is None:
        config = fit_config(choose_config(b, hkv, row_blocks, sm_count, page_size if paged else 0),
                            block_m, block_d, q.element_size(), mask is not None, _shared_memory_bytes(q.device))
    block_n, num_warps, num_stages = config
    if num_splits <= 0:
        num_splits = choose_num_splits(b, hkv, row_blocks, capacity, sm_count, block_n, paged)
    keys_per_split = cdiv(cdiv(capacity, num_splits), block_n) * block_n
    num_splits = cdiv(capacity, keys_per_split)  # no split left empty by the rounding

    out = torch.empty_like(q)
    lse = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
    if num_splits == 1:  # write the final result directly, as split 0 of a one-split "partial"
        part_out, part_lse = out.unsqueeze(3), lse.unsqueeze(3)
    else:
        part_out = torch.empty(b, hq, sq, num_splits, d, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(b, hq, sq, num_splits, device=q.device, dtype=torch.float32)
    if not paged:
        paging = NOT_PAGED.value
    else:
        paging = (PAGED_PER_TILE if page_size % block_n == 0 else PAGED_PER_KEY).value
    mask_kind, mask_per_key, mask_arg, mask_strides = mask_arguments(  # a tile's rows span query heads and tokens
        mask, placeholder=q, row_dims=(1, 2))
    grid = (num_splits, b * hkv, row_blocks)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, part_out, part_lse, block_table if paged else q,
        q if cache_seqlens is None else cache_seqlens, mask_arg,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *part_out.stride(), *part_lse.stride(),
        block_table.stride(0) if paged else 0, *mask_strides,
        hkv, group, sq, new_tokens, keys_per_split, page_size,
        float(scale), float(softcap or 1.0), max(window[0], 0), max(window[1], 0),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_LEFT=window[0] >= 0, HAS_RIGHT=window[1] >= 0, MASK_KIND=mask_kind, MASK_PER_KEY=mask_per_key,
        HAS_SOFTCAP=softcap is not None, PAGED=paging, HAS_SEQLENS=cache_seqlens is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _combine_kernel[(b * hq * sq,)](
            part_out, part_lse, out, lse,
            *part_out.stride(), *part_lse.stride(), *out.stride(), *lse.stride(),
            hq, sq, num_splits,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, next_power_of_2(num_splits)),
            RETURN_LSE=return_lse, num_warps=4,
        )
    return out, (lse if return_lse else None)
