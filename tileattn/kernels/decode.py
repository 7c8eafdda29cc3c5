"""Split-KV ("flash-decoding") attention over a KV cache, contiguous or paged, and its launcher.

Decoding reads the whole cache for a handful of query tokens: it is memory-bound, and one program
per (sequence, head) leaves most SMs idle when the batch is small. So:

* one program serves all ``G = Hq / Hkv`` query heads that read a KV head (times the ``Sq`` query
  tokens): its ``G * Sq`` rows share every K/V tile, and each K/V byte is read from memory once;
* each sequence's keys are cut into ``num_splits`` contiguous ranges, one program each, so even
  one sequence fills the GPU. Each split writes a normalized partial output and its LSE to a reusable
  workspace, and the last split of each tile to finish merges them in the same launch:
  ``out = sum_s exp(lse_s - lse) * out_s``, ``lse = logsumexp_s lse_s``.

With ``num_splits == 1`` the kernel writes the final output directly. Either way a call is one launch
(host time is as much of a decode step's cost as GPU time at small batch).

Head dims as in the prefill kernel: q/k's and v's may differ; past 256, ``q @ k^T`` is summed over head-dim chunks
and v's columns are cut into blocks, one program each (the grid's third axis is row blocks x column blocks).
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E, MASK_NONE, MAX_BLOCK_DV, NOT_PAGED, PAGED_PER_KEY, PAGED_PER_TILE, SCALE_NONE, SCALE_PER_PROGRAM,
    SCALE_PER_TOKEN, attend_keys, cdiv, finalize, fp8_max, fp8_token_scales, initial_state, key_block_ranges,
    load_tile, mask_arguments, mask_tensor, needs_int64_index, next_power_of_2, output_like, qk_head_dim_tiling,
    quantize_fp8, scale_arguments, token_scale_headroom, v_head_dim_tiling,
)
from .launch import Launch, Launcher, PlanCache


@triton.jit
def _write_new_rows(
    New, Cache, Scale, block_table, off_b, off_hkv, first, last, cached,
    stride_nb, stride_nh, stride_nm, stride_nd, stride_cb, stride_ch, stride_cn, stride_cd,
    stride_sb, stride_sh, stride_sn, page_size,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, PAGED: tl.constexpr,
    SCALE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    """Write the new tokens (``k_new`` or ``v_new``: ``New``) that belong at cache positions ``first .. last - 1``
    (token ``pos - cached``) into ``Cache``: row ``b`` of a contiguous cache, or page ``block_table[pos //
    page_size]``, slot ``pos % page_size``; ``HEAD_DIM`` columns in chunks of ``BLOCK_D``. 64-bit offsets.

    ``SCALE_NONE``: a cache in the tokens' dtype, copied. An fp8 cache (``FP8_MAX``: its format's largest value)
    stores them quantized by :func:`tileattn.quant.quantize`'s rule at its scale ``Scale`` (strides as
    :func:`~tileattn.kernels.common.scale_arguments` gives them): ``SCALE_PER_PROGRAM``, the one value at ``(b,
    hkv)``; ``SCALE_PER_TOKEN``, each token's own :func:`tileattn.quant.token_scales`, computed here from a first
    pass over its row (its largest finite magnitude) and stored at the token's position (indexed like the cache)
    before the second pass quantizes the row."""
    offs_d = tl.arange(0, BLOCK_D)
    if SCALE == SCALE_PER_PROGRAM:
        scale = tl.load(Scale + off_b * stride_sb + off_hkv * stride_sh)
    for start in range(first, last, BLOCK_W):
        pos = (start + tl.arange(0, BLOCK_W)).to(tl.int64)
        token = pos - cached
        written = pos < last
        if PAGED != NOT_PAGED:
            page = tl.load(block_table + pos // page_size, mask=written, other=0).to(tl.int64)
            dst = page * stride_cb + (pos % page_size) * stride_cn
            scale_dst = page * stride_sb + (pos % page_size) * stride_sn
        else:
            dst = off_b * stride_cb + pos * stride_cn
            scale_dst = off_b * stride_sb + pos * stride_sn
        src = New + off_b * stride_nb + off_hkv * stride_nh + token[:, None] * stride_nm
        if SCALE == SCALE_PER_TOKEN:
            amax = tl.zeros([BLOCK_W], dtype=tl.float32)
            for c in tl.static_range((HEAD_DIM + BLOCK_D - 1) // BLOCK_D):
                dims = c * BLOCK_D + offs_d
                ok = written[:, None] & (dims < HEAD_DIM)[None, :]
                magnitude = tl.abs(tl.load(src + dims[None, :] * stride_nd, mask=ok, other=0.0).to(tl.float32))
                # NaN and infinities are stored as NaN whatever the scale: they do not set it (NaN fails the test)
                amax = tl.maximum(amax, tl.max(tl.where(magnitude < float("inf"), magnitude, 0.0), 1))
            token_scale = fp8_token_scales(amax, FP8_MAX)
            tl.store(Scale + off_hkv * stride_sh + scale_dst, token_scale, mask=written)
            scale = token_scale[:, None]
        for c in tl.static_range((HEAD_DIM + BLOCK_D - 1) // BLOCK_D):
            dims = c * BLOCK_D + offs_d
            ok = written[:, None] & (dims < HEAD_DIM)[None, :]
            x = tl.load(src + dims[None, :] * stride_nd, mask=ok)
            if SCALE != SCALE_NONE:
                x = quantize_fp8(x.to(tl.float32), scale, FP8_MAX, Cache.dtype.element_ty)
            tl.store(Cache + off_hkv * stride_ch + dst[:, None] + dims[None, :] * stride_cd, x, mask=ok)


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse, Workspace, SplitsDone, BlockTable, CacheSeqlens, Mask, KNew, VNew, Alibi, Sinks, KScale, VScale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_bt,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_knb, stride_knh, stride_knm, stride_knd,
    stride_vnb, stride_vnh, stride_vnm, stride_vnd,
    stride_ab,
    stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,
    num_heads_kv, group_size, seqlen_q, new_tokens, capacity, num_splits, keys_per_split, page_size,
    window_left, window_right,
    sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_CHUNKS: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, HAS_SEQLENS: tl.constexpr, APPEND: tl.constexpr,
    SPLIT: tl.constexpr, RETURN_LSE: tl.constexpr, INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr,
    K_FP8_MAX: tl.constexpr, V_FP8_MAX: tl.constexpr, V_TOKEN_HEADROOM: tl.constexpr,
):
    # Parameters are ordered tensors, ints, floats, constexprs, as kernels.launch.Launcher expects.
    # fp8 caches: K_SCALE / V_SCALE say how their scales are laid out (common.SCALE_*), K_FP8_MAX / V_FP8_MAX are their
    # formats' largest values (for the new tokens' quantization), V_TOKEN_HEADROOM see common.token_scale_headroom.
    split = tl.program_id(0)
    off_b = (tl.program_id(1) // num_heads_kv).to(tl.int64)
    off_hkv = (tl.program_id(1) % num_heads_kv).to(tl.int64)
    seqlen_k = new_tokens  # without cache lengths (a plain attention call) every sequence has new_tokens keys
    cached = 0
    if HAS_SEQLENS:  # clamped to the cache: lengths the caller did not check never make us read outside it
        cached = tl.load(CacheSeqlens + off_b)
        seqlen_k = tl.minimum(seqlen_k + cached, capacity)

    # Row r of this program is query token r % Sq of query head hkv * G + r // Sq; the third grid axis is
    # (block of output columns, block of rows).
    row_block = tl.program_id(2)
    dv_block = 0
    if HEAD_DIM_V > BLOCK_DV:
        row_blocks = tl.cdiv(group_size * seqlen_q, BLOCK_M)
        dv_block = row_block // row_blocks
        row_block = row_block % row_blocks
    offs_m = tl.arange(0, BLOCK_M)
    rows = row_block * BLOCK_M + offs_m
    q_pos = rows % seqlen_q
    if INT64_INDEX:  # token x stride may pass 2^31
        q_pos = q_pos.to(tl.int64)
    heads = off_hkv * group_size + rows // seqlen_q
    row_ok = rows < group_size * seqlen_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_idx = dv_block * BLOCK_DV + offs_dv  # this program's output columns
    q_ptrs = (Q + off_b * stride_qb + heads[:, None] * stride_qh + q_pos[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    if QK_CHUNKS == 1:
        q = load_tile(q_ptrs, rows[:, None], offs_d[None, :], group_size * seqlen_q, HEAD_DIM, BLOCK_D, True)
    else:  # reloaded chunk by chunk for each key block
        q = q_ptrs

    # Per-token scales are laid out as the cache without its head dim: the same page and slot arithmetic.
    if PAGED != NOT_PAGED:  # key j is in page block_table[b, j // page_size], slot j % page_size
        k_base = K + off_hkv * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + off_hkv * stride_vh + dv_idx[None, :] * stride_vd
        k_scale_base = KScale + off_hkv * stride_ksh
        v_scale_base = VScale + off_hkv * stride_vsh
    else:
        k_base = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + off_b * stride_vb + off_hkv * stride_vh + dv_idx[None, :] * stride_vd
        k_scale_base = KScale + off_b * stride_ksb + off_hkv * stride_ksh
        v_scale_base = VScale + off_b * stride_vsb + off_hkv * stride_vsh
    if K_SCALE == SCALE_PER_PROGRAM:  # (q . k) * scale * sm_scale: folded into the softmax scale, read on the device
        sm_scale = sm_scale * tl.load(KScale + off_b * stride_ksb + off_hkv * stride_ksh)
    block_table = BlockTable + off_b * stride_bt
    mask_base = Mask
    if MASK_KIND != MASK_NONE:
        mask_base = Mask + off_b * stride_mb
        if not MASK_PER_KEY:  # rows past the last head (never stored) read head 0's mask, inside the tensor
            mask_heads = tl.where(row_ok, heads, 0)
            mask_base = mask_base + mask_heads[:, None] * stride_mh + q_pos[:, None] * stride_mm

    # Rows span the heads of a group: a slope and a sink per row. Only split 0 starts from the sink (the merge
    # would count it once per split otherwise).
    acc, m_i, l_i = initial_state(Sinks + heads, row_ok, split == 0, BLOCK_M, BLOCK_DV, HAS_SINKS)
    alibi = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        alibi += tl.load(Alibi + off_b * stride_ab + heads, mask=row_ok, other=0.0) * LOG2E

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
    if APPEND:
        # The new tokens (k_new/v_new) go into the cache in the same launch: each program writes those that fall
        # in its own split's key range, whole rows (programs of other row or column blocks write the same bytes),
        # so every key a program reads below was written by itself; the barrier makes its threads' writes visible
        # to all of them.
        first_new = tl.maximum(tl.maximum(cached, split_lo), 0)
        last_new = tl.minimum(seqlen_k, split_hi)
        # Into an fp8 cache they are quantized, per-token scales computed and stored with them.
        _write_new_rows(KNew, K, KScale, block_table, off_b, off_hkv, first_new, last_new, cached,
                        stride_knb, stride_knh, stride_knm, stride_knd, stride_kb, stride_kh, stride_kn, stride_kd,
                        stride_ksb, stride_ksh, stride_ksn, page_size, HEAD_DIM, BLOCK_D, 16, PAGED, K_SCALE, K_FP8_MAX)
        _write_new_rows(VNew, V, VScale, block_table, off_b, off_hkv, first_new, last_new, cached,
                        stride_vnb, stride_vnh, stride_vnm, stride_vnd, stride_vb, stride_vh, stride_vn, stride_vd,
                        stride_vsb, stride_vsh, stride_vsn, page_size, HEAD_DIM_V, BLOCK_DV, 16, PAGED, V_SCALE,
                        V_FP8_MAX)
        tl.debug_barrier()
    acc, m_i, l_i = attend_keys(
        acc, m_i, l_i, q, rows, group_size * seqlen_q, k_base, v_base, mask_base, block_table, alibi, k_scale_base,
        v_scale_base, lo, full_lo, full_hi, hi, q_pos, offs_n, offs_d, dv_idx,
        stride_qd, stride_kd, stride_kn, stride_vn, stride_mn, stride_kb, stride_vb, page_size,
        stride_ksn, stride_vsn, stride_ksb, stride_vsb,
        seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
        HEAD_DIM, BLOCK_D, QK_CHUNKS, HEAD_DIM_V, BLOCK_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_PER_KEY, HAS_SOFTCAP, PAGED, INT64_INDEX,
        DOT_PRECISION, HAS_ALIBI, K_SCALE, V_SCALE, V_TOKEN_HEADROOM)
    # V's scale: one per program multiplies the sum of p * v (linear, so per split before the merge too); per-token
    # scales entered the weights times the headroom, a power of two divided out exactly.
    if V_SCALE == SCALE_PER_PROGRAM:
        acc *= tl.load(VScale + off_b * stride_vsb + off_hkv * stride_vsh)
    elif V_SCALE == SCALE_PER_TOKEN:
        acc *= 1.0 / V_TOKEN_HEADROOM
    out, lse = finalize(acc, m_i, l_i)

    if SPLIT:
        # Each split stores its partial result (normalized, with its LSE) in this tile's slots of the workspace,
        # and counts itself done; the last split of the tile to finish merges all of them (one launch, no
        # combine kernel) and zeroes the counter for the next launch. The workspace holds every partial
        # output [tiles, splits, BLOCK_M, BLOCK_DV], then every partial LSE [tiles, splits, BLOCK_M].
        tile = (tl.program_id(1) * tl.num_programs(2) + tl.program_id(2)).to(tl.int64)
        PartOut = Workspace
        PartLse = Workspace + (tl.num_programs(1) * tl.num_programs(2)).to(tl.int64) * num_splits * BLOCK_M * BLOCK_DV
        part = (tile * num_splits + split) * BLOCK_M + offs_m
        tl.store(PartOut + part[:, None] * BLOCK_DV + offs_dv[None, :], out)
        tl.store(PartLse + part, lse)
        tl.debug_barrier()  # every thread's partial is written before the release below publishes them
        if tl.atomic_add(SplitsDone + tile, 1, sem="acq_rel") != num_splits - 1:
            return
        first = tile * num_splits * BLOCK_M + offs_m
        lse_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        total = tl.zeros([BLOCK_M], dtype=tl.float32)
        out = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        # Online merge by LSE; .cg reads L2, where the other splits wrote. Unrolled: the loads of several splits
        # are in flight at once instead of one L2 round trip per split on the tail of the launch.
        for s in tl.range(0, num_splits, loop_unroll_factor=4):
            lse_s = tl.load(PartLse + first + s * BLOCK_M, cache_modifier=".cg")
            out_s = tl.load(PartOut + (first + s * BLOCK_M)[:, None] * BLOCK_DV + offs_dv[None, :],
                            cache_modifier=".cg")
            new_max = tl.maximum(lse_max, lse_s)
            use_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # no split has seen a key yet: weights 0
            alpha = tl.exp(lse_max - use_max)
            weight = tl.exp(lse_s - use_max)
            out = out * alpha[:, None] + out_s * weight[:, None]
            total = total * alpha + weight
            lse_max = new_max
        empty = total == 0  # no split saw a key (a NaN total stays NaN)
        out = out / tl.where(empty, 1.0, total)[:, None]
        lse = tl.where(empty, float("-inf"), lse_max + tl.log(tl.where(empty, 1.0, total)))
        tl.store(SplitsDone + tile, 0)

    o_ptrs = (Out + off_b * stride_ob + heads[:, None] * stride_oh + q_pos[:, None] * stride_om
              + dv_idx[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dv_idx < HEAD_DIM_V)[None, :])
    if RETURN_LSE and dv_block == 0:  # every column block computes the same lse
        tl.store(Lse + off_b * stride_lb + heads * stride_lh + q_pos * stride_lm, lse, mask=row_ok)


# (block_n, num_warps, num_stages): from the decode sweeps on an H100 (benchmarks/sweep_decode.py,
# benchmarks/NOTES.md): the most robust tile over contiguous and paged caches with automatic splits, and
# a half-size tile for grids that need splitting to fill the GPU: its ~96 KB of K/V stages let two
# programs share an SM, so short split programs overlap each other's pipeline fill.
_DECODE_CONFIG = (128, 4, 3)
_SMALL_GRID_CONFIG = (64, 4, 3)
_SMALL_GRID_SMALL_PAGES_CONFIG = (128, 4, 2)  # the paged sweep's best for 16-token pages at B = 1
_INTERPRETER_CONFIG = (32, 4, 1)
MAX_SPLITS = 64
DECODE_ACC_ELEMENTS = 64 * 128  # the tuned full tile's fp32 accumulator (64 rows x D = 128)


def choose_config(batch: int, kv_heads: int, row_blocks: int, sm_count: int, page_size: int = 0):
    """The tile: the half-size one when the grid has fewer programs than SMs before splitting, for contiguous
    caches and pages that hold whole half tiles (``page_size`` 0 = contiguous). With smaller pages the half
    tile gathers keys one by one and measured slower than the full tile, best with two stages (NOTES.md,
    decode v5 and v7)."""
    if batch * kv_heads * row_blocks >= sm_count:
        return _DECODE_CONFIG
    return _SMALL_GRID_CONFIG if page_size % _SMALL_GRID_CONFIG[0] == 0 else _SMALL_GRID_SMALL_PAGES_CONFIG


def fit_config(config, block_m: int, block_d: int, elem_size: int, masked: bool, budget: int, k_width: int = 0,
               block_dv: int = 0):
    """Adapt the tile to the call. Masked tiles of 32 rows or more take 64-key blocks: at 32 x 128 and beyond the
    masked score tile spills registers (2-5x slower; NOTES.md, decode route). Then halve the key block, down to
    16, until the K/V pipeline stages, the Q tile and (with a mask) the fp32 score tile Triton stages through
    shared memory fit ``budget`` bytes, and only then drop stages. The tuned tiles fit as they are up to D = 128
    in 2-byte types on Hopper; D = 256 and fp32 need this (Triton rejects the launch otherwise). A stage holds a
    key block's ``k_width`` K columns (every chunk) and ``block_dv`` V columns (both ``block_d`` by default); the
    Q tile counts all ``k_width`` columns too (with chunked head dims, 576/512 at 128 query heads asked Triton
    for exactly that much, 64 KB more than counting one chunk, and failed to launch before)."""
    block_n, num_warps, num_stages = config
    k_width, block_dv = k_width or block_d, block_dv or block_d
    if masked and block_m >= 32:
        block_n = min(block_n, 64)

    def needed():
        return ((block_n * num_stages * (k_width + block_dv) + block_m * k_width) * elem_size
                + (block_m * block_n * 4 if masked else 0))

    while block_n > 16 and needed() > budget:
        block_n //= 2
    while num_stages > 1 and needed() > budget:
        num_stages -= 1
    return block_n, num_warps, num_stages


def choose_num_splits(batch: int, kv_heads: int, row_blocks: int, max_keys: int, sm_count: int,
                      block_n: int, paged: bool, fp8: bool = False) -> int:
    """Key splits per sequence, from the split sweeps on an H100 (benchmarks/NOTES.md): a contiguous cache
    streams best from few long programs (about one per two SMs with the full tile, one per SM with the
    half tile, of which two fit an SM; no split once there are that many sequences x KV heads); a paged
    cache, whose tile addresses wait on a block-table load, wants about two programs per SM and at least
    two splits to hide that latency. Rounded down, never up: a grid just past the target runs a nearly
    empty extra wave. Never fewer than 4 key blocks per split. An ``fp8`` cache's tiles hold half the bytes, so a
    program keeps half as many in flight: contiguous ones too want about two programs per SM (NOTES.md, session 16:
    H100, B = 8, 16k keys, half tile: 4 splits instead of 2 took the step from 1.07x to 0.75x of the bf16 one)."""
    programs = batch * kv_heads * row_blocks
    if paged:
        target, least = 2 * sm_count, 2
    elif fp8:
        target, least = 2 * sm_count, 1
    else:
        target, least = (sm_count if block_n <= _SMALL_GRID_CONFIG[0] else max(1, sm_count // 2)), 1
    most = max(1, max_keys // (4 * block_n))
    return max(1, min(max(target // programs, least), most, MAX_SPLITS))


@functools.cache
def _device_limits(device_index: int) -> tuple[int, int]:
    """``(SM count, shared memory bytes per block)`` of a CUDA device."""
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return torch.cuda.get_device_properties(device_index).multi_processor_count, props["max_shared_mem"]


_decode = Launcher(_decode_kernel)


@functools.lru_cache(maxsize=4096)
def _plan(batch, heads_q, heads_kv, seqlen_q, head_dim, head_dim_v, dtype, device_index, page_size, mask_kind,
          mask_per_key, window, softcap, has_seqlens, append, return_lse, int64_index, config, alibi=False,
          sinks=False, k_scale=SCALE_NONE.value, v_scale=SCALE_NONE.value, k_dtype=None, v_dtype=None):
    """What a launch needs that depends only on the call's signature (not on the cache length):
    ``(block_m, block_dv, row_blocks, dv_blocks, block_n, num_warps, num_stages, sm_count, constexprs)``, where
    ``constexprs[split]`` is the constexpr tuple without or with the split merge. ``device_index`` is None under
    the interpreter; ``page_size`` 0 means a contiguous cache. ``k_scale``/``v_scale``: the caches' scale modes
    (``common.SCALE_*``), ``k_dtype``/``v_dtype`` their dtypes (fp8 formats, or q's)."""
    group = heads_q // heads_kv
    block_d, qk_chunks = qk_head_dim_tiling(head_dim)
    block_m = min(64, max(16, next_power_of_2(group * seqlen_q)))
    # Each column block of v re-reads the whole K tile: a small tile keeps all of v's columns, up to the accumulator
    # registers a 64 x 128 tile takes (16 x 512: MLA decode at 16 query heads reads each latent token in one program).
    block_dv, dv_blocks = v_head_dim_tiling(head_dim_v, max(MAX_BLOCK_DV, min(512, DECODE_ACC_ELEMENTS // block_m)))
    row_blocks = cdiv(group * seqlen_q, block_m)
    if device_index is None:
        sm_count, config = 4, config or _INTERPRETER_CONFIG
    else:
        sm_count, shared_memory = _device_limits(device_index)
        config = config or fit_config(choose_config(batch, heads_kv, row_blocks * dv_blocks, sm_count, page_size),
                                      block_m, block_d, dtype.itemsize, mask_kind != MASK_NONE.value, shared_memory,
                                      block_d * qk_chunks, block_dv)
    block_n, num_warps, num_stages = config
    if page_size == 0:
        paging = NOT_PAGED.value
    else:
        paging = (PAGED_PER_TILE if page_size % block_n == 0 else PAGED_PER_KEY).value
    left, right = window
    by_split = {split: _decode.constexprs(
        HEAD_DIM=head_dim, BLOCK_D=block_d, QK_CHUNKS=qk_chunks, HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, MASK_KIND=mask_kind,
        MASK_PER_KEY=mask_per_key, HAS_SOFTCAP=softcap, PAGED=paging, HAS_SEQLENS=has_seqlens, APPEND=append, SPLIT=split, RETURN_LSE=return_lse,
        INT64_INDEX=int64_index, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", HAS_ALIBI=alibi,
        HAS_SINKS=sinks, K_SCALE=k_scale, V_SCALE=v_scale, K_FP8_MAX=fp8_max(k_dtype), V_FP8_MAX=fp8_max(v_dtype),
        V_TOKEN_HEADROOM=token_scale_headroom(v_dtype) if v_scale == SCALE_PER_TOKEN.value else 1.0)
        for split in (False, True)}
    return block_m, block_dv, row_blocks, dv_blocks, block_n, num_warps, num_stages, sm_count, by_split


class _Workspace:
    """Per (device, stream): the split kernel's fp32 partial results and its per-tile counters of finished splits
    (all zero between launches: the last split of each tile zeroes its counter). Reused across eager calls on a
    GPU, grown as needed (:func:`release_workspaces` frees them). Launches on one stream run in order, so one set
    per stream suffices. Inside CUDA-graph capture, under torch.compile (whose CUDA-graph trees own the memory
    of what runs in them) and in the interpreter each call gets its own."""

    _by_stream: dict = {}

    @classmethod
    def get(cls, device, floats: int, tiles: int, reuse: bool = True):
        if not reuse or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
            return (torch.empty(floats, device=device, dtype=torch.float32),
                    torch.zeros(tiles, device=device, dtype=torch.int32))
        key = (device, torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0)
        found = cls._by_stream.get(key)
        if found is None or found[0].numel() < floats or found[1].numel() < tiles:
            grown = max(floats, found[0].numel() if found else 0), max(tiles, found[1].numel() if found else 0)
            found = (torch.empty(grown[0], device=device, dtype=torch.float32),
                     torch.zeros(grown[1], device=device, dtype=torch.int32))
            cls._by_stream[key] = found
        return found


def release_workspaces() -> None:
    """Free the reusable split workspaces (they are allocated again by the next call that needs one)."""
    _Workspace._by_stream.clear()


def workspace_bytes() -> int:
    """Device bytes held by the reusable split workspaces: one set per (device, stream), as large as the
    largest call so far needed, so bounded by the largest batch x heads x splits."""
    return sum(t.numel() * t.element_size() for pair in _Workspace._by_stream.values() for t in pair)


def decode_attention(
    q, k_cache, v_cache, cache_seqlens, *, new_tokens, block_table=None, window=(-1, -1), scale, softcap=None,
    mask=None, alibi_slopes=None, sinks=None, return_lse=False, num_splits=0, config=None, k_new=None, v_new=None,
    reuse_workspace=True, seq_first=False, k_scale=None, v_scale=None,
):
    """Attention of ``q`` over each sequence's first ``cache_seqlens[b] + new_tokens`` cached keys, in one launch.

    Inputs are already validated (see :func:`tileattn.attention_with_kvcache`).
    Args:
        q: ``[B, Hq, Sq, D]``, any strides.
        k_cache, v_cache: contiguous ``[B, Hkv, S_max, D]`` / ``[B, Hkv, S_max, D_v]`` or, with ``block_table``
            ``[B, max_pages]`` int32, paged ``[num_pages, Hkv, page_size, D or D_v]``; any strides. D up to 576,
            D_v up to 512.
        cache_seqlens: int32 ``[B]``; new_tokens: tokens appended to the cache for this call (0 or Sq). With
            ``cache_seqlens`` None, every sequence has exactly ``new_tokens`` keys (a plain attention call).
        k_new, v_new: optional ``[B, Hkv, Sq, D]`` / ``[B, Hkv, Sq, D_v]``, written by this launch into the cache at positions
            ``cache_seqlens[b] ..`` (needs ``cache_seqlens`` and ``new_tokens = Sq``); positions past the capacity
            are not written. Without them, the new tokens must already be in the cache.
        window: ``(left, right)``, -1 unbounded, causal folded in as ``right = 0``.
        mask: None, or a bool (True = attend) / float (added) tensor expanded to ``[B, Hq, Sq, capacity]`` over
            cache positions (``capacity`` = ``S_max``, or ``max_pages * page_size`` when paged); any strides,
            so a padding mask ``[B, capacity]`` is passed as a stride-0 view over heads and queries.
        alibi_slopes: None or fp32 ``[Hq]`` / ``[B, Hq]``; sinks: None or ``[Hq]`` (see ``tileattn.reference``).
        num_splits: key splits per sequence; 0 chooses from batch, heads, capacity and SM count.
        config: ``(block_n, num_warps, num_stages)`` instead of the default.
        reuse_workspace: keep the split workspace for the next call (False: allocate one for this call only).
        seq_first: q, the caches, k_new, v_new and out are ``[B, S, H, D]`` (flash-attn's order: the kernel only
            needs their strides, so no transposed views are made per call); ``mask`` is not supported then.
        k_scale, v_scale: with fp8 caches (``torch.float8_e4m3fn`` / ``float8_e5m2``, each its own), their fp32
            scales, any strides: 0-d, ``[Hkv]``, ``[B, Hkv]`` or per token ``[B, Hkv, S_max]`` / ``[num_pages, Hkv,
            page_size]`` (see :mod:`tileattn.quant`; always heads before tokens, also with ``seq_first``). The
            kernel attends over ``cache.float() * scale``; ``k_new``/``v_new`` (q's dtype) are quantized on write by
            the rule of :func:`tileattn.quant.quantize`, per-token scales computed and written in place first.
    Returns:
        ``(out [B, Hq, Sq, D_v] like q (contiguous when D_v != D), lse fp32 [B, Hq, Sq] or None)``;
        ``out [B, Sq, Hq, D_v]`` with ``seq_first``.
    """
    # The kernel reads one length per sequence and a row of page ids at unit stride.
    if cache_seqlens is not None and cache_seqlens.stride(0) != 1:
        cache_seqlens = cache_seqlens.contiguous()
    if block_table is not None and block_table.stride(1) != 1:
        block_table = block_table.contiguous()
    if alibi_slopes is not None and alibi_slopes.stride(-1) != 1:  # slopes and sinks are read at unit head stride
        alibi_slopes = alibi_slopes.contiguous()
    if sinks is not None and sinks.stride(0) != 1:
        sinks = sinks.contiguous()
    plan = decode_plan(q, k_cache, v_cache, cache_seqlens, new_tokens=new_tokens, block_table=block_table,
                       window=window, scale=scale, softcap=softcap, mask=mask, alibi_slopes=alibi_slopes, sinks=sinks,
                       return_lse=return_lse, num_splits=num_splits, config=config, k_new=k_new, v_new=v_new,
                       seq_first=seq_first, k_scale=k_scale, v_scale=v_scale)
    return plan.run(q, k_cache, v_cache, mask, cache_seqlens, block_table, k_new, v_new, alibi_slopes, sinks,
                    reuse_workspace, k_scale, v_scale)


class DecodePlan(NamedTuple):
    """A decode launch prepared for one call signature (:func:`decode_plan`): :meth:`run` launches it with a call's
    tensors, which must have that signature (shapes, strides, dtypes, device, options)."""

    launch: Launch
    num_splits: int
    workspace_floats: int
    tiles: int
    return_lse: bool
    seq_first: bool

    def run(self, q, k_cache, v_cache, mask=None, cache_seqlens=None, block_table=None, k_new=None, v_new=None,
            alibi_slopes=None, sinks=None, reuse_workspace=True, k_scale=None, v_scale=None):
        """``(out, lse or None)`` as :func:`decode_attention` returns them; the tensors at unit stride where it
        needs them (see there)."""
        out = output_like(q, v_cache.shape[-1])  # the layout the plan saw (decode_plan allocates the same way)
        if self.return_lse:
            lse_shape = (q.shape[0], q.shape[2], q.shape[1]) if self.seq_first else q.shape[:3]
            lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
        else:
            lse = out
        workspace = splits_done = q  # placeholders, never read with one split
        if self.num_splits > 1:
            workspace, splits_done = _Workspace.get(q.device, self.workspace_floats, self.tiles, reuse_workspace)
        _decode.launch(self.launch, (q, k_cache, v_cache, out, lse, workspace, splits_done,
                                     q if block_table is None else block_table,
                                     q if cache_seqlens is None else cache_seqlens, mask_tensor(mask, q),
                                     q if k_new is None else k_new, q if v_new is None else v_new,
                                     q if alibi_slopes is None else alibi_slopes, q if sinks is None else sinks,
                                     q if k_scale is None else k_scale, q if v_scale is None else v_scale))
        return out, (lse if self.return_lse else None)


def decode_plan(q, k_cache, v_cache, cache_seqlens, *, new_tokens, block_table=None, window=(-1, -1), scale,
                softcap=None, mask=None, alibi_slopes=None, sinks=None, return_lse=False, num_splits=0, config=None,
                k_new=None, v_new=None, seq_first=False, k_scale=None, v_scale=None) -> DecodePlan:
    """The :class:`DecodePlan` of a :func:`decode_attention` call (its arguments, tensors already at the unit
    strides it needs), cached by signature: the caches' dtypes and their scales' layouts (granularity, strides)
    included, so a plan never runs with another scale layout than the one it was prepared for."""
    key = (q.shape, q.stride(), q.dtype, q.device, k_cache.shape, k_cache.stride(), v_cache.shape[-1], v_cache.stride(),
           None if block_table is None else (block_table.shape, block_table.stride(0)),
           None if mask is None else (mask.shape, mask.stride(), mask.dtype), cache_seqlens is None, new_tokens,
           None if k_new is None else (k_new.stride(), v_new.stride()),
           None if alibi_slopes is None else alibi_slopes.stride(), sinks is not None,
           tuple(window), scale, softcap, return_lse, num_splits, None if config is None else tuple(config), seq_first,
           k_cache.dtype, v_cache.dtype, *[None if t is None else (t.shape, t.stride()) for t in (k_scale, v_scale)])
    plan = _plans.get(key)
    if plan is None:
        heads_first = (lambda t: None if t is None else t.transpose(1, 2)) if seq_first else (lambda t: t)
        out = heads_first(output_like(q, v_cache.shape[-1]))  # the strides every call's output will have
        plan = DecodePlan(*_prepare(heads_first(q), heads_first(k_cache), heads_first(v_cache), out, block_table,
                                    mask, cache_seqlens is not None, heads_first(k_new), heads_first(v_new),
                                    new_tokens, tuple(window), scale, softcap, return_lse, num_splits, config,
                                    alibi_slopes, sinks is not None, k_scale, v_scale), return_lse, seq_first)
        _plans.remember(key, plan)
    return plan


_plans = PlanCache()  # by call signature


def _prepare(q, k_cache, v_cache, out, block_table, mask, has_seqlens, k_new, v_new, new_tokens, window, scale,
             softcap, return_lse, num_splits, config, alibi_slopes=None, has_sinks=False, k_scale=None, v_scale=None):
    """``(Launch, num_splits, workspace floats, tiles)`` for a call of this signature (``out``: an output of the
    layout every call's will have)."""
    b, hq, sq, d = q.shape
    hkv = k_cache.shape[1]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    mask_kind, mask_per_key, mask_arg, mask_strides = mask_arguments(  # a tile's rows span query heads and tokens
        mask, placeholder=q, row_dims=(1, 2))
    k_scale_mode, _, k_scale_strides = scale_arguments(k_scale, q)
    v_scale_mode, _, v_scale_strides = scale_arguments(v_scale, q)
    device = q.device
    large = (needs_int64_index(q, k_cache, v_cache, *[t for t in (k_scale, v_scale) if t is not None])
             or (mask is not None and needs_int64_index(mask_arg)))
    block_m, block_dv, row_blocks, dv_blocks, block_n, num_warps, num_stages, sm_count, constexprs = _plan(
        b, hq, hkv, sq, d, v_cache.shape[-1], q.dtype, None if device.type == "cpu" else device.index, k_cache.shape[2] if paged else 0,
        mask_kind, mask_per_key, window, softcap is not None, has_seqlens, k_new is not None, return_lse, large,
        None if config is None else tuple(config), alibi_slopes is not None, has_sinks, k_scale_mode, v_scale_mode,
        k_cache.dtype, v_cache.dtype)
    if num_splits <= 0:
        num_splits = choose_num_splits(b, hkv, row_blocks * dv_blocks, capacity, sm_count, block_n, paged,
                                       fp8=k_scale_mode != SCALE_NONE.value)
    keys_per_split = cdiv(cdiv(capacity, num_splits), block_n) * block_n
    num_splits = cdiv(capacity, keys_per_split)  # no split left empty by the rounding
    lse_strides = (hq * sq, sq, 1) if return_lse else out.stride()[:3]
    launch = _decode.prepare(
        (num_splits, b * hkv, row_blocks * dv_blocks),
        (*q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(), *lse_strides,
         block_table.stride(0) if paged else 0, *mask_strides,
         *(k_new.stride() if k_new is not None else (0,) * 4), *(v_new.stride() if v_new is not None else (0,) * 4),
         alibi_slopes.stride(0) if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0,
         *k_scale_strides, *v_scale_strides,
         hkv, hq // hkv, sq, new_tokens, capacity, num_splits, keys_per_split, k_cache.shape[2] if paged else 1,
         max(window[0], 0), max(window[1], 0)),
        (scale, softcap or 1.0), constexprs[num_splits > 1], num_warps, num_stages)
    tiles = b * hkv * row_blocks * dv_blocks
    return launch, num_splits, tiles * num_splits * block_m * (block_dv + 1), tiles
