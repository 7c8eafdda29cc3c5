"""FlashAttention-2 backward for ``[B, H, S, D]`` tensors with any strides: gradients of q, k and v from the
forward's output and its logsumexp, recomputing the probabilities block by block (no ``Sq x Sk`` matrix).

With ``P = softmax(S)`` (``S`` the scaled, softcapped, masked logits) and ``dO`` the output's gradient:
``dV = P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O) - dlse`` (the softmax
Jacobian's row term; a gradient of the lse adds ``P * dlse``), then ``dQ = dS K * scale``, ``dK = dS^T Q * scale``
(times ``1 - tanh^2`` under softcap). Three launches:

1. ``_delta_kernel``: ``delta`` per query row, fp32.
2. ``_dkdv_kernel``: one program per (key block, batch, K/V head). It walks the query blocks that see its keys, for
   every query head of its GQA group, so a shared K/V head's gradient is summed over its group in registers.
3. ``_dq_kernel``: one program per (query block, batch, query head), over the key blocks it sees.

No atomics: every gradient element is written once by one program, so results are bitwise deterministic.
Accumulation is fp32; ``P`` and ``dS`` are rounded to the input dtype before their matrix products, as the
forward rounds ``P``.
"""

import torch
import triton
import triton.language as tl

from .common import (
    LOG2E, MASK_ADDITIVE, MASK_BOOL, MASK_NONE, _tanh, cdiv, key_block_ranges, load_tile, mask_tensor,
    needs_int64_index, next_power_of_2, visibility,
)


@triton.jit
def _probabilities(
    qk, query_pos, key_pos, lse_log2, mask_ptrs, alibi, seqlen_q, seqlen_k, diag, window_left, window_right,
    sm_scale, softcap, EDGE: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    """The forward's probabilities of a tile of raw scores ``qk`` (``q @ k^T``, or ``k @ q^T`` in the dK/dV kernel),
    recomputed from each row's lse (log2 units), and the softcap's derivative factor ``1 - tanh^2`` (1 without
    softcap). ``query_pos``, ``key_pos``, ``lse_log2`` and ``mask_ptrs`` broadcast to the tile's orientation; ``alibi``
    is the head's ALiBi slope in log2 units (``HAS_ALIBI``).
    ``EDGE`` tiles hold queries or keys outside the window or the lengths: those entries are 0; the other tiles are
    visible everywhere and skip that work."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (sm_scale / softcap))
        s = t * (softcap * LOG2E)
        factor = 1.0 - t * t
    else:
        s = qk * (sm_scale * LOG2E)
        factor = 1.0
    if HAS_ALIBI:  # a constant of the logits: no factor of its own in dS
        s -= alibi * tl.abs(key_pos - (query_pos + diag)).to(tl.float32)
    if MASK_KIND != MASK_NONE:
        user_mask = tl.load(mask_ptrs, mask=(query_pos < seqlen_q) & (key_pos < seqlen_k), other=0)
        if MASK_KIND == MASK_ADDITIVE:
            s = s + user_mask.to(tl.float32) * LOG2E
        else:
            s = tl.where(user_mask != 0, s, float("-inf"))
    if EDGE:
        visible = visibility(query_pos, key_pos, seqlen_k, diag, window_left, window_right, HAS_LEFT, HAS_RIGHT)
        s = tl.where(visible & (query_pos < seqlen_q), s, float("-inf"))
    return tl.exp2(s - lse_log2), factor


@triton.jit
def _row_terms(Lse, Delta, lse_offs, row_ok):
    """Each row's lse in log2 units (0 for a row that saw no key, whose probabilities are then all 0) and delta."""
    lse = tl.load(Lse + lse_offs, mask=row_ok, other=0.0)
    delta = tl.load(Delta + lse_offs, mask=row_ok, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse * LOG2E), delta


@triton.jit
def _delta_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    num_heads, seqlen_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr,
):
    off_b = (tl.program_id(1) // num_heads).to(tl.int64)
    off_h = (tl.program_id(1) % num_heads).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_tile(Out + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om + offs_d[None, :] * stride_od,
                  rows[:, None], offs_d[None, :], seqlen_q, HEAD_DIM, BLOCK_D, True)
    do = load_tile(DOut + off_b * stride_gb + off_h * stride_gh + rows[:, None] * stride_gm
                   + offs_d[None, :] * stride_gd, rows[:, None], offs_d[None, :], seqlen_q, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse_offs = off_b * stride_lb + off_h * stride_lh + rows * stride_lm
    if HAS_DLSE:  # d lse_i / d s_ij = P_ij: the lse's gradient joins dS as P * dlse
        delta -= tl.load(DLse + lse_offs, mask=rows < seqlen_q, other=0.0)
    tl.store(Delta + lse_offs, delta, mask=rows < seqlen_q)


@triton.jit
def _dkdv_query_blocks(
    dk, dv, k, v, q_base, do_base, mask_base, Lse, Delta, lse_base, alibi, start, end, offs_m, offs_d, cols,
    stride_qm, stride_gm, stride_lm, stride_mm, seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, EDGE: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    """Fold query blocks ``start, start + BLOCK_M, ... < end`` of one query head into this key block's ``dk``, ``dv``
    (``[BLOCK_N, BLOCK_D]``, fp32). Tiles are kept transposed, ``[BLOCK_N, BLOCK_M]`` (keys by queries), so that
    ``P^T`` and ``dS^T`` come out of their products in the orientation the next products take them, with no
    transpose of a register tile."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        if INT64_INDEX:
            rows = rows.to(tl.int64)
        q = load_tile(q_base + rows[:, None] * stride_qm, rows[:, None], offs_d[None, :], seqlen_q, HEAD_DIM, BLOCK_D,
                      EDGE)
        do = load_tile(do_base + rows[:, None] * stride_gm, rows[:, None], offs_d[None, :], seqlen_q, HEAD_DIM,
                       BLOCK_D, EDGE)
        lse_log2, delta = _row_terms(Lse, Delta, lse_base + rows * stride_lm, rows < seqlen_q)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        p_t, factor = _probabilities(
            qk_t, rows[None, :], cols[:, None], lse_log2[None, :], mask_base + rows[None, :] * stride_mm, alibi,
            seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap, EDGE, HAS_LEFT, HAS_RIGHT,
            MASK_KIND, HAS_SOFTCAP, HAS_ALIBI)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :]) * factor
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, Mask, Alibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ab,
    num_heads_kv, group_size, seqlen_q, seqlen_k, window_left, window_right,
    sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_b = (tl.program_id(1) // num_heads_kv).to(tl.int64)
    off_hkv = (tl.program_id(1) % num_heads_kv).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    if INT64_INDEX:
        cols = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = load_tile(K + off_b * stride_kb + off_hkv * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                  cols[:, None], offs_d[None, :], seqlen_k, HEAD_DIM, BLOCK_D, True)
    v = load_tile(V + off_b * stride_vb + off_hkv * stride_vh + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                  cols[:, None], offs_d[None, :], seqlen_k, HEAD_DIM, BLOCK_D, True)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # The queries that see these keys: i sees j iff j - diag - right <= i <= j - diag + left, the forward's rule
    # with queries and keys swapped (diag negated, the window's sides exchanged), so the forward's range helper
    # splits them into edge / fully visible / edge query blocks. Keys past seqlen_k only touch their own dK/dV
    # rows, which are not stored.
    diag = seqlen_k - seqlen_q
    col_hi = tl.minimum(start_n + BLOCK_N, seqlen_k) - 1
    q_lo, full_lo, full_hi, q_hi = key_block_ranges(start_n, col_hi, seqlen_q, -diag, window_right, window_left,
                                                     BLOCK_M, HAS_RIGHT, HAS_LEFT)
    for h in range(0, group_size):  # GQA: every query head of this K/V head's group
        off_h = off_hkv * group_size + h
        q_base = Q + off_b * stride_qb + off_h * stride_qh + offs_d[None, :] * stride_qd
        do_base = DOut + off_b * stride_gb + off_h * stride_gh + offs_d[None, :] * stride_gd
        mask_base = Mask + off_b * stride_mb + off_h * stride_mh + cols[:, None] * stride_mn
        lse_base = off_b * stride_lb + off_h * stride_lh
        alibi = 0.0
        if HAS_ALIBI:
            alibi = tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, mask_base, Lse, Delta, lse_base, alibi, q_lo, full_lo, offs_m, offs_d,
            cols, stride_qm, stride_gm, stride_lm, stride_mm, seqlen_q, seqlen_k, diag, window_left, window_right,
            sm_scale, softcap, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_SOFTCAP,
            INT64_INDEX, DOT_PRECISION, HAS_ALIBI)
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, mask_base, Lse, Delta, lse_base, alibi, full_lo, full_hi, offs_m, offs_d,
            cols, stride_qm, stride_gm, stride_lm, stride_mm, seqlen_q, seqlen_k, diag, window_left, window_right,
            sm_scale, softcap, HEAD_DIM, BLOCK_D, BLOCK_M, False, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_SOFTCAP,
            INT64_INDEX, DOT_PRECISION, HAS_ALIBI)
        dk, dv = _dkdv_query_blocks(
            dk, dv, k, v, q_base, do_base, mask_base, Lse, Delta, lse_base, alibi, full_hi, q_hi, offs_m, offs_d,
            cols, stride_qm, stride_gm, stride_lm, stride_mm, seqlen_q, seqlen_k, diag, window_left, window_right,
            sm_scale, softcap, HEAD_DIM, BLOCK_D, BLOCK_M, True, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_SOFTCAP,
            INT64_INDEX, DOT_PRECISION, HAS_ALIBI)

    col_ok = (cols < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(DK + off_b * stride_dkb + off_hkv * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * sm_scale).to(DK.dtype.element_ty), mask=col_ok)
    tl.store(DV + off_b * stride_dvb + off_hkv * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=col_ok)


@triton.jit
def _dq_key_blocks(
    dq, q, do, lse_log2, delta, k_base, v_base, mask_base, alibi, start, end, rows, offs_n, offs_d,
    stride_kn, stride_vn, stride_mn, seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    """Fold key blocks ``start, start + BLOCK_N, ... < end`` into this query block's ``dq`` (``[BLOCK_M, BLOCK_D]``,
    fp32). Query rows past seqlen_q only touch their own dQ rows, which are not stored."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        if INT64_INDEX:
            cols = cols.to(tl.int64)
        k = load_tile(k_base + cols[:, None] * stride_kn, cols[:, None], offs_d[None, :], seqlen_k, HEAD_DIM, BLOCK_D,
                      EDGE)
        v = load_tile(v_base + cols[:, None] * stride_vn, cols[:, None], offs_d[None, :], seqlen_k, HEAD_DIM, BLOCK_D,
                      EDGE)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p, factor = _probabilities(
            qk, rows[:, None], cols[None, :], lse_log2[:, None], mask_base + cols[None, :] * stride_mn, alibi,
            seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap, EDGE, HAS_LEFT, HAS_RIGHT,
            MASK_KIND, HAS_SOFTCAP, HAS_ALIBI)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None]) * factor
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, Mask, Alibi,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_lb, stride_lh, stride_lm,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ab,
    num_heads_q, group_size, seqlen_q, seqlen_k, window_left, window_right,
    sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_ALIBI: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    off_b = (tl.program_id(1) // num_heads_q).to(tl.int64)
    off_h = (tl.program_id(1) % num_heads_q).to(tl.int64)
    off_hkv = off_h // group_size
    rows = start_m + tl.arange(0, BLOCK_M)
    if INT64_INDEX:
        rows = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                  rows[:, None], offs_d[None, :], seqlen_q, HEAD_DIM, BLOCK_D, True)
    do = load_tile(DOut + off_b * stride_gb + off_h * stride_gh + rows[:, None] * stride_gm
                   + offs_d[None, :] * stride_gd, rows[:, None], offs_d[None, :], seqlen_q, HEAD_DIM, BLOCK_D, True)
    lse_log2, delta = _row_terms(Lse, Delta, off_b * stride_lb + off_h * stride_lh + rows * stride_lm,
                                 rows < seqlen_q)
    k_base = K + off_b * stride_kb + off_hkv * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + off_b * stride_vb + off_hkv * stride_vh + offs_d[None, :] * stride_vd
    mask_base = Mask + off_b * stride_mb + off_h * stride_mh + rows[:, None] * stride_mm
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    alibi = 0.0
    if HAS_ALIBI:
        alibi = tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E

    diag = seqlen_k - seqlen_q
    row_hi = tl.minimum(start_m + BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = key_block_ranges(start_m, row_hi, seqlen_k, diag, window_left, window_right, BLOCK_N,
                                                HAS_LEFT, HAS_RIGHT)
    dq = _dq_key_blocks(
        dq, q, do, lse_log2, delta, k_base, v_base, mask_base, alibi, lo, full_lo, rows, offs_n, offs_d, stride_kn,
        stride_vn, stride_mn, seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap, HEAD_DIM,
        BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_SOFTCAP, INT64_INDEX, DOT_PRECISION, HAS_ALIBI)
    dq = _dq_key_blocks(
        dq, q, do, lse_log2, delta, k_base, v_base, mask_base, alibi, full_lo, full_hi, rows, offs_n, offs_d, stride_kn,
        stride_vn, stride_mn, seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap, HEAD_DIM,
        BLOCK_D, BLOCK_N, False, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_SOFTCAP, INT64_INDEX, DOT_PRECISION, HAS_ALIBI)
    dq = _dq_key_blocks(
        dq, q, do, lse_log2, delta, k_base, v_base, mask_base, alibi, full_hi, hi, rows, offs_n, offs_d, stride_kn,
        stride_vn, stride_mn, seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap, HEAD_DIM,
        BLOCK_D, BLOCK_N, True, HAS_LEFT, HAS_RIGHT, MASK_KIND, HAS_SOFTCAP, INT64_INDEX, DOT_PRECISION, HAS_ALIBI)

    tl.store(DQ + off_b * stride_dqb + off_h * stride_dqh + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=(rows < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :])


# Tiles by padded head dim for 2-byte inputs, one per kernel, each (block_m, block_n, num_warps, num_stages): the dK/dV
# kernel keeps [block_n, D] accumulators and streams query blocks, the dQ kernel the other way round. These are the
# tiles the GPU test grid validated; benchmarks/NOTES.md ("Backward") has the sweep and the faster candidates still to
# validate. fp32 halves the blocks. The interpreter runs small blocks (fast tests).
_CONFIGS = {
    16: ((64, 64, 4, 2), (64, 64, 4, 2)),
    32: ((64, 64, 4, 2), (64, 64, 4, 2)),
    64: ((64, 128, 8, 2), (128, 64, 8, 2)),
    128: ((64, 64, 4, 2), (128, 64, 8, 3)),
    256: ((32, 64, 4, 1), (64, 32, 4, 1)),
}
_INTERPRETER_CONFIG = ((16, 16, 4, 1), (16, 16, 4, 1))


def _config(block_d, dtype, interpreted):
    if interpreted:
        return _INTERPRETER_CONFIG
    tiles = _CONFIGS[block_d]
    if dtype == torch.float32:
        tiles = tuple((max(16, m // 2), max(16, n // 2), warps, stages) for m, n, warps, stages in tiles)
    return tiles


def attention_backward(grad_out, q, k, v, out, lse, *, grad_lse=None, window=(-1, -1), scale, softcap=None,
                       mask=None, alibi_slopes=None, sinks=None, config=None):
    """``(dq, dk, dv, dsinks)`` of :func:`tileattn.kernels.prefill.prefill_attention`'s output (inputs already
    validated).

    Args:
        grad_out: ``[B, Hq, Sq, D]``, the output's gradient; q, k, v, out: the forward's tensors (fp16, bf16 or
            fp32, any strides, ``D == D_v <= 256``); lse: its fp32 natural-log logsumexp ``[B, Hq, Sq]``.
        grad_lse: optional fp32 ``[B, Hq, Sq]``, the lse's gradient.
        window, scale, softcap, mask, alibi_slopes, sinks: as the forward had them (``mask`` expanded to
            ``[B, Hq, Sq, Sk]``; the mask and the slopes get no gradient).
        config: ``((block_m, block_n, num_warps, num_stages) of the dK/dV kernel, (...) of the dQ kernel)`` instead
            of the default.
    Returns:
        ``dq``, ``dk``, ``dv`` with q's, k's and v's shapes, dtypes and (for dense tensors) layouts, and the sinks'
        gradient (sinks' shape and dtype; None without sinks). A sink joins every row's denominator and carries no
        value, so ``d lse_i / d sink = P_sink_i = exp(sink - lse_i)`` and ``d out_i / d sink = -P_sink_i * out_i``:
        ``dsink = -sum_i P_sink_i * delta_i``, from the row terms alone (q, k, v's gradients take the sink in
        through the lse).
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    block_d = max(16, next_power_of_2(d))
    dkdv_tile, dq_tile = config or _config(block_d, q.dtype, q.device.type == "cpu")
    # lse, its gradient and delta are read with one set of [B, Hq, Sq] strides: all three dense.
    lse = lse.contiguous()
    delta = torch.empty((b, hq, sq), device=q.device, dtype=torch.float32)
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).expand(b, hq, sq).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta_rows = dq_tile[0]
    _delta_kernel[(cdiv(sq, delta_rows), b * hq)](
        out, grad_out, delta if grad_lse is None else grad_lse, delta, *out.stride(), *grad_out.stride(),
        *delta.stride(), hq, sq, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=delta_rows, HAS_DLSE=grad_lse is not None)

    mask_kind = 0 if mask is None else (MASK_BOOL.value if mask.dtype == torch.bool else MASK_ADDITIVE.value)
    mask_arg, mask_strides = mask_tensor(mask, q), (0, 0, 0, 0) if mask is None else mask.stride()
    slopes = q if alibi_slopes is None else alibi_slopes.contiguous()
    slopes_batch_stride = alibi_slopes.shape[1] if alibi_slopes is not None and alibi_slopes.dim() == 2 else 0
    left, right = window
    large = needs_int64_index(q, k, v, grad_out, dq, dk, dv) or (mask is not None and needs_int64_index(mask_arg))
    options = dict(HEAD_DIM=d, BLOCK_D=block_d, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, MASK_KIND=mask_kind,
                   HAS_SOFTCAP=softcap is not None, INT64_INDEX=large,
                   DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", HAS_ALIBI=alibi_slopes is not None)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *delta.stride())
    sizes = (hq // hkv, sq, sk, max(left, 0), max(right, 0), scale, softcap or 1.0)
    block_m, block_n, num_warps, num_stages = dkdv_tile
    _dkdv_kernel[(cdiv(sk, block_n), b * hkv)](
        q, k, v, grad_out, lse, delta, dk, dv, mask_arg, slopes, *strides, *dk.stride(), *dv.stride(), *mask_strides,
        slopes_batch_stride, hkv, *sizes, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages, **options)
    block_m, block_n, num_warps, num_stages = dq_tile
    _dq_kernel[(cdiv(sq, block_m), b * hq)](
        q, k, v, grad_out, lse, delta, dq, mask_arg, slopes, *strides, *dq.stride(), *mask_strides,
        slopes_batch_stride, hq, *sizes, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        num_stages=num_stages, **options)
    dsinks = None
    if sinks is not None:
        sink_probability = torch.exp(sinks.float()[None, :, None] - lse)
        sink_probability = torch.where(torch.isneginf(lse), 0.0, sink_probability)  # a -inf sink and no key
        dsinks = (-(sink_probability * delta).sum(dim=(0, 2))).to(sinks.dtype)
    return dq, dk, dv, dsinks
