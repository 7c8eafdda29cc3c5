"""Plain-PyTorch attention: the semantics every backend must reproduce.

Two implementations of the same function, both taking the public arguments of
:func:`tileattn.attention` (``q`` ``[B, Hq, Sq, D]``, ``k`` ``[B, Hkv, Sk, D]``, ``v`` ``[B, Hkv, Sk, D_v]``, any
strides; v's head dim may differ from q/k's, the output is ``[B, Hq, Sq, D_v]`` and the default scale ``D ** -0.5``):

* :func:`naive_attention` materializes the ``[B, Hq, Sq, Sk]`` score matrix. It is the
  "standard attention" baseline of our benchmarks, and, called on float64 inputs, the oracle
  of our tests.
* :func:`tiled_attention` is the FlashAttention algorithm written with PyTorch ops: it walks
  key/value blocks with an online softmax, so its extra memory is
  ``O(B * Hq * block_q * block_k)`` whatever the sequence lengths. It is backend ``"torch"``,
  which runs wherever PyTorch runs (CPU, CUDA, ROCm, MPS...).

Which keys a query sees (shared by every backend):
  ``diag = Sk - Sq`` aligns the last query with the last key (bottom-right, the KV-cache
  convention). With ``window = (left, right)`` (-1 = unbounded), query ``i`` sees key ``j`` iff
  ``i + diag - left <= j <= i + diag + right``; ``causal=True`` is ``right = 0``.
  A row that sees no key returns 0 with lse ``-inf``.

ALiBi and sinks (``alibi_slopes``, ``sinks``; shared by every backend that takes them):
  * ``alibi_slopes`` fp32 ``[Hq]`` or ``[B, Hq]`` adds ``-slope * |i + diag - j|`` to the logit of query ``i`` and
    key ``j`` (after softcap, before masks): the distance to the query's own position, bottom-right aligned.
    flash-attn adds ``slope * j`` instead under plain causal masking, the same softmax with an lse shifted by
    ``slope * (i + diag)`` per row; ``tileattn.flash_attn_compat`` returns flash-attn's lse.
  * ``sinks`` ``[Hq]``: one logit per head (in the units of the scaled scores) that joins every row's softmax
    denominator and attends to nothing: ``out = sum_j exp(s_j - lse) v_j`` with
    ``lse = log(exp(sink) + sum_j exp(s_j))``. A row that sees no key returns 0 with lse ``sink``; a NaN or
    ``+inf`` sink makes its head's rows NaN (out and lse, keys or none), as a NaN or ``+inf`` logit does; ``-inf``
    is no sink.

NaN and Inf (shared by every backend): the logits ``q @ k^T * scale`` (softcapped, plus an additive mask)
follow IEEE arithmetic, then for each query row:
  * a key whose logit is ``-inf`` is absent: masked out by causal, window or a bool mask (False), a ``-inf``
    additive bias on a score that is not NaN, or an infinite key driving the score to ``-inf``. Its weight is
    0 and its value is never read, so a NaN/Inf in an absent key or value reaches no output. A row whose
    keys are all absent returns 0 and lse ``-inf`` (even if its query holds NaN);
  * a NaN or ``+inf`` logit (a NaN in the query row or in a present key, an Inf in either that makes
    the score ``+inf`` or NaN, a NaN in the additive mask; note ``NaN + -inf`` is NaN: only a bool mask removes
    a key unconditionally) makes the whole output row NaN and its lse NaN (softmax of ``+inf`` is ``inf / inf``);
  * otherwise the output is ``sum_j p_j * v_j`` over the present keys with IEEE arithmetic: a NaN at
    ``v[j, d]`` makes ``out[d]`` NaN (even where ``p_j`` underflowed to 0), an Inf gives ``+-inf`` there
    (NaN for ``0 * inf`` or ``inf - inf``); the lse, computed from the logits alone, stays finite.
"""

from __future__ import annotations

import torch

from . import quant

__all__ = ["naive_attention", "tiled_attention", "varlen_attention", "kvcache_attention", "merge_attention",
           "window_bounds", "visible_keys", "gather_cache"]

UNBOUNDED = -1


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """LSE is fp32, or fp64 when computing in fp64 (so the float64 oracle keeps its precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def window_bounds(causal: bool, window) -> tuple[int, int]:
    """Fold ``causal`` and ``window`` into ``(left, right)`` key offsets, -1 meaning unbounded.

    ``causal`` is the window ``(-1, 0)``; with an explicit window it caps ``right`` at 0.
    """
    left, right = (UNBOUNDED, UNBOUNDED) if window is None else window
    left = UNBOUNDED if left is None or left < 0 else int(left)
    right = UNBOUNDED if right is None or right < 0 else int(right)
    if causal:
        right = 0 if right == UNBOUNDED else min(right, 0)
    return left, right


def visible_keys(rows: torch.Tensor, cols: torch.Tensor, diag: int, left: int, right: int):
    """Bool ``[len(rows), len(cols)]``: which keys ``cols`` each query ``rows`` may see, or None
    when every pair is visible. ``diag = Sk - Sq``."""
    if left == UNBOUNDED and right == UNBOUNDED:
        return None
    rel = cols[None, :] - (rows[:, None] + diag)  # key position relative to the query's diagonal
    visible = torch.ones_like(rel, dtype=torch.bool)
    if left != UNBOUNDED:
        visible &= rel >= -left
    if right != UNBOUNDED:
        visible &= rel <= right
    return visible


def alibi_bias(slopes, rows, cols, diag):
    """``-slope * |i + diag - j|`` for query rows ``rows`` and keys ``cols``: ``slopes [..., H]`` gives
    ``[..., H, len(rows), len(cols)]`` in the slopes' dtype."""
    distance = (cols[None, :] - (rows[:, None] + diag)).abs().to(slopes.dtype)
    return -slopes[..., None, None] * distance


def _scores_to_logits(scores, scale, softcap, mask, visible, bias=None):
    """Scaled (and optionally tanh-capped) scores plus ``bias`` (ALiBi), with the additive/boolean mask and the
    window applied."""
    scores = scores * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.to(scores.dtype)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    return scores


def values_known_finite(*tensors):
    """Whether ``tensors`` are known to hold no NaN/Inf: one min/max pass each (``aminmax`` propagates NaN),
    ``O(S * D)`` against attention's ``O(S^2 * D)``.

    Returns a Python bool (a host read: a sync on CUDA); while compiling, a 0-d bool tensor to branch on with
    ``torch.cond`` (a data-dependent ``if`` would break the graph); inside CUDA-graph capture, where no value
    can be read, False: the caller then takes its path that is right for any values.
    """
    nonempty = [t for t in tensors if t.numel()]  # aminmax has no identity for empty tensors
    if not nonempty:
        return True
    extremes = torch.stack([x for t in nonempty for x in torch.aminmax(t)])
    finite = torch.isfinite(extremes).all()
    if torch.compiler.is_compiling():
        return finite
    if extremes.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(finite)


def weighted_values(weights, logits, v, values_finite):
    """``weights @ v`` (``[..., M, N] @ [..., N, D]``, batch dims broadcast) over the keys present in each row
    (``logits > -inf``): the value of an absent key is never read, even where it is NaN or Inf.

    A matmul multiplies an absent key's weight 0 by its value, and ``0 * NaN`` is NaN: a NaN in a masked-out
    value would reach rows that never see it. ``values_finite`` (from :func:`values_known_finite` on ``v`` or
    the tensor it is cut from) says whether the plain matmul is exact; when it is not, see
    :func:`_weighted_values_over_present_keys`.
    """
    if isinstance(values_finite, torch.Tensor):  # while compiling: both branches are traced, one runs
        return torch.cond(values_finite, _weighted_values_plain, _weighted_values_over_present_keys,
                          (weights, logits, v))
    if values_finite:
        return _weighted_values_plain(weights, logits, v)
    return _weighted_values_over_present_keys(weights, logits, v)


def _weighted_values_plain(weights, logits, v):  # logits unused: torch.cond gives both branches the same operands
    return torch.matmul(weights, v)


def _weighted_values_over_present_keys(weights, logits, v):
    """The finite values through the matmul; the non-finite ones counted per output element over the present
    keys, each term ``weights[i, j] * v[j, d]`` giving what IEEE arithmetic gives: NaN for a NaN value or
    ``0 * inf``, ``+-inf`` for a positive weight times ``+-inf``, NaN where ``+inf`` and ``-inf`` meet. A NaN
    weight (a NaN row) is already NaN through the matmul."""
    finite = torch.isfinite(v)
    out = torch.matmul(weights, torch.where(finite, v, 0.0))
    present = logits != float("-inf")
    positive = weights > 0

    def any_term(rows, values):  # [..., M, D]: some key j with rows[i, j] and values[j, d]
        return torch.matmul(rows.to(v.dtype), values.to(v.dtype)) > 0

    pos_inf = any_term(positive, v == float("inf"))
    neg_inf = any_term(positive, v == float("-inf"))
    nan = (any_term(present, torch.isnan(v)) | any_term(present & (weights == 0), torch.isinf(v))
           | (pos_inf & neg_inf))
    out = torch.where(pos_inf, float("inf"), torch.where(neg_inf, float("-inf"), out))
    return torch.where(nan, float("nan"), out)


def _defaults(q, k, scale, mask):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if mask is not None:
        b, hq, sq, _ = q.shape
        mask = mask.expand(b, hq, sq, k.shape[-2])
    return scale, mask


def _per_batch(values, b):
    """``[H]`` or ``[B, H]`` as ``[b or 1, H]``, so it broadcasts over a batch of ``b``."""
    return values[None] if values.dim() == 1 else values


def _sink_logits(sinks, dtype):
    """``sinks [H]`` as ``[1, H, 1, 1]`` logits in ``dtype``."""
    return sinks.to(dtype)[None, :, None, None]


def naive_attention(
    q, k, v, *, causal=False, scale=None, mask=None, window=None, softcap=None, alibi_slopes=None, sinks=None,
    return_lse=False, compute_dtype=None,
):
    """Standard attention that materializes the ``[B, Hq, Sq, Sk]`` score matrix.

    Computes in ``compute_dtype`` (default: the input dtype, like eager attention in a model), so
    ``naive_attention(q.double(), ...)`` is the float64 oracle and ``naive_attention(q, ...)`` on fp16
    inputs is "PyTorch's own naive attention in the same low precision" of the tolerance rule.
    K/V heads are repeated for GQA, as eager attention does. ``v`` is scanned for NaN/Inf first (a host read on
    CUDA): hidden keys' values must not reach the output (see the module docstring).
    Returns ``out [B, Hq, Sq, D_v]`` (q's dtype) or ``(out, lse)`` with lse ``[B, Hq, Sq]``, fp32 (fp64 when
    computing in fp64).
    """
    scale, mask = _defaults(q, k, scale, mask)
    left, right = window_bounds(causal, window)
    dtype = compute_dtype or q.dtype
    sq, sk = q.shape[-2], k.shape[-2]
    group = q.shape[1] // k.shape[1]
    kf = k.to(dtype).repeat_interleave(group, dim=1)
    vf = v.to(dtype).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.to(dtype), kf.transpose(-1, -2))
    rows = torch.arange(sq, device=q.device)
    cols = torch.arange(sk, device=q.device)
    bias = None if alibi_slopes is None else alibi_bias(_per_batch(alibi_slopes, q.shape[0]).to(dtype), rows, cols,
                                                          sk - sq)
    logits = _scores_to_logits(scores, scale, softcap, mask, visible_keys(rows, cols, sk - sq, left, right), bias)
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    if sinks is not None:  # the sink joins the denominator: log(exp(sink) + sum_j exp(s_j))
        lse = torch.logaddexp(lse, _sink_logits(sinks, lse.dtype).expand_as(lse))
    # logsumexp is +inf on a row with a +inf logit (and no NaN); the row's output is NaN (inf / inf): so is its lse.
    lse = lse.masked_fill(lse == float("inf"), float("nan"))
    # exp(logits - lse) is NaN on rows that see nothing (-inf - -inf): those rows get weights 0.
    probs = torch.exp(logits - lse.masked_fill(lse == float("-inf"), 0.0))
    out = weighted_values(probs, logits, vf, values_known_finite(v)).to(q.dtype)
    if return_lse:
        return out, lse.squeeze(-1).to(lse_dtype(dtype))
    return out


def tiled_attention(
    q, k, v, *, causal=False, scale=None, mask=None, window=None, softcap=None, alibi_slopes=None, sinks=None,
    return_lse=False, block_q=256, block_k=512,
):
    """The FlashAttention algorithm in PyTorch ops (backend ``"torch"``).

    For each block of ``block_q`` queries, walks the key/value blocks that the window lets it see,
    keeping a running max ``m``, running denominator ``l`` and unnormalized output ``acc`` in fp32:
    when a block raises the max, the earlier sums are rescaled by ``exp(m_old - m_new)``. No
    ``Sq x Sk`` tensor exists; GQA is a broadcast over grouped query heads, never a K/V copy.
    Same arguments and result as :func:`naive_attention`, NaN/Inf included: a NaN or ``+inf`` logit makes
    ``m`` (or ``p``) NaN, which carries through ``l`` and ``acc`` to the row's output and lse. ``v`` is scanned
    once for NaN/Inf (a host read on CUDA), so that finite values take the plain matmul. The output
    ``[B, Hq, Sq, D_v]`` keeps q's memory layout when ``D_v == D``, else is contiguous.
    """
    scale, mask = _defaults(q, k, scale, mask)
    left, right = window_bounds(causal, window)
    b, hq, sq, d = q.shape
    hkv, sk, d_v = k.shape[1], k.shape[2], v.shape[-1]
    group = hq // hkv
    diag = sk - sq
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = _empty_output(q, d_v)
    lse = torch.empty(b, hq, sq, dtype=lse_dtype(q.dtype), device=q.device)
    # K/V as [B, Hkv, 1, Sk, D]: the singleton broadcasts over the G query heads of each group.
    k5, v5 = k.unsqueeze(2), v.unsqueeze(2)
    values_finite = values_known_finite(v)
    mask5 = None if mask is None else mask.view(b, hkv, group, sq, sk)
    slopes5 = None if alibi_slopes is None else _per_batch(alibi_slopes, b).to(acc_dtype).view(-1, hkv, group)
    # A sink is a key of logit `sink` and value 0 seen by every row: the running max starts at it, with weight 1.
    sink5 = None if sinks is None else sinks.to(acc_dtype).view(1, hkv, group, 1, 1)
    for q0 in range(0, sq, block_q):
        q1 = min(q0 + block_q, sq)
        # Query heads grouped by the K/V head they read: [B, Hkv, G, rows, D].
        qb = q[:, :, q0:q1].reshape(b, hkv, group, q1 - q0, d).to(acc_dtype)
        rows = torch.arange(q0, q1, device=q.device)
        m = torch.full((b, hkv, group, q1 - q0, 1), float("-inf"), dtype=acc_dtype, device=q.device)
        l = torch.zeros_like(m)
        if sink5 is not None:
            m = torch.maximum(m, sink5)  # maximum propagates a NaN sink: its rows are NaN
            l = torch.where(sink5 == float("-inf"), 0.0, torch.where(sink5.isnan(), float("nan"), 1.0)).expand_as(m)
        acc = torch.zeros(b, hkv, group, q1 - q0, d_v, dtype=acc_dtype, device=q.device)
        # Key range any row of this block may see; blocks outside it are never touched.
        k_lo = 0 if left == UNBOUNDED else max(0, q0 + diag - left)
        k_hi = sk if right == UNBOUNDED else min(sk, q1 - 1 + diag + right + 1)
        for k0 in range(k_lo - k_lo % block_k, max(k_hi, 0), block_k):
            k1 = min(k0 + block_k, sk)
            cols = torch.arange(k0, k1, device=q.device)
            scores = torch.matmul(qb, k5[:, :, :, k0:k1].to(acc_dtype).transpose(-1, -2))
            block_mask = None if mask5 is None else mask5[..., q0:q1, k0:k1]
            bias = None if slopes5 is None else alibi_bias(slopes5, rows, cols, diag)
            logits = _scores_to_logits(scores, scale, softcap, block_mask,
                                       visible_keys(rows, cols, diag, left, right), bias)
            m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)  # rows with nothing seen yet
            p = torch.exp(logits - m_safe)
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(dim=-1, keepdim=True)
            acc = acc * alpha + weighted_values(p, logits, v5[:, :, :, k0:k1].to(acc_dtype), values_finite)
            m = m_new
        # l == 0: the row saw no key. A NaN l (a NaN or +inf logit) is not 0 and carries into out and lse.
        empty = l == 0
        out_block = torch.where(empty, 0.0, acc / torch.where(empty, 1.0, l))
        out[:, :, q0:q1] = out_block.reshape(b, hq, q1 - q0, d_v).to(q.dtype)
        lse_block = torch.where(empty, float("-inf"), m + torch.log(torch.where(empty, 1.0, l)))
        lse[:, :, q0:q1] = lse_block.reshape(b, hq, q1 - q0)
    if return_lse:
        return out, lse
    return out


def _empty_output(q, d_v):
    """An uninitialized output: q's shape with the last dim ``d_v``; q's memory layout when ``d_v`` is q's head dim
    (so a ``[B, S, H, D]`` view in gives one out), else contiguous."""
    return torch.empty_like(q) if q.shape[-1] == d_v else q.new_empty((*q.shape[:-1], d_v))


def _sequence_options(options, b):
    """``options`` for sequence ``b`` alone: per-sequence ALiBi slopes ``[B, Hq]`` become its row ``[Hq]``."""
    slopes = options.get("alibi_slopes")
    if slopes is None or slopes.dim() == 1:
        return options
    return {**options, "alibi_slopes": slopes[b]}


def keyless_rows(sinks, heads, dtype, device):
    """``(out, lse)`` per head, ``[heads, 1]`` each, of rows that see no key: 0 and ``-inf``; with sinks 0 and the
    sink, except NaN and NaN for a NaN or ``+inf`` sink (a ``+inf`` logit makes its rows NaN, as for keys)."""
    if sinks is None:
        return (torch.zeros((heads, 1), dtype=dtype, device=device),
                torch.full((heads, 1), float("-inf"), dtype=dtype, device=device))
    sinks = sinks.to(dtype=dtype, device=device)[:, None]
    poisoned = sinks.isnan() | (sinks == float("inf"))
    return torch.where(poisoned, float("nan"), 0.0), torch.where(poisoned, float("nan"), sinks)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, return_lse=False, impl=tiled_attention, **options):
    """Packed sequences (q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v ``[total_k, Hkv, D_v]``), one sequence at
    a time through ``impl``. Returns ``out [total_q, Hq, D_v]`` or ``(out, lse [Hq, total_q])``."""
    out = _empty_output(q, v.shape[-1])
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=lse_dtype(q.dtype), device=q.device)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        (q0, q1), (k0, k1) = (cq[b], cq[b + 1]), (ck[b], ck[b + 1])
        if q1 == q0:
            continue
        seq = [t[None].transpose(1, 2) for t in (q[q0:q1], k[k0:k1], v[k0:k1])]  # [1, H, S, D] views
        if k1 == k0:
            fill, lse[:, q0:q1] = keyless_rows(options.get("sinks"), q.shape[1], lse.dtype, q.device)
            out[q0:q1] = fill.to(out.dtype)[None]  # [1, Hq, 1] over [tokens, Hq, D_v]
            continue
        o, l = impl(*seq, return_lse=True, **_sequence_options(options, b))
        out[q0:q1] = o[0].transpose(0, 1)
        lse[:, q0:q1] = l[0]
    return (out, lse) if return_lse else out


def gather_cache(cache, b, length, block_table=None, scale=None):
    """The first ``length`` tokens of sequence ``b`` of a contiguous or paged cache, as ``[Hkv, length, D]`` (the
    cache's own head dim); with ``scale``, an fp8 cache's scale of any granularity (see :mod:`tileattn.quant`), the
    values they stand for, dequantized to fp32."""
    if block_table is None:
        tokens = cache[b, :, :length]
    else:
        page_size = cache.shape[2]
        pages = block_table[b, : -(-length // page_size)].long()
        tokens = cache[pages].transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]
    if scale is None:
        return tokens
    return quant.dequantize(tokens[None], _sequence_scale(scale, b, length, block_table))[0]


def _sequence_scale(scale, b, length, block_table):
    """Sequence ``b``'s part of a cache scale (by rank: 0-d and ``[Hkv]`` are shared, ``[B, Hkv]`` has a row per
    sequence, per-token scales are laid out as the cache is), shaped for its gathered ``[1, Hkv, length, D]``
    tokens."""
    if scale.dim() == 2:
        return scale[b:b + 1]
    if scale.dim() == 3:
        return gather_cache(scale[..., None], b, length, block_table)[None, ..., 0]
    return scale


def kvcache_attention(q, k_cache, v_cache, cache_seqlens, *, new_tokens=0, block_table=None, k_scale=None,
                      v_scale=None, return_lse=False, impl=tiled_attention, **options):
    """``q [B, Hq, Sq, D]`` against each sequence's first ``cache_seqlens[b] + new_tokens`` cached tokens
    (already written; k_cache's head dim D, v_cache's D_v), one sequence at a time through ``impl``; bottom-right
    aligned. fp8 caches come with ``k_scale``/``v_scale`` (see :mod:`tileattn.quant`): each sequence's tokens are
    dequantized to fp32, then attended (``impl`` computes in q's precision, or fp32 on the tiled path), so the result
    is attention over the values the cache stands for. Returns ``out [B, Hq, Sq, D_v]`` or
    ``(out, lse [B, Hq, Sq])``."""
    out = _empty_output(q, v_cache.shape[-1])
    lse = torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device)
    for b, cached in enumerate(cache_seqlens.tolist()):
        length = cached + new_tokens
        k = gather_cache(k_cache, b, length, block_table, k_scale)[None]
        v = gather_cache(v_cache, b, length, block_table, v_scale)[None]
        if length == 0:
            fill, lse[b] = keyless_rows(options.get("sinks"), q.shape[1], lse.dtype, q.device)
            out[b] = fill.to(out.dtype)[:, :, None]  # [Hq, 1, 1] over [Hq, Sq, D_v]
            continue
        o, l = impl(q[b:b + 1], k, v, return_lse=True, **_sequence_options(options, b))
        out[b], lse[b] = o[0], l[0]
    return (out, lse) if return_lse else out


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Exact merge of two attentions of the same queries over disjoint key sets.

    ``out_*`` ``[..., D]`` and natural-log ``lse_*`` ``[...]`` (e.g. ``[B, H, S, D]`` and ``[B, H, S]``). With
    ``lse = log(exp(lse_a) + exp(lse_b))``, ``out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b``.
    A side with lse ``-inf`` (saw no key) contributes nothing; if both did, out is 0 and lse ``-inf``.
    Returns ``(out, lse)`` with out in ``out_a``'s dtype and lse fp32 (fp64 when either input is fp64).
    """
    acc = lse_dtype(torch.promote_types(out_a.dtype, lse_a.dtype))
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    top = torch.maximum(lse_a, lse_b)
    top = top.masked_fill(top == float("-inf"), 0.0)
    wa, wb = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = wa + wb
    seen = total > 0
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    scale_a = torch.where(seen, wa / torch.where(seen, total, 1.0), 0.0)[..., None]
    scale_b = torch.where(seen, wb / torch.where(seen, total, 1.0), 0.0)[..., None]
    out = scale_a * out_a.to(acc) + scale_b * out_b.to(acc)
    return out.to(out_a.dtype), lse
