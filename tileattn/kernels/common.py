"""Triton helpers shared by the attention kernels: which keys a query block sees, the scores in
log2 units, the online-softmax update and the final normalization.

The semantics are those of :mod:`tileattn.reference`: ``diag = Sk - Sq`` aligns the last query
with the last key, and query ``i`` sees key ``j`` iff ``i + diag - left <= j <= i + diag + right``
(each side only when bounded; causal is ``right = 0``).

Scores are kept in log2 units (``s * log2(e)``) so the softmax uses ``exp2``, one MUFU op; the
softmax scale and ``log2(e)`` are folded into a single multiply of the ``q @ k^T`` tile.
"""

import math

import torch
import triton
import triton.language as tl

from .. import quant

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# Mask kinds (constexpr switches of the kernels).
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_ADDITIVE = tl.constexpr(2)

# K/V addressing (constexpr switch): one contiguous run of keys, or pages looked up per tile / per key.
NOT_PAGED = tl.constexpr(0)
PAGED_PER_TILE = tl.constexpr(1)
PAGED_PER_KEY = tl.constexpr(2)


# Scales of an fp8 KV cache (constexpr switch; :mod:`tileattn.quant`'s granularities as a program reads them): none
# (a cache in q's dtype), one per program (per tensor, or per KV head ``[Hkv]`` / ``[B, Hkv]``: one value for all the
# keys a program reads), or one per token and KV head (the cache's layout without the head dim).
SCALE_NONE = tl.constexpr(0)
SCALE_PER_PROGRAM = tl.constexpr(1)
SCALE_PER_TOKEN = tl.constexpr(2)
# quant.amax_scale's threshold: a computed scale below fp32's smallest normal becomes 1.0.
SMALLEST_SCALE = tl.constexpr(quant.SMALLEST_SCALE)
FP16_SAFE_WEIGHT = tl.constexpr(32768.0)  # weights p * scale (p <= 1) up to this stay finite in fp16 (max 65504)
FP8_NAN_BITS = tl.constexpr(0x7F)  # the NaN torch stores for a positive NaN, in e4m3fn and e5m2 alike


# Host-side integer helpers for the launchers. triton.cdiv and triton.next_power_of_2 work on the host too, but
# as Triton functions they cost ~3 us a call there (measured on the H100 host), and a decode launch made seven.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# Head dims past 256 do not fit a register-resident q row and accumulator: q @ k^T is summed over head-dim chunks of
# QK_CHUNK_WIDTH columns (q reloaded per chunk, from L1/L2), and the output's columns are cut into blocks of at most
# MAX_BLOCK_DV, one program each (they recompute the same scores).
QK_CHUNK_WIDTH = 64
MAX_BLOCK_DV = 256


def qk_head_dim_tiling(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D, QK_CHUNKS)`` for a q/k head dim: the whole padded row in one chunk up to 256, else chunks of
    128 (head dims divisible by 128) or :data:`QK_CHUNK_WIDTH` columns, the last one masked where they do not
    divide it."""
    if head_dim <= 256:
        return max(16, next_power_of_2(head_dim)), 1
    width = 128 if head_dim % 128 == 0 else QK_CHUNK_WIDTH
    return width, cdiv(head_dim, width)


def v_head_dim_tiling(head_dim_v: int, max_block: int = MAX_BLOCK_DV) -> tuple[int, int]:
    """``(BLOCK_DV, DV_BLOCKS)``: output columns per program (at most ``max_block``) and programs per output row."""
    block_dv = min(max(16, next_power_of_2(head_dim_v)), max_block)
    return block_dv, cdiv(head_dim_v, block_dv)


def output_like(q: torch.Tensor, head_dim_v: int) -> torch.Tensor:
    """The output of a call: q's memory layout when v's head dim equals q's, else contiguous ``[..., D_v]``."""
    if q.shape[-1] == head_dim_v:
        return torch.empty_like(q)
    return q.new_empty((*q.shape[:-1], head_dim_v))


def needs_int64_index(*tensors) -> bool:
    """Whether an element offset inside one of these views may reach 2^31, so that the kernels must compute token
    offsets (index x stride) in 64 bits (``INT64_INDEX``). A view's offsets from its data pointer stay below its
    storage's size, so that is the test: one attribute read, where the exact extent costs a loop over the dims."""
    for t in tensors:
        if t.untyped_storage().nbytes() >= t.element_size() << 31:
            return True
    return False


def mask_arguments(mask, placeholder, row_dims):
    """Host side: ``(MASK_KIND, MASK_PER_KEY, tensor, 4 strides)`` for a kernel's optional ``[B, H, Sq, Sk]``
    mask view. ``MASK_PER_KEY``: the mask does not vary over ``row_dims`` (the dims a kernel's tile rows span,
    e.g. a padding mask seen as ``[B, 1, 1, Sk]``), so the kernel loads one ``[BLOCK_N]`` row per key block
    instead of a ``[BLOCK_M, BLOCK_N]`` gather. Bool masks are read as bytes (Triton has no bool pointers);
    without a mask ``placeholder`` stands in."""
    if mask is None:
        return MASK_NONE.value, False, placeholder, (0, 0, 0, 0)
    per_key = all(mask.stride(dim) == 0 or mask.shape[dim] == 1 for dim in row_dims)
    kind = MASK_BOOL.value if mask.dtype == torch.bool else MASK_ADDITIVE.value
    mask = mask_tensor(mask, placeholder)
    return kind, per_key, mask, mask.stride()


def mask_tensor(mask, placeholder):
    """The tensor a kernel reads for an optional mask: bool masks as bytes (Triton has no bool pointers);
    without a mask ``placeholder`` stands in."""
    if mask is None:
        return placeholder
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def scale_arguments(scale, placeholder):
    """Host side: ``(mode, tensor, (stride_b, stride_h, stride_n))`` for a kernel's optional fp8 cache scale
    (fp32, validated by the API; see :mod:`tileattn.quant`), ``mode`` one of the ``SCALE_*`` switches. The three
    strides address the scale of sequence (or page) ``b``, KV head ``h``, token (or slot) ``n``; a dim the scale does
    not have gets stride 0: 0-d ``()``, ``[Hkv]`` ``(0, s0, 0)``, ``[B, Hkv]`` ``(s0, s1, 0)``, per token ``[B, Hkv,
    S_max]`` or ``[num_pages, Hkv, page_size]`` its own strides. Without a scale ``placeholder`` stands in."""
    if scale is None:
        return SCALE_NONE.value, placeholder, (0, 0, 0)
    if scale.dim() == 3:
        return SCALE_PER_TOKEN.value, scale, scale.stride()
    strides = {0: (0, 0, 0), 1: (0, *scale.stride(), 0), 2: (*scale.stride(), 0)}[scale.dim()]
    return SCALE_PER_PROGRAM.value, scale, strides


def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 cache format (:data:`tileattn.quant.FP8_MAX`); 0.0 for other dtypes (a
    cache the kernels never quantize into)."""
    return quant.FP8_MAX.get(dtype, 0.0)


def token_scale_headroom(dtype: torch.dtype) -> float:
    """The power of two a program multiplies per-token V scales by before the ``P @ V`` dot (and divides the
    accumulator by afterwards, exactly): ``2 ** floor(log2(FP8_MAX))``, 256 for e4m3fn and 32768 for e5m2, else 1.

    The dot takes ``p * scale`` in q's dtype. A per-token scale is ``amax / FP8_MAX``, about 5e-5 for unit-sized
    values in e5m2, so ``p * scale`` would fall into fp16's subnormals (below 6.1e-5) and lose its precision; times
    the headroom it is ``p * amax * 0.57``, in the range of the values themselves (fp16 ones stay below 37449)."""
    largest = fp8_max(dtype)
    return 2.0 ** math.floor(math.log2(largest)) if largest else 1.0


@triton.jit
def key_block_ranges(
    row_lo, row_hi, seqlen_k, diag, window_left, window_right,
    BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Split the keys that queries ``row_lo..row_hi`` (inclusive) may see into three block-aligned
    ranges ``[lo, full_lo) [full_lo, full_hi) [full_hi, hi)``: the middle one is visible to every row
    of the block (no elementwise masking), the outer ones need it. Blocks outside ``[lo, hi)`` are
    masked for every row and are never loaded (causal and sliding-window skipping)."""
    lo = 0
    hi = seqlen_k
    full_lo = 0
    full_hi = seqlen_k
    if HAS_LEFT:
        lo = tl.maximum(row_lo + diag - window_left, 0)
        full_lo = tl.maximum(row_hi + diag - window_left, 0)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(row_hi + diag + window_right + 1, 0), seqlen_k)
        full_hi = tl.minimum(tl.maximum(row_lo + diag + window_right + 1, 0), seqlen_k)
    lo = (lo // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK_N) * BLOCK_N, hi)
    full_lo = tl.maximum(full_lo, lo)
    full_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def load_tile(ptrs, idx_s, idx_d, seqlen, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              CHECK_S: tl.constexpr):
    """Load a Q/K/V tile whose sequence and head-dim indices broadcast as ``idx_s``, ``idx_d`` (a chunk of
    ``BLOCK_D`` columns of a ``HEAD_DIM``-wide row). Bounds are checked only where they can fail, so interior tiles
    of a head dim that the chunks divide are plain unmasked (vectorized) loads; padded head-dim columns and rows
    past ``seqlen`` read 0."""
    if CHECK_S:
        if HEAD_DIM % BLOCK_D == 0:
            tile = tl.load(ptrs, mask=idx_s < seqlen, other=0.0)
        else:
            tile = tl.load(ptrs, mask=(idx_s < seqlen) & (idx_d < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM % BLOCK_D == 0:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=idx_d < HEAD_DIM, other=0.0)
    return tile


@triton.jit
def load_key_scales(ptrs, cols, seqlen_k, CHECK_S: tl.constexpr):
    """Per-token scales of a key block (``ptrs``: ``[BLOCK_N]``, key indices ``cols``); keys past ``seqlen_k`` (only
    in ``CHECK_S`` blocks) read 0, so they add nothing even where their slot holds an unwritten scale."""
    if CHECK_S:
        return tl.load(ptrs, mask=cols < seqlen_k, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def pow2_at_least(x):
    """The least power of two >= ``x`` (fp32 scalar), and at least 1: rounds the bits' exponent up; NaN gives 1."""
    bits = (x.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000
    return tl.maximum(bits.to(tl.float32, bitcast=True), 1.0)


@triton.jit
def fp8_token_scales(amax, FP8_MAX: tl.constexpr):
    """:func:`tileattn.quant.amax_scale` of ``amax`` (fp32, each token's largest finite magnitude): ``amax /
    FP8_MAX`` correctly rounded, or 1.0 where that is below fp32's smallest normal (``amax`` 0 included)."""
    scale = tl.math.div_rn(amax, FP8_MAX)
    return tl.where(scale >= SMALLEST_SCALE, scale, 1.0)


@triton.jit
def quantize_fp8(x, scale, FP8_MAX: tl.constexpr, FP8_TYPE: tl.constexpr):
    """``x`` (fp32) stored in ``FP8_TYPE`` at ``scale`` (broadcast against ``x``) by :func:`tileattn.quant.quantize`'s
    rule: the correctly rounded quotient ``x / scale``, saturated to ``+-FP8_MAX``, rounded to nearest even; NaN
    where ``x`` is NaN or infinite (or the quotient is NaN: 0 / 0). The NaN is written as its byte, the one torch
    stores, rather than left to the conversion: the interpreter's fp8 narrowing does not produce NaN codes."""
    quotient = tl.math.div_rn(x, scale)
    saturated = tl.minimum(tl.maximum(quotient, -FP8_MAX), FP8_MAX)
    bits = saturated.to(FP8_TYPE, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
    stored_nan = (quotient != quotient) | (tl.abs(x) == float("inf"))
    bits = tl.where(stored_nan, tl.full(bits.shape, FP8_NAN_BITS, tl.uint8), bits)
    return bits.to(FP8_TYPE, bitcast=True)


@triton.jit
def visibility(
    query_pos, key_pos, seqlen_k, diag, window_left, window_right,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
):
    """Bool tile, the broadcast of ``query_pos`` and ``key_pos`` (e.g. ``rows[:, None]`` and ``cols[None, :]``, or
    transposed): the key exists and lies inside the query's window."""
    visible = key_pos < seqlen_k
    rel = key_pos - (query_pos + diag)
    if HAS_LEFT:
        visible = visible & (rel >= -window_left)
    if HAS_RIGHT:
        visible = visible & (rel <= window_right)
    return visible


@triton.jit
def _tanh(x):
    # tanh through exp2, defined everywhere Triton runs (interpreter included); saturates to +-1.
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP: tl.constexpr):
    """``q @ k^T`` (fp32) -> logits in log2 units: ``s * scale * log2(e)``, or with softcap
    ``softcap * tanh(s * scale / softcap) * log2(e)``."""
    if HAS_SOFTCAP:
        return _tanh(qk * (sm_scale / softcap)) * (softcap * LOG2E)
    else:
        return qk * (sm_scale * LOG2E)


@triton.jit
def online_softmax_step(s, m_i, l_i, MAY_BE_EMPTY: tl.constexpr):
    """Fold a tile of logits ``s`` (log2 units, ``[M, N]``) into the running max ``m_i`` and
    denominator ``l_i``. Returns ``(p, alpha, m_new, l_new)``: the tile's unnormalized weights and
    the factor that rescales what was accumulated before. With ``MAY_BE_EMPTY`` (tiles with
    masked entries), a row whose logits are all ``-inf`` so far uses 0 as its max, so it gets
    weights 0 instead of ``exp2(-inf - -inf) = NaN``."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MAY_BE_EMPTY:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_new = l_i * alpha + tl.sum(p, 1)
    return p, alpha, m_new, l_new


@triton.jit
def initial_state(sinks_ptrs, rows_ok, with_sink, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
                  HAS_SINKS: tl.constexpr):
    """``(acc, m_i, l_i)`` before any key. With ``HAS_SINKS`` and ``with_sink`` (a scalar: the split that counts
    the sink) each row starts from its head's sink (``sinks_ptrs``, ``[M]`` pointers, read where ``rows_ok``): a key
    of logit ``sink`` and value 0, so ``(m, l) = (sink, 1)`` in log2 units; a row that then sees no key gives 0 and
    lse = sink. A NaN or ``+inf`` sink starts ``l`` at NaN (its rows are NaN, as for a NaN or ``+inf`` logit);
    ``-inf`` is no sink."""
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if HAS_SINKS:
        sink = tl.load(sinks_ptrs, mask=rows_ok, other=float("-inf")).to(tl.float32) * LOG2E
        sink = tl.where(with_sink, sink, float("-inf"))
        m_i = sink
        l_i = tl.where(sink == float("-inf"), 0.0, tl.where((sink != sink) | (sink == float("inf")), float("nan"), 1.0))
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    return acc, m_i, l_i


@triton.jit
def finalize(acc, m_i, l_i):
    """Normalized output and natural-log LSE; rows that saw no key give 0 and ``-inf`` (a NaN row keeps NaN in both:
    the test is ``l == 0``, which NaN fails)."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    return out, lse


@triton.jit
def _attend_key_blocks(
    acc, m_i, l_i, q, q_rows, q_rows_end, k_base, v_base, mask_base, block_table, alibi, k_scale_base, v_scale_base,
    start_n, end_n, q_pos, offs_n, offs_d, dv_idx,
    stride_qd, stride_kd, stride_kn, stride_vn, stride_mn, stride_kpage, stride_vpage, page_size,
    stride_ksn, stride_vsn, stride_kspage, stride_vspage,
    seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_CHUNKS: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, EDGE: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_ALIBI: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr, V_TOKEN_HEADROOM: tl.constexpr,
):
    """Fold key blocks ``start_n, start_n + BLOCK_N, ... < end_n`` into ``(acc, m_i, l_i)``.

    With ``QK_CHUNKS == 1``, ``q`` is the ``[M, BLOCK_D]`` query tile (registers); with more, ``q`` holds the
    ``[M, BLOCK_D]`` pointers of its first head-dim chunk, and each key block sums ``q @ k^T`` over the chunks,
    reloading q's (rows ``q_rows < q_rows_end``; chunk ``c`` is ``c * BLOCK_D * stride_qd`` further, K's
    ``c * BLOCK_D * stride_kd``). ``q_pos`` is the query position (0..Sq-1) of each row.
    ``k_base`` (``[BLOCK_D, 1]``) points at key 0 of this K/V head's first chunk, ``v_base`` (``[1, BLOCK_DV]``) at
    key 0's output columns ``dv_idx`` (a block of the ``HEAD_DIM_V`` value columns), the columns of ``acc``;
    key ``j`` lives ``j * stride`` further, or when paged in page ``block_table[j // page_size]`` at
    slot ``j % page_size`` (``PAGED_PER_TILE`` when ``page_size % BLOCK_N == 0``, else ``PAGED_PER_KEY``). ``EDGE`` blocks are masked elementwise by window and length; the
    others are visible to every row and skip that work. ``mask_base`` is the user mask at key 0: ``[M, 1]``
    pointers, or one pointer with ``MASK_PER_KEY``. ``INT64_INDEX``: key index x stride may pass 2^31.
    ``alibi`` (with ``HAS_ALIBI``): each row's ALiBi slope in log2 units, ``[M]``; the logit of key ``j`` loses
    ``slope * |j - (q_pos + diag)|``, its distance to the query's own position.

    fp8 caches: K tiles of another dtype than q's (an fp8 cache) are widened to q's dtype for ``q @ k^T``, V tiles
    to fp16 for ``P @ V`` (the weights too) with fp16 or bf16 q, or to fp32 with fp32 q; each is exact for e4m3fn
    and e5m2; per-token V scales that could take the weights past fp16's range are divided out of that tile's dot
    by a power of two and multiplied back. Scales one per program (``SCALE_PER_PROGRAM``) are the
    caller's to apply: K's folded into ``sm_scale``, V's on ``acc`` after the last key. With ``K_SCALE`` or
    ``V_SCALE`` ``SCALE_PER_TOKEN`` each key's own scale is read at ``k_scale_base`` / ``v_scale_base`` (key 0 of
    this head) plus the key's offset, computed as for K (``stride_ksn`` per key, or per slot with
    ``stride_kspage`` per page; V's likewise): K's multiplies the key's column of ``q @ k^T``, V's its column of
    the weights ``p`` in the ``P @ V`` dot only (``l_i`` sums the unscaled weights), times ``V_TOKEN_HEADROOM``
    (see :func:`token_scale_headroom`), which the caller divides ``acc`` by after the last key.
    """
    for start in range(start_n, end_n, BLOCK_N):
        cols = start + offs_n
        if INT64_INDEX:
            cols = cols.to(tl.int64)
        # (the per-token scales' offsets are dead code, removed by the compiler, unless K_SCALE / V_SCALE read them)
        if PAGED == PAGED_PER_TILE:  # the tile lies in one page: one page id, contiguous rows
            page = tl.load(block_table + start // page_size).to(tl.int64)
            slot = start % page_size + offs_n
            k_offs = page * stride_kpage + slot * stride_kn
            v_offs = page * stride_vpage + slot * stride_vn
            ks_offs = page * stride_kspage + slot * stride_ksn
            vs_offs = page * stride_vspage + slot * stride_vsn
        elif PAGED == PAGED_PER_KEY:
            page = tl.load(block_table + cols // page_size, mask=cols < seqlen_k, other=0).to(tl.int64)
            slot = cols % page_size
            k_offs = page * stride_kpage + slot * stride_kn
            v_offs = page * stride_vpage + slot * stride_vn
            ks_offs = page * stride_kspage + slot * stride_ksn
            vs_offs = page * stride_vspage + slot * stride_vsn
        else:
            k_offs = cols * stride_kn
            v_offs = cols * stride_vn
            ks_offs = cols * stride_ksn
            vs_offs = cols * stride_vsn
        # K is loaded transposed, [BLOCK_D, BLOCK_N], ready for q @ k^T; one chunk, or the sum over the chunks.
        for c in tl.static_range(QK_CHUNKS):
            dims = c * BLOCK_D + offs_d
            k = load_tile(k_base + c * BLOCK_D * stride_kd + k_offs[None, :], cols[None, :], dims[:, None], seqlen_k,
                          HEAD_DIM, BLOCK_D, EDGE)
            if QK_CHUNKS == 1:
                q_chunk = q
            else:
                q_chunk = load_tile(q + c * BLOCK_D * stride_qd, q_rows[:, None], dims[None, :], q_rows_end, HEAD_DIM,
                                    BLOCK_D, True)
            k = k.to(q_chunk.dtype)  # a no-op unless K is an fp8 cache
            if c == 0:
                qk = tl.dot(q_chunk, k, input_precision=DOT_PRECISION)
            else:
                qk = tl.dot(q_chunk, k, qk, input_precision=DOT_PRECISION)
        if K_SCALE == SCALE_PER_TOKEN:  # q . (k * scale) = (q . k) * scale: one multiply per score, not per element
            qk *= load_key_scales(k_scale_base + ks_offs, cols, seqlen_k, EDGE)[None, :]
        s = scores_log2(qk, sm_scale, softcap, HAS_SOFTCAP)
        if HAS_ALIBI:
            s -= alibi[:, None] * tl.abs(cols[None, :] - (q_pos[:, None] + diag)).to(tl.float32)
        if MASK_KIND != MASK_NONE:
            if MASK_PER_KEY:  # mask_base is one pointer: one row of BLOCK_N values serves every query row
                user_mask = tl.load(mask_base + cols * stride_mn, mask=cols < seqlen_k, other=0)[None, :]
            else:
                in_bounds = (q_pos < seqlen_q)[:, None] & (cols < seqlen_k)[None, :]
                user_mask = tl.load(mask_base + cols[None, :] * stride_mn, mask=in_bounds, other=0)
            if MASK_KIND == MASK_ADDITIVE:
                s = s + user_mask.to(tl.float32) * LOG2E
            else:
                s = tl.where(user_mask != 0, s, float("-inf"))
        if EDGE:
            visible = visibility(q_pos[:, None], cols[None, :], seqlen_k, diag, window_left, window_right, HAS_LEFT,
                                 HAS_RIGHT)
            s = tl.where(visible, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i, EDGE or MASK_KIND != MASK_NONE)
        v = load_tile(v_base + v_offs[:, None], cols[:, None], dv_idx[None, :], seqlen_k, HEAD_DIM_V, BLOCK_DV, EDGE)
        if v.dtype.is_fp8() and q_chunk.dtype != tl.float32:
            # An fp8 V tile widens to fp16 in one conversion per two values; to bf16 it takes five on Hopper (through
            # fp16 and fp32), which bounded the step (NOTES.md, session 16). The weights go to fp16 with it, finer
            # than bf16 over [2^-14, 1].
            v = v.to(tl.float16)
            if V_SCALE == SCALE_PER_TOKEN:
                # p @ (v * scale) = (p * scale) @ v: the [M, N] weights, not the [N, D_v] tile. Where the tile's
                # scales could take them past fp16's range, they and the accumulator are divided by a power of two
                # for this dot and multiplied back after it, both exactly.
                v_scales = load_key_scales(v_scale_base + vs_offs, cols, seqlen_k, EDGE) * V_TOKEN_HEADROOM
                shrink = pow2_at_least(tl.max(v_scales) * (1.0 / FP16_SAFE_WEIGHT))
                p_v = p * (v_scales / shrink)[None, :]
                acc = tl.dot(p_v.to(tl.float16), v, acc * (alpha / shrink)[:, None]) * shrink
            else:
                acc = tl.dot(p.to(tl.float16), v, acc * alpha[:, None])
        else:
            v = v.to(q_chunk.dtype)  # a no-op unless V is an fp8 cache (with fp32 q)
            if V_SCALE == SCALE_PER_TOKEN:
                p = p * (load_key_scales(v_scale_base + vs_offs, cols, seqlen_k, EDGE) * V_TOKEN_HEADROOM)[None, :]
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, m_i, l_i


@triton.jit
def attend_keys(
    acc, m_i, l_i, q, q_rows, q_rows_end, k_base, v_base, mask_base, block_table, alibi, k_scale_base, v_scale_base,
    lo, full_lo, full_hi, hi, q_pos, offs_n, offs_d, dv_idx,
    stride_qd, stride_kd, stride_kn, stride_vn, stride_mn, stride_kpage, stride_vpage, page_size,
    stride_ksn, stride_vsn, stride_kspage, stride_vspage,
    seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QK_CHUNKS: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASK_KIND: tl.constexpr, MASK_PER_KEY: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, PAGED: tl.constexpr, INT64_INDEX: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_ALIBI: tl.constexpr, K_SCALE: tl.constexpr, V_SCALE: tl.constexpr, V_TOKEN_HEADROOM: tl.constexpr,
):
    """Attend to keys ``[lo, hi)`` as cut by ``key_block_ranges``: the sliding window's left edge,
    the blocks every row sees (no elementwise masking), then the causal diagonal / window right
    edge / ragged end of K. Arguments as :func:`_attend_key_blocks`'s; a cache in q's dtype passes ``SCALE_NONE``
    for ``K_SCALE`` and ``V_SCALE`` (any pointers and strides for the scales, 1.0 for ``V_TOKEN_HEADROOM``)."""
    for part in tl.static_range(3):
        if part == 0:
            start_n = lo
            end_n = full_lo
        elif part == 1:
            start_n = full_lo
            end_n = full_hi
        else:
            start_n = full_hi
            end_n = hi
        acc, m_i, l_i = _attend_key_blocks(
            acc, m_i, l_i, q, q_rows, q_rows_end, k_base, v_base, mask_base, block_table, alibi, k_scale_base,
            v_scale_base, start_n, end_n, q_pos,
            offs_n, offs_d, dv_idx, stride_qd, stride_kd, stride_kn, stride_vn, stride_mn, stride_kpage, stride_vpage,
            page_size, stride_ksn, stride_vsn, stride_kspage, stride_vspage,
            seqlen_q, seqlen_k, diag, window_left, window_right, sm_scale, softcap,
            HEAD_DIM, BLOCK_D, QK_CHUNKS, HEAD_DIM_V, BLOCK_DV, BLOCK_N, part != 1, HAS_LEFT, HAS_RIGHT, MASK_KIND, MASK_PER_KEY, HAS_SOFTCAP,
            PAGED, INT64_INDEX, DOT_PRECISION, HAS_ALIBI, K_SCALE, V_SCALE, V_TOKEN_HEADROOM)
    return acc, m_i, l_i
