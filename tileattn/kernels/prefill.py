"""FlashAttention-2-style forward kernel for ``[B, H, S, D]`` tensors with any strides, and its launcher.

One program computes ``BLOCK_M`` query rows of one (batch, query head). It keeps the query tile in
registers and streams the K/V blocks its rows may see; Triton software-pipelines the loop
(``num_stages``), so the next K/V block is loading while this one is computed. The softmax is online
(running max and denominator, fp32), so no ``Sq x Sk`` matrix ever exists.

The key range is cut into three parts (see ``key_block_ranges``): blocks every row sees are
computed without any elementwise masking; the blocks on the window's edges (the causal diagonal,
a sliding window's left edge, the ragged end of K) are masked elementwise; blocks nobody sees are
skipped without being loaded.

Head dims: q/k's ``HEAD_DIM`` and v's ``HEAD_DIM_V`` may differ (DeepSeek MLA prefill: 192 / 128). Up to 256 a
q row lives in registers; past it (up to 576) ``q @ k^T`` is summed over head-dim chunks and v's columns are cut
into blocks of at most 256, one program each along the grid's third axis (see ``common.qk_head_dim_tiling``).
"""

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E, MASK_NONE, NOT_PAGED, SCALE_NONE, attend_keys, cdiv, finalize, initial_state, key_block_ranges, load_tile,
    mask_arguments, mask_tensor, needs_int64_index, output_like, qk_head_dim_tiling, v_head_dim_tiling,
)
from .hopper import HopperPlan, hopper_unsupported_reason
from .launch import Launch, Launcher, PlanCache


@triton.jit
def _prefill_kernel(
    Q, K, V, Out, Lse, Mask, CuSeqlensQ, CuSeqlensK, Alibi, Sinks,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ab,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_CHUNKS: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, RETURN_LSE: tl.constexpr, IS_VARLEN: tl.constexpr, INT64_INDEX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    # Parameters are ordered tensors, ints, floats, constexprs, as kernels.launch.Launcher expects.
    # Heaviest query blocks first: with causal masking the last rows see the most keys.
    block_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = pid_bh // num_heads_q
    off_h = (pid_bh % num_heads_q).to(tl.int64)
    off_hkv = off_h // group_size  # GQA: query heads of a group read the same K/V head

    # Packed sequences: sequence b is tokens cu_seqlens[b] .. cu_seqlens[b + 1] of the token axis.
    q_start = 0
    k_start = 0
    if IS_VARLEN:
        q_start = tl.load(CuSeqlensQ + off_b)
        seqlen_q = tl.load(CuSeqlensQ + off_b + 1) - q_start
        k_start = tl.load(CuSeqlensK + off_b)
        seqlen_k = tl.load(CuSeqlensK + off_b + 1) - k_start
        if block_m * BLOCK_M >= seqlen_q:  # the grid covers the longest sequence
            return
    off_b = off_b.to(tl.int64)
    q_start = q_start.to(tl.int64)
    k_start = k_start.to(tl.int64)

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if INT64_INDEX:  # row x stride may pass 2^31
        rows = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dv_idx = tl.arange(0, BLOCK_DV)  # this program's output columns
    if HEAD_DIM_V > BLOCK_DV:
        dv_idx += tl.program_id(2) * BLOCK_DV
    q_ptrs = (Q + off_b * stride_qb + off_h * stride_qh + (q_start + rows[:, None]) * stride_qm
              + offs_d[None, :] * stride_qd)
    if QK_CHUNKS == 1:
        q = load_tile(q_ptrs, rows[:, None], offs_d[None, :], seqlen_q, HEAD_DIM, BLOCK_D, True)
    else:  # reloaded chunk by chunk for each key block
        q = q_ptrs
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + k_start * stride_kn + offs_d[:, None] * stride_kd
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + k_start * stride_vn + dv_idx[None, :] * stride_vd
    mask_base = Mask
    if MASK_KIND != MASK_NONE:
        mask_base = Mask + off_b * stride_mb + off_h * stride_mh
        if not MASK_PER_KEY:
            mask_base = mask_base + rows[:, None] * stride_mm

    # One head per program: one ALiBi slope (per sequence with stride_ab) and one sink for all rows.
    acc, m_i, l_i = initial_state(Sinks + off_h + 0 * rows, rows >= 0, off_h >= 0, BLOCK_M, BLOCK_DV, HAS_SINKS)
    alibi = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:
        alibi += tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E

    diag = seqlen_k - seqlen_q
    row_hi = tl.minimum(block_m * BLOCK_M + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = key_block_ranges(
        block_m * BLOCK_M, row_hi, seqlen_k, diag, window_left, window_right, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    acc, m_i, l_i = attend_keys(  # K/V in q's dtype: no scales (Mask stands in for their pointers)
        acc, m_i, l_i, q, rows, seqlen_q, k_base, v_base, mask_base, Mask, alibi, Mask, Mask, lo, full_lo, full_hi,
        hi, rows, offs_n, offs_d, dv_idx, stride_qd, stride_kd, stride_kn, stride_vn, stride_mn, 0, 0, 1, 0, 0, 0, 0,
        seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
        HEAD_DIM, BLOCK_D, QK_CHUNKS, HEAD_DIM_V, BLOCK_DV, BLOCK_N, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_PER_KEY, HAS_SOFTCAP, NOT_PAGED,
        INT64_INDEX, DOT_PRECISION, HAS_ALIBI, SCALE_NONE, SCALE_NONE, 1.0)

    out, lse = finalize(acc, m_i, l_i)
    row_ok = rows < seqlen_q
    o_ptrs = (Out + off_b * stride_ob + off_h * stride_oh + (q_start + rows[:, None]) * stride_om
              + dv_idx[None, :] * stride_od)
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & (dv_idx < HEAD_DIM_V)[None, :])
    if RETURN_LSE and tl.program_id(2) == 0:  # every column block computes the same lse
        tl.store(Lse + off_b * stride_lb + off_h * stride_lh + (q_start + rows) * stride_lm, lse, mask=row_ok)


# (block_m, block_n, num_warps, num_stages) by padded head dim (the wider of q/k's and v's), for 2-byte inputs, from
# the tile sweep on an H100 (benchmarks/sweep_prefill_tiles.py, benchmarks/NOTES.md); fp32 inputs halve block_n
# (twice the bytes per element).
_CONFIGS = {
    16: (128, 64, 8, 3),
    32: (128, 64, 8, 3),
    64: (128, 64, 8, 3),
    128: (128, 64, 8, 3),
    256: (128, 64, 8, 2),
}
# q/k head dims past 256 (chunked q @ k^T): a stage holds every chunk of a key block (576 x 32 x 2 bytes for
# MLA's 576) beside its 256 value columns. Not swept yet (benchmarks/NOTES.md, "Head dims").
_CHUNKED_CONFIG = (64, 32, 8, 2)
# Under TRITON_INTERPRET each program runs as numpy on the CPU: small blocks keep tests fast.
_INTERPRETER_CONFIG = (64, 64, 4, 1)


_prefill = Launcher(_prefill_kernel)


@functools.lru_cache(maxsize=1024)
def _plan(head_dim, head_dim_v, dtype, interpreted, config, window, mask_kind, mask_per_key, softcap, return_lse,
          varlen, int64_index, alibi=False, sinks=False):
    """Everything a launch needs that depends only on the call's signature: ``(block_m, dv_blocks, num_warps,
    num_stages, constexprs)``. Cached, so a call repeats none of it (host time decides short prefills and decode)."""
    block_d, qk_chunks = qk_head_dim_tiling(head_dim)
    block_dv, dv_blocks = v_head_dim_tiling(head_dim_v)
    if config is not None:
        block_m, block_n, num_warps, num_stages = config
    elif interpreted:
        block_m, block_n, num_warps, num_stages = _INTERPRETER_CONFIG
    else:
        block_m, block_n, num_warps, num_stages = _CONFIGS[max(block_d, block_dv)] if qk_chunks == 1 else _CHUNKED_CONFIG
        if dtype == torch.float32:
            block_n = max(16, block_n // 2)
            num_stages = min(num_stages, 2)
    left, right = window
    constexprs = _prefill.constexprs(
        HEAD_DIM=head_dim, BLOCK_D=block_d, QK_CHUNKS=qk_chunks, HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv,
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, MASK_KIND=mask_kind,
        MASK_PER_KEY=mask_per_key, HAS_SOFTCAP=softcap, RETURN_LSE=return_lse, IS_VARLEN=varlen,
        INT64_INDEX=int64_index, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", HAS_ALIBI=alibi,
        HAS_SINKS=sinks)
    return block_m, dv_blocks, num_warps, num_stages, constexprs


def _prepare(q, k, v, out, lse, strides, batch, sq, sk, varlen, *, window, scale, softcap, mask, alibi_slopes, sinks,
             return_lse, config):
    """The :class:`Launch` of a dense or varlen call (everything but its tensors, see :func:`_tensors`).
    ``strides`` gives q/k/v/out/lse strides as (batch, head, token, dim) tuples (lse: batch, head, token);
    ``sq``/``sk`` size the grid."""
    hq = q.shape[-2 if varlen else 1]
    hkv = k.shape[-2 if varlen else 1]
    mask_kind, mask_per_key, mask_arg, mask_strides = mask_arguments(mask, placeholder=q, row_dims=(2,))
    block_m, dv_blocks, num_warps, num_stages, constexprs = _plan(
        q.shape[-1], v.shape[-1], q.dtype, q.device.type == "cpu", config, window, mask_kind, mask_per_key, softcap is not None,
        return_lse, varlen, needs_int64_index(q, k, v, out, mask_arg), alibi_slopes is not None, sinks is not None)
    left, right = window
    # The kernel reads slopes at unit head stride (the tensors passes them contiguous), per sequence when [B, Hq].
    alibi_batch_stride = alibi_slopes.shape[1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    return _prefill.prepare(
        (cdiv(sq, block_m), batch * hq, dv_blocks),
        (*strides["q"], *strides["k"], *strides["v"], *strides["out"], *strides["lse"], *mask_strides,
         alibi_batch_stride, hq, hq // hkv, sq, sk, max(left, 0), max(right, 0)),
        (scale, softcap or 1.0), constexprs, num_warps, num_stages)


def _tensors(q, k, v, out, lse, mask, cu_seqlens, alibi_slopes, sinks):
    """The kernel's tensor arguments (q stands in for the absent ones, never read)."""
    cu_q, cu_k = cu_seqlens or (q, q)
    return (q, k, v, out, lse, mask_tensor(mask, q), cu_q, cu_k,
            q if alibi_slopes is None else alibi_slopes.contiguous(), q if sinks is None else sinks.contiguous())


class PrefillPlan(NamedTuple):
    """A prefill launch prepared for one call signature (:func:`prefill_plan`): :meth:`run` launches it with a
    call's tensors, which must have that signature (shapes, strides, dtypes, device, options)."""

    launch: Launch
    return_lse: bool

    def run(self, q, k, v, mask=None, alibi_slopes=None, sinks=None, out=None):
        """``(out, lse or None)`` as :func:`prefill_attention` returns them."""
        out = output_like(q, v.shape[-1]) if out is None else out
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32) if self.return_lse else out
        _prefill.launch(self.launch, _tensors(q, k, v, out, lse, mask, None, alibi_slopes, sinks))
        return out, (lse if self.return_lse else None)


def prefill_plan(q, k, v, *, window, scale, softcap=None, mask=None, alibi_slopes=None, sinks=None,
                 return_lse=False, out=None, config=None) -> PrefillPlan | HopperPlan:
    """The :class:`PrefillPlan` of a :func:`prefill_attention` call (its arguments), cached by signature; a
    :class:`~tileattn.kernels.hopper.HopperPlan` (same interface) where the Hopper kernel takes the call and no
    ``config`` asks for the portable kernel's tiles."""
    key = (q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), v.shape[-1], v.stride(),
           None if out is None else out.stride(), None if mask is None else (mask.shape, mask.stride(), mask.dtype),
           None if alibi_slopes is None else alibi_slopes.shape, sinks is not None,
           tuple(window), scale, softcap, return_lse, None if config is None else tuple(config))
    plan = _plans.get(key)
    if plan is None:
        out = output_like(q, v.shape[-1]) if out is None else out  # the strides every call's output will have
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32) if return_lse else out
        strides = dict(q=q.stride(), k=k.stride(), v=v.stride(), out=out.stride(), lse=lse.stride()[:3])
        plan = PrefillPlan(_prepare(q, k, v, out, lse, strides, q.shape[0], q.shape[2], k.shape[2], False,
                                    window=window, scale=scale, softcap=softcap, mask=mask, alibi_slopes=alibi_slopes,
                                    sinks=sinks, return_lse=return_lse, config=config), return_lse)
        if config is None and hopper_unsupported_reason(q, k, v, window=window, softcap=softcap, mask=mask,
                                                        alibi_slopes=alibi_slopes, sinks=sinks, out=out) is None:
            plan = HopperPlan(q, k, v, out, causal=window[1] == 0, scale=scale, return_lse=return_lse, portable=plan)
        _plans.remember(key, plan)
    return plan


_plans = PlanCache()  # dense calls' plans by call signature


def prefill_attention(
    q, k, v, *, window=(-1, -1), scale, softcap=None, mask=None, alibi_slopes=None, sinks=None, return_lse=False,
    out=None, config=None,
):
    """Launch the prefill kernel. Inputs are already validated (see :func:`tileattn.attention`).

    Args:
        q: ``[B, Hq, Sq, D]``; k: ``[B, Hkv, Sk, D]``; v: ``[B, Hkv, Sk, D_v]``; fp16, bf16 or fp32, any strides;
            D up to 576, D_v up to 512.
        window: ``(left, right)`` key offsets around the bottom-right diagonal, -1 = unbounded
            (causal already folded in as ``right = 0``).
        scale: softmax scale; softcap: tanh cap of the scaled scores or None.
        mask: None, or a bool (True = attend) / float (added) tensor expanded to ``[B, Hq, Sq, Sk]``.
        alibi_slopes: None or fp32 ``[Hq]`` / ``[B, Hq]``; sinks: None or ``[Hq]`` (see ``tileattn.reference``).
        out: optional ``[B, Hq, Sq, D_v]`` output tensor (any strides); allocated like ``q`` if None (contiguous
            when ``D_v != D``).
        config: ``(block_m, block_n, num_warps, num_stages)`` instead of the tuned table (tests use
            small tiles to put block edges everywhere; the tile sweep in ``benchmarks/`` times others).
    Returns:
        ``(out, lse)``; lse is fp32 ``[B, Hq, Sq]`` (natural log), or None unless ``return_lse``.
    """
    plan = prefill_plan(q, k, v, window=window, scale=scale, softcap=softcap, mask=mask, alibi_slopes=alibi_slopes,
                        sinks=sinks, return_lse=return_lse, out=out, config=config)
    return plan.run(q, k, v, mask, alibi_slopes, sinks, out)


def prefill_attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, window=(-1, -1), scale, softcap=None,
    alibi_slopes=None, sinks=None, return_lse=False, out=None, config=None,
):
    """Packed sequences: q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v ``[total_k, Hkv, D_v]``, int32
    ``cu_seqlens_*`` ``[batch + 1]``. Returns ``(out [total_q, Hq, D_v], lse fp32 [Hq, total_q] or None)``."""
    def bhsd(t):  # token-major strides as (batch = 0, head, token, dim): sequences are offsets on the token axis
        return (0, t.stride(1), t.stride(0), t.stride(2))

    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()  # read at unit stride
    out = output_like(q, v.shape[-1]) if out is None else out
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device, dtype=torch.float32) if return_lse else out
    lse_strides = (0, lse.stride(0), lse.stride(1)) if return_lse else (0, 0, 0)
    strides = dict(q=bhsd(q), k=bhsd(k), v=bhsd(v), out=bhsd(out), lse=lse_strides)
    launch = _prepare(q, k, v, out, lse, strides, cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, True,
                      window=window, scale=scale, softcap=softcap, mask=None, alibi_slopes=alibi_slopes, sinks=sinks,
                      return_lse=return_lse, config=config)
    _prefill.launch(launch, _tensors(q, k, v, out, lse, None, (cu_seqlens_q, cu_seqlens_k), alibi_slopes, sinks))
    return out, (lse if return_lse else None)
