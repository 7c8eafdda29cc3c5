"""``tileattn.attention``: validation, the cases that need no kernel, dispatch to a backend."""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import torch

from . import dispatch, quant, reference
from .cache import write_kv
from .reference import UNBOUNDED, lse_dtype, naive_attention, tiled_attention, window_bounds
from .sdpa import SdpaPlan, sdpa_attention

MAX_HEAD_DIM_QK = 576  # DeepSeek MLA's latent cache: 512 latent + 64 rotary columns
MAX_HEAD_DIM_V = 512
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact softmax attention ``softmax(q @ k^T * scale + mask) @ v``, computed block by block.

    Args:
        q: ``[B, Hq, Sq, D]``. Any strides: a ``[B, S, H, D]`` tensor is passed as ``x.transpose(1, 2)``.
        k: ``[B, Hkv, Sk, D]``, v: ``[B, Hkv, Sk, D_v]``, with ``Hq % Hkv == 0`` (GQA/MQA; K/V are never repeated
            in memory). q, k, v share dtype (float16, bfloat16, float32; float64 on the torch backends) and device.
            ``D`` (q/k) is any value from 1 to 576, ``D_v`` any value from 1 to 512 (DeepSeek MLA: 192/128, 576/512).
            The Triton kernels and SDPA take ``D_v == D <= 256`` for now: ``auto`` runs other head dims on the tiled
            PyTorch path, and ``backend="triton"`` or ``"sdpa*"`` refuse them with a ValueError.
        causal: query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq`` (bottom-right aligned, the KV-cache
            convention; PyTorch SDPA's ``is_causal`` is top-left aligned, which differs when Sq != Sk).
        scale: softmax scale, default ``D ** -0.5`` (q/k's head dim).
        mask: bool (True = attend) or float (added to the scaled scores) tensor broadcastable to
            ``[B, Hq, Sq, Sk]``, on q's device.
        window: ``(left, right)``: query ``i`` sees keys ``i + Sk - Sq - left ..= i + Sk - Sq + right``;
            None or -1 leaves a side unbounded. Combined with ``causal``, ``right`` is capped at 0.
        softcap: if given (> 0), scores become ``softcap * tanh(scores / softcap)`` before masking.
        alibi_slopes: fp32 ``[Hq]`` or ``[B, Hq]``: ALiBi, ``-slope * |i + Sk - Sq - j|`` added to the logits.
        sinks: ``[Hq]`` (any float dtype): one logit per head that joins each row's softmax denominator and
            attends to nothing (gpt-oss's ``s_aux``); lse includes it, a row that sees no key gets lse ``sink``.
            ``auto`` runs ALiBi and sinks in the Triton kernels on CUDA (their backward gives q, k, v and the sinks
            gradients), and on the differentiable ``torch`` path where the slopes require grad or Triton cannot run.
        return_lse: also return the natural-log logsumexp of each row, ``[B, Hq, Sq]``, fp32 (fp64 for fp64 inputs).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (tiled PyTorch) or ``"naive"`` (see ``dispatch``).

    Returns:
        ``out`` with q's dtype, device and logical shape ``[B, Hq, Sq, D_v]`` (on the triton and torch backends,
        also q's memory layout when q is dense and ``D_v == D``), or ``(out, lse)``. A row that sees no key gets
        output 0 and lse ``-inf``. Scores are accumulated in fp32 (fp64 for fp64 inputs). NaN/Inf in q/k/v
        propagate as IEEE arithmetic does (a NaN in a key a row sees makes that row NaN); inputs are not scanned.
    """
    if alibi_slopes is not None or sinks is not None:
        return _attention_with_biases(q, k, v, causal, scale, mask, window, softcap, alibi_slopes, sinks, return_lse,
                                      backend)
    call = _prepare_attention(q, k, v, causal, scale, mask, window, softcap, return_lse, backend, with_plan=True)
    if call.empty:  # nothing to launch: empty result, or rows that see no key
        out = q.new_zeros((*q.shape[:3], v.shape[-1]))
        lse = torch.full(q.shape[:3], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        return (out, lse) if return_lse else out
    if mask is not None:
        mask = mask.expand(call.mask_shape)  # a view: broadcast dims get stride 0, nothing is copied
    mask_grad = mask is not None and mask.requires_grad
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or mask_grad)
    if call.plan is not None and not grad:  # an eager call whose launch is prepared for its signature (see _Call)
        out, lse = call.plan.run(q, k, v, mask)
        return (out, lse) if call.return_lse else out

    chosen, window, return_lse = call.backend, call.window, call.return_lse
    if chosen == "triton" and grad and _tiled_for_gradients(q, k, v, mask):
        chosen = "torch"  # gradients the Triton backward cannot give: the tiled path differentiates through it
    options = dict(scale=call.scale, mask=mask, softcap=call.softcap)
    if chosen == "triton":
        from . import ops  # here: Triton need not be importable for the other backends

        if grad:  # through the custom op and its FlashAttention backward
            out, lse = ops.run_prefill_differentiable(q, k, v, window=window, return_lse=return_lse, **options)
        elif call.decode_shaped:  # few query rows per K/V head: split the keys instead (flash-decoding)
            out, lse = ops.run_decode(q, k, v, None, new_tokens=k.shape[2], block_table=None, window=window,
                                      return_lse=return_lse, num_splits=0, **options)
        else:
            out, lse = ops.run_prefill(q, k, v, window=window, return_lse=return_lse, **options)
    elif chosen.startswith("sdpa"):  # a plain call (see tileattn.sdpa): no mask, window, softcap or lse
        out, lse = sdpa_attention(q, k, v, kernel=chosen, causal=causal, scale=call.scale), None
    else:
        impl = tiled_attention if chosen == "torch" else naive_attention
        result = impl(q, k, v, window=window, return_lse=return_lse, **options)
        out, lse = result if return_lse else (result, None)
    return (out, lse) if return_lse else out


# ---- ALiBi and attention sinks (Triton kernels, or the PyTorch backends) --------------------------------

BIAS_BACKENDS = ("triton", "torch", "naive")


def _bias_backend(q, k, v, backend, alibi_slopes, sinks, mask=None):
    """The backend of a call with ALiBi slopes or sinks: ``auto`` takes the Triton kernels on CUDA, else the tiled
    PyTorch path, which is also where slopes or a mask that require grad go, with
    ``backend="triton"`` too (the Triton backward gives q, k, v and the sinks their gradients, not the slopes or
    the mask); SDPA cannot take them."""
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    if backend not in BIAS_BACKENDS + ("auto",):
        given = " and ".join(n for n, t in (("alibi_slopes", alibi_slopes), ("sinks", sinks)) if t is not None)
        raise ValueError(f"{given} run on backend 'triton', 'torch' or 'naive' (or 'auto'); backend={backend!r} "
                         "does not take them")
    if backend == "triton" and isinstance(v, torch.Tensor) and isinstance(k, torch.Tensor):
        reason = dispatch.quantized_cache_reason(q, k, v)  # an fp8 cache it cannot read is refused before rerouting
        if reason:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
    if backend in ("auto", "triton") and _tiled_for_gradients(q, k, v, mask, alibi_slopes, sinks):
        return "torch"  # as attention() without biases does
    return dispatch.choose_backend(q, v, backend, k=k)


def _tiled_for_gradients(q, k, v, mask, alibi_slopes=None, sinks=None) -> str | None:
    """Why a call that asks for gradients the Triton backward cannot give runs on the tiled PyTorch path instead
    (with ``backend="triton"`` too), or None: a mask or slopes that require grad, head dims outside the backward's."""
    if _needs_grad(mask, alibi_slopes):
        return "the slopes or the mask require grad: only the tiled PyTorch backend gives them gradients"
    if _needs_grad(q, k, v, sinks):
        reason = dispatch.triton_backward_head_dims_reason(q.shape[-1], v.shape[-1])
        if reason:
            return f"gradients are asked for and {reason}: the tiled PyTorch backend differentiates it"
    return None


def _needs_grad(*tensors) -> bool:
    """Whether gradients are asked for: grad mode on and one of ``tensors`` (None allowed) requiring grad."""
    # Runs before the biases are validated (a non-tensor is _check_biases's to refuse), and on the decode hot path
    # (a loop: half the host time of any() over a generator).
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and getattr(t, "requires_grad", False) is True:
                return True
    return False


def _check_biases(q, alibi_slopes, sinks, batch):
    """``alibi_slopes`` fp32 ``[Hq]`` or ``[batch, Hq]`` and ``sinks`` float ``[Hq]``, on q's device."""
    heads = q.shape[-2] if q.dim() == 3 else q.shape[1]
    for name, t, shapes, dtypes in (("alibi_slopes", alibi_slopes, ((heads,), (batch, heads)), (torch.float32,)),
                                    ("sinks", sinks, ((heads,),), FLOAT_DTYPES)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape {' or '.join(str(list(s)) for s in shapes)} (heads = {heads}), "
                             f"got {list(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} must be {' or '.join(str(d) for d in dtypes)}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")


def _keyless(q, v, shape, sinks, heads_dim):
    """``(out, lse of ``shape``)`` of a call whose rows see no key (heads on axis ``heads_dim`` of ``shape``, the
    lse's shape), out shaped like q with v's head dim: 0 and ``-inf``, or what
    :func:`tileattn.reference.keyless_rows` gives with sinks."""
    fill, lse = reference.keyless_rows(sinks, q.shape[-2] if q.dim() == 3 else q.shape[1], lse_dtype(q.dtype), q.device)
    view = [1] * len(shape)
    view[heads_dim] = -1
    out_view = [1, -1, 1] if q.dim() == 3 else [1, -1, 1, 1]  # [tokens, Hq, D_v] or [B, Hq, S, D_v]
    out_shape = (*q.shape[:-1], v.shape[-1])
    return fill.to(q.dtype).view(out_view).expand(out_shape).clone(), lse.view(view).expand(shape).clone()


def _attention_with_biases(q, k, v, causal, scale, mask, window, softcap, alibi_slopes, sinks, return_lse, backend):
    chosen = _bias_backend(q, k, v, backend, alibi_slopes, sinks, mask)
    call = _prepare_attention(q, k, v, causal, scale, mask, window, softcap, return_lse, chosen)
    _check_biases(q, alibi_slopes, sinks, q.shape[0])
    options = dict(scale=call.scale, softcap=call.softcap, mask=None if mask is None else mask.expand(call.mask_shape),
                   alibi_slopes=alibi_slopes, sinks=sinks)
    if q.numel() == 0 or k.shape[2] == 0:
        out, lse = _keyless(q, v, q.shape[:3], sinks, heads_dim=1)
    elif chosen == "triton":
        from . import ops

        if _needs_grad(q, k, v, sinks):
            # the FlashAttention backward: gradients of q, k, v and the sinks (decode shapes included; slopes or a
            # mask that require grad were sent to the torch path)
            out, lse = ops.run_prefill_differentiable(q, k, v, window=call.window, return_lse=True, **options)
        elif call.decode_shaped:
            out, lse = ops.run_decode(q, k, v, None, new_tokens=k.shape[2], block_table=None, window=call.window,
                                      return_lse=True, num_splits=0, **options)
        else:
            out, lse = ops.run_prefill(q, k, v, window=call.window, return_lse=True, **options)
    else:
        impl = tiled_attention if chosen == "torch" else naive_attention
        out, lse = impl(q, k, v, window=call.window, return_lse=True, **options)
    return (out, lse) if return_lse else out


class _Call(NamedTuple):
    """A validated ``attention`` call, normalized, with its backend: what depends only on the call's signature.
    ``plan``: for the calls whose signature is cached, on the Triton kernels or one of SDPA's CUDA kernels, the
    prepared launch (``plan.run(q, k, v, mask)`` gives ``(out, lse or None)``), so that a repeated call goes from
    one lookup straight to its kernel; None for the others."""

    scale: float
    window: tuple[int, int]
    softcap: float | None
    return_lse: bool
    mask_shape: tuple[int, int, int, int]
    backend: str
    decode_shaped: bool
    empty: bool
    plan: object


# Validated calls by signature: everything the checks, the backend choice and a prepared launch depend on (types,
# shapes, strides, dtypes, devices, options). A repeated signature skips the checks it already passed, which cost
# as much host time as a kernel launch; any other call (tensor subclasses, options of other types, inside
# torch.compile) is checked in full. Cleared with the dispatch decisions (dispatch.reset()).
_prepared: dict = {}
_OPTION_TYPES = (type(None), int, float)
_WINDOW_TYPES = (type(None), int)


def _plain_options(causal, scale, window, softcap) -> bool:
    """Whether the options have the exact types the checks accept for caching (1, True and 1.0 hash alike: a key
    must not let a value of another type skip its check)."""
    return (type(causal) is bool and type(scale) in _OPTION_TYPES and type(softcap) in _OPTION_TYPES
            and (window is None or (type(window) is tuple and len(window) == 2 and type(window[0]) in _WINDOW_TYPES
                                    and type(window[1]) in _WINDOW_TYPES)))


def _remember(key, call):
    if len(_prepared) >= dispatch.MAX_CACHED_DECISIONS:
        _prepared.clear()
    _prepared[key] = call


def _signature(q, k, v, causal, scale, mask, window, softcap, return_lse, backend, with_plan):
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor
            and (mask is None or type(mask) is torch.Tensor) and _plain_options(causal, scale, window, softcap)) \
            or torch.compiler.is_compiling():
        return None
    return (backend, causal, scale, window, softcap, bool(return_lse), with_plan, q.shape, k.shape, v.shape,
            q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            None if mask is None else (mask.shape, mask.stride(), mask.dtype, mask.device))


# Decode steps over a growing cache: Transformers' DynamicCache concatenates each new token, so K/V are new
# contiguous tensors one key longer every step, and each step's first layer meets a new signature. A validated
# decode-shaped Triton call is also remembered by its signature without the key length (its "family"): the checks
# and the backend choice do not depend on that length (only k's and v's lengths must agree), so a new length of a
# known family prepares its launch and nothing else.
_families: dict = {}


def _family(q, k, v, causal, scale, mask, window, softcap, return_lse, backend, with_plan):
    """The length-free signature of a call without a mask whose K/V are contiguous (their strides follow from
    their shapes), else None."""
    if mask is not None or not (k.is_contiguous() and v.is_contiguous()):
        return None
    return (backend, causal, scale, window, softcap, bool(return_lse), with_plan, q.shape, q.stride(), q.dtype,
            q.device, k.shape[:2], k.shape[3:], v.shape[:2], v.shape[3:], k.dtype, v.dtype, k.device, v.device)


def _new_length(family_call: _Call, q, k, v) -> _Call | None:
    """The :class:`_Call` of a call of ``family_call``'s family with another key length, or None when that length
    needs the full checks (k and v of unequal lengths, no keys)."""
    length = k.shape[2]
    if length == 0 or v.shape[2] != length:
        return None
    from . import ops  # a family holds Triton calls only

    plan = ops.attention_plan(q, k, v, decode_shaped=True, mask=None, scale=family_call.scale,
                              window=family_call.window, softcap=family_call.softcap,
                              return_lse=family_call.return_lse)
    return family_call._replace(mask_shape=(*family_call.mask_shape[:3], length), plan=plan)


def _prepare_attention(q, k, v, causal, scale, mask, window, softcap, return_lse, backend, with_plan=False) -> _Call:
    """The :class:`_Call` of this call, from the cache when its signature was met before; ``with_plan``: also
    prepare its launch (for plain calls: no ALiBi or sinks, which the signature does not hold)."""
    key = _signature(q, k, v, causal, scale, mask, window, softcap, return_lse, backend, with_plan)
    call = _prepared.get(key) if key is not None else None
    family = None
    if call is None and key is not None and with_plan:
        family = _family(q, k, v, causal, scale, mask, window, softcap, return_lse, backend, with_plan)
        family_call = _families.get(family) if family is not None else None
        if family_call is not None:
            call = _new_length(family_call, q, k, v)
            if call is not None:
                _remember(key, call)
    if call is None:
        scale, window, softcap, mask = _check_attention_call(q, k, v, causal, scale, mask, window, softcap)
        chosen = _decide(q, k, v, backend, causal, mask, window, softcap, return_lse).backend
        b, hq, sq, _ = q.shape
        empty, decode_shaped = b == 0 or sq == 0 or k.shape[2] == 0, dispatch.decode_shaped(q, k)
        plan = None
        if with_plan and key is not None and not empty:
            if chosen == "triton":
                from . import ops

                plan = ops.attention_plan(q, k, v, decode_shaped=decode_shaped, mask=mask, scale=scale,
                                          window=window, softcap=softcap, return_lse=bool(return_lse))
            elif chosen.startswith("sdpa") and q.device.type == "cuda":
                plan = SdpaPlan(chosen, causal, scale)
        call = _Call(scale, window, softcap, bool(return_lse), (b, hq, sq, k.shape[2]), chosen, decode_shaped, empty,
                     plan)
        if key is not None:
            _remember(key, call)
            if family is not None and chosen == "triton" and decode_shaped and plan is not None:
                if len(_families) >= dispatch.MAX_CACHED_DECISIONS:
                    _families.clear()
                _families[family] = call
    return call


dispatch.on_reset(_prepared.clear)
dispatch.on_reset(_families.clear)


def explain(q, k, v, *, causal=False, scale=None, mask=None, window=None, softcap=None, alibi_slopes=None,
            sinks=None, return_lse=False, backend="auto") -> dispatch.Decision:
    """Which backend :func:`attention` would run this call on, and why; nothing is computed.

    Takes :func:`attention`'s arguments and validates them the same way. Returns a
    :class:`tileattn.dispatch.Decision` (``.backend``, ``.reason``; ``print()`` shows both).
    """
    scale, window, softcap, mask = _check_attention_call(q, k, v, causal, scale, mask, window, softcap)
    if alibi_slopes is not None or sinks is not None:
        chosen = _bias_backend(q, k, v, backend, alibi_slopes, sinks, mask)
        _check_biases(q, alibi_slopes, sinks, q.shape[0])
        rerouted = backend in ("auto", "triton") and _tiled_for_gradients(q, k, v, mask, alibi_slopes, sinks)
        if rerouted:
            return dispatch.Decision(chosen, rerouted)
        if backend != "auto":
            return dispatch.Decision(chosen, f"requested ({backend} takes ALiBi slopes and sinks)")
        why_not = dispatch.triton_call_unsupported_reason(q, v) if q.device.type == "cuda" else "not CUDA tensors"
        where = "the Triton kernels" if chosen == "triton" else f"the tiled PyTorch backend (no Triton: {why_not})"
        return dispatch.Decision(chosen, f"ALiBi slopes and sinks run on {where}; SDPA cannot take them")
    decision = _decide(q, k, v, backend, causal, mask, window, softcap, return_lse)
    rerouted = decision.backend == "triton" and _tiled_for_gradients(q, k, v, mask)
    if rerouted:
        return dispatch.Decision("torch", rerouted)
    if decision.backend == "triton" and not dispatch.decode_shaped(q, k):
        from . import ops
        return _naming_the_kernel(decision, ops.prefill_kernel(q, k, v, mask=mask, window=window, softcap=softcap))
    return decision


@functools.lru_cache(maxsize=256)
def _naming_the_kernel(decision: dispatch.Decision, kernel: str) -> dispatch.Decision:
    """``decision`` with the prefill kernel that runs it named; one object per pair, so a cached decision stays
    the same object through :func:`explain`."""
    return dispatch.Decision(decision.backend, f"{decision.reason}; runs {kernel}")


def attention_varlen(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None, window=None,
    softcap=None, alibi_slopes=None, sinks=None, return_lse=False, backend="auto",
):
    """Attention over packed variable-length sequences, without padding.

    Args:
        q: ``[total_q, Hq, D]``; k: ``[total_k, Hkv, D]``, v: ``[total_k, Hkv, D_v]``: the sequences concatenated
            on the token axis; head dims as in :func:`attention`.
        cu_seqlens_q, cu_seqlens_k: int32 ``[batch + 1]`` on q's device: sequence ``b`` is tokens
            ``cu[b] .. cu[b + 1]``; starts at 0, non-decreasing, ends at the total. Checked on the host (a
            device sync), except inside CUDA-graph capture and torch.compile.
        max_seqlen_q, max_seqlen_k: the longest sequence of each (sizes the launch grid).
        Other options as in :func:`attention` (no ``mask``); causal is bottom-right aligned per sequence;
            ``alibi_slopes`` ``[batch, Hq]`` gives each sequence its own row.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"naive"``. The varlen kernel has no backward yet: where
            a gradient is asked for (grad mode on and an input, the slopes or the sinks requiring grad), ``auto``
            runs each sequence through :func:`attention` instead, which has gradients on every backend (on CUDA
            the Triton kernels' FlashAttention backward, one launch per sequence); ``backend="triton"`` runs the
            varlen kernel, and a backward through its result raises a RuntimeError.
    Returns:
        ``out [total_q, Hq, D_v]`` or ``(out, lse)`` with lse fp32 ``[Hq, total_q]``. Sequence ``b``'s rows
        equal ``attention`` on that sequence alone.
    """
    _check_tensors(q, k, v, layout="[tokens, heads, head_dim]", same_batch=False)
    scale = _check_scale(q.shape[-1], scale)
    left, right = _check_window(window, causal)
    softcap = _check_softcap(softcap)
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        _check_int_tensor(name, cu, q.device, rank=1)
        if cu.shape != cu_seqlens_q.shape or cu.shape[0] < 1:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [batch + 1], got {tuple(cu_seqlens_q.shape)} "
                             f"and {tuple(cu_seqlens_k.shape)}")
        if not isinstance(longest, int) or longest < 0:
            raise ValueError(f"max_seqlen for {name} must be an int >= 0, got {longest!r}")
        if _may_read_device_values():
            values = cu.tolist()
            lengths = [b - a for a, b in zip(values, values[1:])]
            if values[0] != 0 or values[-1] != total or min(lengths, default=0) < 0:
                raise ValueError(f"{name} must start at 0, never decrease and end at {total}, got {values}")
            if max(lengths, default=0) > longest:
                raise ValueError(f"a sequence of {max(lengths)} tokens exceeds the max_seqlen given for {name} ({longest})")
    biased = alibi_slopes is not None or sinks is not None
    if biased:
        chosen = _bias_backend(q, k, v, backend, alibi_slopes, sinks)
        _check_biases(q, alibi_slopes, sinks, cu_seqlens_q.shape[0] - 1)
    else:
        chosen = _backend(q, v, backend)
    # The varlen kernel has no backward yet: where gradients are asked for, auto runs each sequence through
    # attention() instead, whose every backend has one (on CUDA the Triton kernels' FlashAttention backward).
    per_sequence = chosen == "triton" and backend == "auto" and _needs_grad(q, k, v, alibi_slopes, sinks)
    options = dict(scale=scale, softcap=softcap, **(dict(alibi_slopes=alibi_slopes, sinks=sinks) if biased else {}))
    if q.shape[0] == 0 or cu_seqlens_q.shape[0] == 1:
        out, lse = _keyless(q, v, (q.shape[1], q.shape[0]), sinks, heads_dim=0)
    elif chosen == "triton" and not per_sequence:
        from . import ops

        def run():
            return ops.run_prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          window=(left, right), return_lse=bool(return_lse), **options)

        out, lse = _without_backward("tileattn.attention_varlen", run, q, k, v, alibi_slopes, sinks)
    else:
        impl = attention if per_sequence else tiled_attention if chosen == "torch" else naive_attention
        out, lse = reference.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, return_lse=True, impl=impl,
                                              window=(left, right), **options)
    return (out, lse) if return_lse else out


def attention_with_kvcache(
    q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None, block_table=None, k_scale=None, v_scale=None,
    causal=True, scale=None, window=None, softcap=None, alibi_slopes=None, sinks=None, return_lse=False, num_splits=0,
    check_bounds=True, backend="auto",
):
    """Attention of new query tokens over a KV cache (decode, chunked prefill, speculative verification).

    Args:
        q: ``[B, Hq, Sq, D]``, Sq >= 1, any strides.
        k_cache, v_cache: contiguous ``[B, Hkv, S_max, D]`` and ``[B, Hkv, S_max, D_v]``, or paged
            ``[num_pages, Hkv, page_size, D]`` and ``[..., D_v]`` with ``block_table``: int32 ``[B, max_pages_per_seq]``
            (storage ``[num_pages, page_size, Hkv, D]`` is passed as ``.transpose(1, 2)``). Any strides. Head dims
            as in :func:`attention`: v's may differ from q/k's.
        cache_seqlens: int32 ``[B]``: tokens already in each sequence's cache.
        k_new, v_new: optional ``[B, Hkv, Sq, D]`` and ``[B, Hkv, Sq, D_v]``, written into the caches at positions
            ``cache_seqlens[b] ..`` (through the block table when paged) before attending. ``cache_seqlens``
            itself is not advanced: that is the caller's (or :class:`tileattn.cache.PagedKVCache`'s) bookkeeping.
        k_scale, v_scale: the scales of fp8 caches (``torch.float8_e4m3fn`` or ``torch.float8_e5m2``; k's and v's
            format may differ, both caches are fp8 or neither), required with them and refused without: fp32 on
            the cache's device, any strides, each of one granularity (see :mod:`tileattn.quant`; k's and v's may
            differ): 0-d per tensor, ``[Hkv]`` or ``[B, Hkv]`` per KV head, or per token and KV head the cache's
            shape without the head dim (``[B, Hkv, S_max]``, paged ``[num_pages, Hkv, page_size]``). A stored ``x``
            means ``x.float() * scale``, and the result is exact attention over those values (q, k_new and v_new
            float16, bfloat16 or float32). New tokens are quantized on write (divide by the scale, saturate to the
            format's largest finite value, round to nearest even; NaN and Inf are stored as NaN); per-token scales
            get each new token's own scale (amax / format max, 1.0 for an all-zero token) at its position, in
            place, so they must then be writable (no stride-0 view, not requiring grad). The call attends over
            what it stored. Quantization rounds: k_new and v_new get no gradient through it (q does). The Triton
            decode kernel reads fp8 caches and quantizes the new tokens in the same launch (``auto`` picks it on
            CUDA; ``float8_e4m3fn`` needs compute capability 8.9 or newer there, see
            :func:`tileattn.dispatch.quantized_cache_reason`).
        causal: default True; bottom-right aligned: the Sq queries are the last Sq of the
            ``cache_seqlens[b] (+ Sq if k_new)`` keys.
        num_splits: key splits per sequence for the split-KV kernel; 0 chooses from batch, heads, cache size
            and SM count. Any value gives the same result up to rounding.
        check_bounds: read ``cache_seqlens`` and ``block_table`` on the host to check that every sequence fits
            its cache and every page id exists (a device sync). Skipped inside CUDA-graph capture and
            torch.compile; a serving loop whose own bookkeeping guarantees it (``PagedKVCache``) may pass False.
            Without the check the Triton kernel clamps lengths to the cache (never reads or writes outside it;
            page ids are trusted); the PyTorch backends always check (they read the lengths on the host anyway).
        backend: ``"auto"``, ``"triton"``, ``"torch"`` or ``"naive"``. The decode kernel has no backward yet: where
            a gradient is asked for (grad mode on and q, the caches, the new tokens, the slopes or the sinks
            requiring grad), ``auto`` writes the new tokens by PyTorch indexing and runs each sequence through
            :func:`attention`, which has gradients on every backend; ``backend="triton"`` runs the decode kernel,
            and a backward through its result raises a RuntimeError.
        Other options as in :func:`attention`.
    Returns:
        ``out [B, Hq, Sq, D_v]`` or ``(out, lse)``, lse fp32 ``[B, Hq, Sq]``.
    """
    biased = alibi_slopes is not None or sinks is not None
    call = _prepare_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale, window,
                            softcap, return_lse, num_splits,
                            _bias_backend(q, k_cache, v_cache, backend, alibi_slopes, sinks) if biased else backend,
                            with_plan=not biased, k_scale=k_scale, v_scale=v_scale)
    if biased:
        _check_biases(q, alibi_slopes, sinks, q.shape[0])
    grad = _needs_grad(q, k_cache, v_cache, k_new, v_new, alibi_slopes, sinks)
    # The decode kernel has no backward yet: where gradients are asked for, auto writes the new tokens by PyTorch
    # indexing and runs each sequence through attention() instead, whose every backend has one (over an fp8 cache,
    # whose dequantized fp32 tokens attention() would refuse beside a q of another dtype, the tiled PyTorch path).
    per_sequence = call.backend == "triton" and backend == "auto" and grad
    triton = call.backend == "triton" and not per_sequence
    # The PyTorch paths read the lengths on the host anyway and would index outside the cache: they always check.
    if (check_bounds or not triton) and _may_read_device_values():
        _check_cache_bounds(k_cache, cache_seqlens, call.new_tokens, block_table)
    if triton:
        launch = (call, q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, num_splits, alibi_slopes, sinks,
                  k_scale, v_scale)
        if grad:
            out, lse = _without_backward("tileattn.attention_with_kvcache", lambda: _kvcache_kernel(*launch), q,
                                         k_cache, v_cache, k_new, v_new, alibi_slopes, sinks)
        else:
            out, lse = _kvcache_kernel(*launch)
    else:
        # Validated: scales are given exactly when the caches are fp8 (quantized on write, dequantized to attend).
        if k_new is not None:
            write_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, k_scale=k_scale, v_scale=v_scale)
        if per_sequence:
            impl = attention if k_scale is None else tiled_attention
        else:
            impl = tiled_attention if call.backend == "torch" else naive_attention
        biases = dict(alibi_slopes=alibi_slopes, sinks=sinks) if biased else {}
        out, lse = reference.kvcache_attention(q, k_cache, v_cache, cache_seqlens, new_tokens=call.new_tokens,
                                               block_table=block_table, k_scale=k_scale, v_scale=v_scale,
                                               return_lse=True, impl=impl, scale=call.scale, softcap=call.softcap,
                                               window=call.window, **biases)
    return (out, lse) if return_lse else out


def _kvcache_kernel(call, q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, num_splits, alibi_slopes,
                    sinks, k_scale=None, v_scale=None):
    """``(out, lse or None)`` of a validated :func:`attention_with_kvcache` call on the Triton decode kernel."""
    if call.plan is not None:  # a plain eager call whose launch is prepared for its signature (scales included)
        return call.plan.run(q, k_cache, v_cache, None, cache_seqlens, block_table, k_new, v_new, k_scale=k_scale,
                             v_scale=v_scale)
    from . import ops

    return ops.run_decode(q, k_cache, v_cache, cache_seqlens, new_tokens=call.new_tokens, block_table=block_table,
                          return_lse=call.return_lse, num_splits=num_splits, scale=call.scale, softcap=call.softcap,
                          window=call.window, k_new=k_new, v_new=v_new, alibi_slopes=alibi_slopes, sinks=sinks,
                          k_scale=k_scale, v_scale=v_scale)


def _attention_with_kvcache_seq_first(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale,
                                      window, softcap, return_lse, num_splits):
    """:func:`attention_with_kvcache` (``check_bounds=False``, ``backend="auto"``) on tensors in flash-attn's
    ``[B, S, H, D]`` order, returning ``out [B, Sq, Hq, D_v]``: validated as their ``[B, H, S, D]`` views are, but a
    repeated call on the Triton kernel makes none of those views (about a microsecond each)."""
    key = _kvcache_signature(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale, window,
                             softcap, return_lse, num_splits, "auto", True)
    key = None if key is None else ("seq_first", *key)
    call = _prepared.get(key) if key is not None else None
    # a call that requires grad too: auto runs it on a path with a backward (see attention_with_kvcache)
    if call is None or call.backend != "triton" or _needs_grad(q, k_cache, v_cache, k_new, v_new):
        def heads_first(t):
            return None if t is None else t.transpose(1, 2)

        if call is None and key is not None:
            call = _check_kvcache_call(heads_first(q), heads_first(k_cache), heads_first(v_cache), cache_seqlens,
                                       heads_first(k_new), heads_first(v_new), block_table, causal, scale, window,
                                       softcap, return_lse, num_splits, "auto")
            _remember(key, call._replace(plan=_kvcache_plan(call, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                            block_table, num_splits, seq_first=True)))
        result = attention_with_kvcache(
            heads_first(q), heads_first(k_cache), heads_first(v_cache), cache_seqlens, k_new=heads_first(k_new),
            v_new=heads_first(v_new), block_table=block_table, causal=causal, scale=scale, window=window,
            softcap=softcap, return_lse=return_lse, num_splits=num_splits, check_bounds=False)
        return (heads_first(result[0]), result[1]) if return_lse else heads_first(result)
    if call.plan is not None:
        out, lse = call.plan.run(q, k_cache, v_cache, None, cache_seqlens, block_table, k_new, v_new)
    else:
        from . import ops

        out, lse = ops.run_decode(q, k_cache, v_cache, cache_seqlens, new_tokens=call.new_tokens,
                                  block_table=block_table, return_lse=call.return_lse, num_splits=num_splits,
                                  scale=call.scale, softcap=call.softcap, window=call.window, k_new=k_new, v_new=v_new,
                                  seq_first=True)
    return (out, lse) if return_lse else out


class CacheBoundsError(ValueError, RuntimeError):
    """Cache lengths or page ids outside the cache (``attention_with_kvcache``'s bounds check): a ValueError, and a
    RuntimeError as flash-attn raises for them."""


class _KVCacheCall(NamedTuple):
    """A validated ``attention_with_kvcache`` call, normalized, with its backend; ``plan``, for a plain call on the
    Triton kernel whose signature is cached, its prepared launch (see :func:`_kvcache_plan`)."""

    scale: float
    window: tuple[int, int]
    softcap: float | None
    return_lse: bool
    new_tokens: int
    backend: str
    plan: object = None


def _kvcache_signature(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale, window, softcap,
                       return_lse, num_splits, backend, with_plan):
    tensors = (q, k_cache, v_cache, cache_seqlens)
    optional = (k_new, v_new, block_table)
    if not (all(type(t) is torch.Tensor for t in tensors) and all(t is None or type(t) is torch.Tensor for t in optional)
            and type(num_splits) is int and _plain_options(causal, scale, window, softcap)) \
            or torch.compiler.is_compiling():
        return None
    return (backend, causal, scale, window, softcap, bool(return_lse), num_splits, with_plan,
            *[(t.shape, t.stride(), t.dtype, t.device) for t in tensors],
            *[None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in optional])


def _prepare_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale, window, softcap,
                     return_lse, num_splits, backend, with_plan=False, k_scale=None, v_scale=None) -> _KVCacheCall:
    """The :class:`_KVCacheCall` of this call, from the cache when its signature was met before; ``with_plan``:
    also prepare its launch (for plain calls: no ALiBi or sinks, which the signature does not hold)."""
    key = _kvcache_signature(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale, window,
                             softcap, return_lse, num_splits, backend, with_plan)
    if key is not None and (k_scale is not None or v_scale is not None):
        key = _scales_signature(key, k_scale, v_scale)
    call = _prepared.get(key) if key is not None else None
    if call is None:
        call = _check_kvcache_call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale,
                                   window, softcap, return_lse, num_splits, backend, k_scale=k_scale, v_scale=v_scale)
        if key is not None:
            if with_plan:
                call = call._replace(plan=_kvcache_plan(call, q, k_cache, v_cache, cache_seqlens, k_new, v_new,
                                                        block_table, num_splits, k_scale=k_scale, v_scale=v_scale))
            _remember(key, call)
    return call


def _scales_signature(key, k_scale, v_scale):
    """``key`` (a call's signature without its scales) extended by ``k_scale`` and ``v_scale``, with what their checks
    read (``requires_grad`` included: per-token scales are written in place), or None where they are not both plain
    tensors (then every call is checked in full). Calls without scales keep the plain key: an fp8 cache without
    scales, or scales with another cache, fail their checks and so are never cached."""
    if type(k_scale) is not torch.Tensor or type(v_scale) is not torch.Tensor:
        return None
    return (key, *[(t.shape, t.stride(), t.dtype, t.device, t.requires_grad) for t in (k_scale, v_scale)])


def _kvcache_plan(call, q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, num_splits, seq_first=False,
                  k_scale=None, v_scale=None):
    """The prepared decode launch of a validated plain kvcache call on the Triton kernel (``plan.run(q, k_cache,
    v_cache, None, cache_seqlens, block_table, k_new, v_new, k_scale=, v_scale=)``), or None: another backend, or
    lengths or a block table that the kernel needs copied to unit stride first (``decode_attention`` does that per
    call)."""
    if call.backend != "triton" or cache_seqlens.stride(0) != 1 or (
            block_table is not None and block_table.stride(1) != 1):
        return None
    from . import ops

    return ops.decode_plan(q, k_cache, v_cache, cache_seqlens, new_tokens=call.new_tokens, block_table=block_table,
                           window=call.window, scale=call.scale, softcap=call.softcap, return_lse=call.return_lse,
                           num_splits=num_splits, k_new=k_new, v_new=v_new, seq_first=seq_first, k_scale=k_scale,
                           v_scale=v_scale)


def _check_kvcache_call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale, window,
                        softcap, return_lse, num_splits, backend, *, k_scale=None, v_scale=None) -> _KVCacheCall:
    quantized = _quantized_cache(k_cache, v_cache)
    if quantized:
        _check_quantized_dtypes(q, k_cache, v_cache)
    _check_tensors(q, k_cache, v_cache, same_batch=block_table is None,
                   kv_dtypes=quant.FP8_DTYPES if quantized else None)
    scale = _check_scale(q.shape[-1], scale)
    window = _check_window(window, causal)
    softcap = _check_softcap(softcap)
    b, _, sq, _ = q.shape
    if sq < 1:
        raise ValueError(f"q must have at least one query token (Sq >= 1), got shape {tuple(q.shape)}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = automatic), got {num_splits!r}")
    _check_int_tensor("cache_seqlens", cache_seqlens, q.device, rank=1)
    if cache_seqlens.shape[0] != b:
        raise ValueError(f"cache_seqlens must be [batch={b}], got {tuple(cache_seqlens.shape)}")
    if block_table is not None:
        _check_int_tensor("block_table", block_table, q.device, rank=2)
        if block_table.shape[0] != b:
            raise ValueError(f"block_table must be [batch={b}, max_pages_per_seq], got {tuple(block_table.shape)}")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        for name, t, cache, head_dim in (("k_new", k_new, k_cache, "D"), ("v_new", v_new, v_cache, "D_v")):
            expected = (b, cache.shape[1], sq, cache.shape[-1])
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
                raise ValueError(f"{name} must be [B, Hkv, Sq, {head_dim}] = {list(expected)}, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    _check_kv_scales(k_cache, v_cache, k_scale, v_scale, quantized=quantized, batch=b, paged=block_table is not None,
                     writes=k_new is not None)
    return _KVCacheCall(scale, window, softcap, bool(return_lse), sq if k_new is not None else 0,
                        _backend(q, v_cache, backend, k=k_cache))


QUANTIZED_QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # those the Triton kernels take


def _quantized_cache(k_cache, v_cache) -> bool:
    """Whether either cache is stored in an fp8 format (then both must be: :func:`_check_quantized_dtypes`)."""
    return any(isinstance(t, torch.Tensor) and quant.is_fp8(t.dtype) for t in (k_cache, v_cache))


def _check_quantized_dtypes(q, k_cache, v_cache):
    """Over an fp8 cache: both caches fp8 (each its own format), q float16, bfloat16 or float32 (k_new/v_new
    follow q)."""
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(t, torch.Tensor) and not quant.is_fp8(t.dtype):
            raise TypeError(f"{name} must be {_dtype_names(quant.FP8_DTYPES)} as well: k_cache and v_cache are "
                            f"quantized together, got {t.dtype}")
    if isinstance(q, torch.Tensor) and q.dtype not in QUANTIZED_QUERY_DTYPES:
        raise TypeError(f"q must be {_dtype_names(QUANTIZED_QUERY_DTYPES)} over an fp8 KV cache, got {q.dtype}")


def _check_kv_scales(k_cache, v_cache, k_scale, v_scale, *, quantized, batch, paged, writes,
                     names=("k_scale", "v_scale")):
    """``k_scale``/``v_scale``: given exactly when the caches are fp8; fp32 on the cache's device, of a shape
    :func:`tileattn.quant.scale_granularity` takes for the cache's layout; per-token scales writable where new
    tokens are written (``writes``). ``names``: the arguments named in errors (the flash-attn entry point's own)."""
    named = tuple(zip(names, (k_scale, v_scale)))
    if not quantized:
        given = [name for name, t in named if t is not None]
        if given:
            raise ValueError(f"{' and '.join(given)}: scales are for fp8 KV caches only; k_cache and v_cache are "
                             f"{k_cache.dtype}")
        return
    missing = [name for name, t in named if t is None]
    if missing:
        raise ValueError(f"fp8 KV caches ({k_cache.dtype}, {v_cache.dtype}) need {' and '.join(names)} (fp32, see "
                         f"tileattn.quant); {' and '.join(missing)} missing")
    for (name, t), cache, new in zip(named, (k_cache, v_cache), ("k_new", "v_new")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (fp32), got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.device != cache.device:
            raise ValueError(f"{name} must be on the cache's device {cache.device}, got {t.device}")
        granularity = quant.scale_granularity(t, cache, paged, batch, name=name)
        if granularity == "token" and writes:
            if any(stride == 0 and size > 1 for stride, size in zip(t.stride(), t.shape)):
                raise ValueError(f"{name} must be writable: the new tokens' ({new}) per-token scales are written into "
                                 "it, and this view (stride 0) shares one value among positions")
            if t.requires_grad:
                raise ValueError(f"{name} must not require grad: the new tokens' ({new}) per-token scales are "
                                 "written into it in place")


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Exact merge of two partial attentions of the same queries over disjoint key sets.

    ``out_*``: ``[..., D]`` (e.g. ``[B, H, S, D]``); ``lse_*``: natural-log, ``out_*.shape[:-1]``. The result
    ``(out, lse)`` equals attention over the union of the key sets (``lse`` fp32). Used by split-KV
    decoding, and the building block of shared-prefix and ring attention.
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
        if t.device != out_a.device:
            raise ValueError(f"{name} must be on out_a's device {out_a.device}, got {t.device}")
    if out_b.shape != out_a.shape or lse_a.shape != out_a.shape[:-1] or lse_b.shape != out_a.shape[:-1]:
        raise ValueError(f"expected out_a, out_b of one shape [..., D] and lse_a, lse_b of shape [...], got "
                         f"{tuple(out_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_a.shape)}, {tuple(lse_b.shape)}")
    return reference.merge_attention(out_a, lse_a, out_b, lse_b)


def _check_attention_call(q, k, v, causal, scale, mask, window, softcap):
    """Validate ``attention``'s arguments; returns the normalized ``scale, (left, right), softcap, mask``."""
    _check_tensors(q, k, v)
    scale = _check_scale(q.shape[-1], scale)
    window = _check_window(window, causal)
    softcap = _check_softcap(softcap)
    if mask is not None:
        mask = _check_mask(mask, q, k)
    return scale, window, softcap, mask


def _decide(q, k, v, backend, causal, mask, window, softcap, return_lse) -> dispatch.Decision:
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    left, right = window
    windowed = left != UNBOUNDED or (right != UNBOUNDED and not causal)  # causal alone is the window (-1, 0)
    return dispatch.decide(q, k, v, backend, causal=causal, has_mask=mask is not None, windowed=windowed,
                           softcap=softcap, return_lse=bool(return_lse))


def _backend(q, v, backend, k=None):
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    return dispatch.choose_backend(q, v, backend, k=k)


class _NoBackward(torch.autograd.Function):
    """A Triton entry point that has no backward yet, run on inputs that require grad (``backend="triton"`` asked
    for explicitly; ``auto`` picks a path with a backward). The forward runs, so inference that forgot
    ``torch.no_grad()`` keeps working; its results join the autograd graph, so a backward through them raises
    instead of leaving those inputs without their gradient: PyTorch's own rule for an operation that has no
    derivative. ``apply(entry_point, run, *inputs)``: ``run()`` gives the results, ``inputs`` (the tensors that
    require grad) are the graph's edges."""

    @staticmethod
    def forward(ctx, entry_point, run, *inputs):
        ctx.entry_point = entry_point
        return run()

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.entry_point} ran on backend='triton', whose kernel has no backward yet, so it "
                           "cannot give the gradients asked for: use backend='auto', which runs calls that require "
                           "grad on a path with a backward (or backend='torch'), or run inference under "
                           "torch.no_grad()")


def _without_backward(entry_point, run, *inputs):
    """``run()``'s results, through :class:`_NoBackward` when gradients are asked for (grad mode on and one of
    ``inputs`` requiring grad; ``inputs`` may hold None), else plain ``run()``."""
    needing = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if torch.is_grad_enabled() and needing:
        return _NoBackward.apply(entry_point, run, *needing)
    return run()


def _may_read_device_values() -> bool:
    """Checks that read tensor values sync with the device: skip them where a sync is illegal."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _check_int_tensor(name, t, device, rank):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {t.dtype}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dim(s), got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def _check_cache_bounds(k_cache, cache_seqlens, new_tokens, block_table):
    """Every sequence's tokens (after the append) fit its cache row or its pages, and page ids exist."""
    lengths = cache_seqlens.long() + new_tokens
    if cache_seqlens.numel() and int(cache_seqlens.min()) < 0:
        raise CacheBoundsError(f"cache_seqlens must be >= 0, got {cache_seqlens.tolist()}")
    capacity = k_cache.shape[2] * (block_table.shape[1] if block_table is not None else 1)
    if lengths.numel() and int(lengths.max()) > capacity:
        raise CacheBoundsError(f"a sequence of {int(lengths.max())} tokens (cache_seqlens + new tokens) exceeds the "
                         f"cache capacity of {capacity} tokens per sequence")
    if block_table is not None and lengths.numel():
        used = (lengths + k_cache.shape[2] - 1) // k_cache.shape[2]  # pages each sequence uses
        in_use = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < used[:, None]
        ids = block_table[in_use]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= k_cache.shape[0]):
            raise CacheBoundsError(f"block_table holds page ids outside [0, {k_cache.shape[0]}) in pages in use")


def _check_tensors(q, k, v, *, layout="[batch, heads, seq, head_dim]", same_batch=True, kv_dtypes=None):
    """Types, ranks, dtypes, devices, head counts and head dims of q/k/v: q's and k's equal, from 1 to
    :data:`MAX_HEAD_DIM_QK`; v's its own, from 1 to :data:`MAX_HEAD_DIM_V` (which backends take them is dispatch's
    to say). ``layout`` names the dims; heads are dim 1 and head_dim the last dim in every layout we take.
    ``kv_dtypes``: the dtypes k and v may each have (a quantized cache's), instead of q's."""
    rank = layout.count(",") + 1
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims {layout}, got shape {tuple(t.shape)}")
        allowed = FLOAT_DTYPES if name == "q" or kv_dtypes is None else kv_dtypes
        if t.dtype not in allowed:
            raise TypeError(f"{name} must be {_dtype_names(allowed)}, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if kv_dtypes is None and t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if same_batch and t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch size {t.shape[0]} != q batch size {q.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head_dim {k.shape[-1]} != q head_dim {q.shape[-1]} (v's may differ, q's and k's may not)")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    hq, hkv, d, d_v = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    if not 1 <= d <= MAX_HEAD_DIM_QK:
        raise ValueError(f"q/k head_dim must be between 1 and {MAX_HEAD_DIM_QK}, got {d}")
    if not 1 <= d_v <= MAX_HEAD_DIM_V:
        raise ValueError(f"v head_dim must be between 1 and {MAX_HEAD_DIM_V}, got {d_v}")


def _dtype_names(dtypes) -> str:
    """``float16, bfloat16 or float32`` for those dtypes."""
    names = [str(dtype).removeprefix("torch.") for dtype in dtypes]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def _check_scale(head_dim, scale):
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def _check_window(window, causal):
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if window is not None:
        if not isinstance(window, (tuple, list)) or len(window) != 2:
            raise ValueError(f"window must be None or a (left, right) pair, got {window!r}")
        for side, w in zip(("left", "right"), window):
            if w is None:
                continue
            if isinstance(w, bool) or not isinstance(w, numbers.Integral):
                raise ValueError(f"window {side} must be an int >= 0, -1 or None, got {w!r}")
            if w < -1:
                raise ValueError(f"window {side} must be >= 0, or -1/None for unbounded, got {w}")
    return window_bounds(causal, window)


def _check_softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a positive number or None, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a finite number > 0 (None disables it), got {softcap}")
    return float(softcap)


def _check_mask(mask, q, k):
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = attend) or floating point (additive), got {mask.dtype}")
    if mask.device != q.device:
        raise ValueError(f"mask must be on q's device {q.device}, got {mask.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    try:
        return mask.expand(target)  # a view: broadcast dims get stride 0, nothing is copied
    except RuntimeError:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, Sq, Sk] = {list(target)}"
        ) from None
