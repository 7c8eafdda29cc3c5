"""tileattn as PyTorch's SDPA flash-attention implementation, through torch's flash-attention registry.

PyTorch (>= 2.10) lets a library back the flash backend of ``F.scaled_dot_product_attention`` and
``torch.nn.attention.varlen.varlen_attn``: a provider registers a name with
``torch.nn.attention.register_flash_attention_impl(name, register_fn=...)``; a user activates it with
``activate_flash_attention_impl(name)``, and ``restore_flash_attention_impl()`` goes back to PyTorch's own kernels.
``import tileattn`` registers ``"TILEATTN"`` where the installed torch has the registry, and activates nothing::

    import tileattn
    tileattn.use_for_sdpa()       # = torch.nn.attention.activate_flash_attention_impl("TILEATTN"), and says so
    ...                           # SDPA calls that take the flash backend, and varlen_attn, run tileattn's kernels
    tileattn.restore_sdpa()       # PyTorch's flash kernels again

Activation overrides, on the CUDA dispatch key, the aten ops that SDPA's flash backend and ``varlen_attn`` reach:
``_scaled_dot_product_flash_attention`` (``[B, H, S, D]``), ``_flash_attention_forward`` (dense ``[B, S, H, D]``, or
packed ``[tokens, H, D]`` with ``cum_seq_q``/``cum_seq_k``: varlen_attn's), ``_flash_attention_forward_no_dropout_inplace``
where the installed torch has it (``varlen_attn_out``), and the two backward ops, which run tileattn's Triton
FlashAttention backward. Each returns what the op's schema and PyTorch's meta function say: the output with the
query's memory layout, fp32 logsumexp ``[B, Hq, Sq]`` (dense) or ``[Hq, total_q]`` (packed), zero rng-state and
offset placeholders (uint64 ``[2]`` and ``[]``: no dropout is ever drawn), an empty debug mask, and for the SDPA op
``None`` cumulative lengths and the two lengths. One difference from PyTorch's FlashAttention-2: a query row that
sees no key (bottom-right causal with Sq > Sk, windows) gets logsumexp ``-inf`` (tileattn's rule, which
``merge_attention`` and our backward expect), where FlashAttention-2 writes ``+inf``; its output is 0 in both.

What the kernels cannot compute exactly raises a RuntimeError naming it before any launch (dropout, the debug mask,
ALiBi slopes through these ops, ``seqused_k``/``block_table``, head dims other than ``D == D_v <= 256``, dtypes
other than fp16/bf16/fp32, fp8 ``.quantized`` calls are not overridden and stay PyTorch's). Causal is bottom-right
aligned, as FlashAttention-2's is (SDPA itself sends the flash backend causal calls with Sq == Sk only).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

NAME = "TILEATTN"

# Ops overridden on activation, by aten name; those the installed torch lacks are skipped (torch 2.11 has no
# _flash_attention_forward_no_dropout_inplace).
_OPS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_flash_attention_forward",
    "_flash_attention_forward_no_dropout_inplace",
    "_flash_attention_backward",
)
_MAX_HEAD_DIM = 256  # the Triton kernels' limit (tileattn.dispatch.TRITON_MAX_HEAD_DIM)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ---- the registry: register on import, activate and restore on request ----------------------------------------

def _registry():
    """``torch.nn.attention`` when it has the flash-attention registry, else None."""
    try:
        import torch.nn.attention as attention
    except ImportError:  # pragma: no cover - every torch we support has the module
        return None
    names = ("register_flash_attention_impl", "activate_flash_attention_impl", "restore_flash_attention_impl",
             "current_flash_attention_impl", "list_flash_attention_impls")
    return attention if all(hasattr(attention, n) for n in names) else None


def registry_missing_reason() -> str | None:
    """Why tileattn cannot back SDPA's flash backend with this torch, or None when it can be registered."""
    if _registry() is None:
        return (f"torch {torch.__version__} has no flash-attention registry (torch.nn.attention."
                "register_flash_attention_impl, torch >= 2.10): SDPA keeps PyTorch's own kernels; tileattn.attention "
                "and the Transformers/timm integrations work as before")
    return None


def register() -> bool:
    """Register ``"TILEATTN"`` with torch's flash-attention registry (done by ``import tileattn``); activates nothing.
    Returns whether the registry exists. Idempotent."""
    attention = _registry()
    if attention is None:
        return False
    attention.register_flash_attention_impl(NAME, register_fn=_activate)
    return True


def is_active() -> bool:
    """Whether ``"TILEATTN"`` is the active flash-attention implementation."""
    attention = _registry()
    return attention is not None and attention.current_flash_attention_impl() == NAME


def use_for_sdpa(*, strict: bool = False, verbose: bool = True) -> str:
    """Route SDPA's flash backend and ``varlen_attn`` to tileattn's kernels:
    ``torch.nn.attention.activate_flash_attention_impl("TILEATTN")``.

    Returns a line saying what was done (printed too unless ``verbose=False``). Where it cannot be done (a torch
    without the registry, no Triton), nothing changes: the line says why and a ``UserWarning`` carries it, or with
    ``strict=True`` a RuntimeError. SDPA picks its backend per call: on an H100 with torch 2.11 a plain causal
    bf16 call runs cuDNN's kernel, not the flash backend; ``with torch.nn.attention.sdpa_kernel(
    SDPBackend.FLASH_ATTENTION):`` makes such calls take the flash backend, hence tileattn's kernels.
    """
    reason = registry_missing_reason() or _triton_missing_reason()
    if reason is None:
        attention = _registry()
        register()  # in case the registry was reset since import
        previous = attention.current_flash_attention_impl()
        attention.activate_flash_attention_impl(NAME)
        where = ("" if torch.cuda.is_available() else
                 " (no CUDA device here: the override is on CUDA tensors only, CPU calls are unaffected)")
        message = (f"tileattn: SDPA's flash backend and varlen_attn now run tileattn's Triton kernels on CUDA{where}"
                   + (f"; replaced {previous}" if previous not in (None, NAME) else "")
                   + ". tileattn.restore_sdpa() undoes it.")
    else:
        message = f"tileattn: not activated for SDPA, nothing changed: {reason}"
        if strict:
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=2)
    if verbose:
        print(message)
    return message


def restore_sdpa(*, verbose: bool = True) -> str:
    """Undo :func:`use_for_sdpa` (``torch.nn.attention.restore_flash_attention_impl()``): PyTorch's flash kernels
    again. Another provider that is active instead of tileattn is left alone. Returns what was done (printed too
    unless ``verbose=False``)."""
    attention = _registry()
    if attention is None:
        message = f"tileattn: nothing to restore: {registry_missing_reason()}"
    elif attention.current_flash_attention_impl() == NAME:
        attention.restore_flash_attention_impl()
        message = "tileattn: SDPA's flash backend runs PyTorch's own kernels again."
    else:
        current = attention.current_flash_attention_impl()
        message = ("tileattn: was not active, nothing changed"
                   + (f" ({current} is active; torch.nn.attention.restore_flash_attention_impl() restores it)"
                      if current else ""))
    if verbose:
        print(message)
    return message


def _triton_missing_reason() -> str | None:
    from ..dispatch import triton_import_error

    err = triton_import_error()
    return None if err is None else f"tileattn's SDPA implementation runs Triton kernels, and {err}"


@dataclasses.dataclass
class _Handle:
    """What the registry keeps while tileattn is active: ``remove()`` unregisters the overrides."""

    library: object

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()  # drops the kernels from the dispatcher now, not at garbage collection
        self.library = None


def _activate() -> _Handle:
    """The registry's ``register_fn``: override the aten flash ops on CUDA with tileattn's kernels."""
    reason = _triton_missing_reason()
    if reason:
        raise RuntimeError(reason)
    return _Handle(register_kernels("CUDA"))


def register_kernels(dispatch_key: str = "CUDA") -> torch.library.Library:
    """A ``torch.library.Library`` holding tileattn's implementations of the flash ops for ``dispatch_key``
    (``_destroy()`` removes them). The registry's activation uses ``"CUDA"``; tests use ``"CPU"`` to run the same
    implementations through the dispatcher under Triton's interpreter."""
    lib = torch.library.Library("aten", "IMPL", dispatch_key)
    impls = {
        "_scaled_dot_product_flash_attention": _sdpa_flash_forward,
        "_scaled_dot_product_flash_attention_backward": _sdpa_flash_backward,
        "_flash_attention_forward": _flash_forward,
        "_flash_attention_forward_no_dropout_inplace": _flash_forward_inplace,
        "_flash_attention_backward": _flash_backward,
    }
    with warnings.catch_warnings():  # replacing PyTorch's CUDA kernel is the point: no "Overriding ..." warning
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in _OPS:
            if hasattr(torch.ops.aten, name):
                lib.impl(name, impls[name], dispatch_key)
    return lib


# ---- checks ----------------------------------------------------------------------------------------------------

def _unsupported(op: str, problem: str):
    return RuntimeError(f"{NAME} (tileattn) {op} unsupported: {problem}. Call tileattn.restore_sdpa() to run "
                        "PyTorch's own flash kernel instead")


def _check(op, q, k, v, *, dropout_p=0.0, return_debug_mask=False, alibi_slopes=None, seqused_k=None,
           block_table=None, extra=None, packed=False):
    if dropout_p != 0.0:
        raise _unsupported(op, f"dropout_p={dropout_p} (tileattn computes exact attention, no dropout; "
                               "use dropout_p=0, e.g. model.eval())")
    if return_debug_mask:
        raise _unsupported(op, "return_debug_mask=True")
    if alibi_slopes is not None:
        raise _unsupported(op, "alibi_slopes through the aten flash op (its backward op carries no slopes); "
                               "tileattn.attention(..., alibi_slopes=...) takes them with gradients")
    if seqused_k is not None:
        raise _unsupported(op, "seqused_k")
    if block_table is not None:
        raise _unsupported(op, "block_table (paged K/V); tileattn.attention_with_kvcache takes paged caches")
    for name, value in (extra or {}).items():
        if value is not None:
            raise _unsupported(op, f"argument {name}={value!r} (from a newer torch than this tileattn knows)")
    rank = 3 if packed else 4
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.dim() != rank:
            layout = "[tokens, heads, head_dim]" if packed else "4-D"
            raise _unsupported(op, f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise _unsupported(op, f"{name} dtype {t.dtype} (tileattn's kernels take float16, bfloat16, float32)")
        if t.dtype != q.dtype or t.device != q.device:
            raise _unsupported(op, f"query, key, value must share dtype and device, got {q.dtype}/{q.device}, "
                                   f"{name} {t.dtype}/{t.device}")
    d, d_k, d_v = q.shape[-1], k.shape[-1], v.shape[-1]
    if not (d == d_k == d_v) or d > _MAX_HEAD_DIM:
        raise _unsupported(op, f"head dims q {d}, k {d_k}, v {d_v} (tileattn's kernels take equal head dims up to "
                               f"{_MAX_HEAD_DIM})")


def _check_heads(op, hq, hkv):
    if hkv == 0 or hq % hkv != 0:
        raise _unsupported(op, f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")


def _window(is_causal, left, right):
    from ..reference import window_bounds

    return window_bounds(bool(is_causal), (left, right))


def _scale(scale, head_dim):
    return head_dim ** -0.5 if scale is None else float(scale)


def _device_guard(t):
    """The device context a launch on ``t`` needs: Triton launches on the current device, the dispatcher sets none
    for Python kernels."""
    import contextlib

    if t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _placeholders(q):
    """The rng state, philox offset and debug mask of a call without dropout (the meta function's shapes)."""
    return (torch.zeros((2,), dtype=torch.uint64, device=q.device),
            torch.zeros((), dtype=torch.uint64, device=q.device),
            torch.empty(0, dtype=q.dtype, device=q.device))


# ---- forward ---------------------------------------------------------------------------------------------------

def _attend_bhsd(q, k, v, out=None, *, scale, window):
    """Attention of ``[B, H, S, D]`` views: ``(out, lse fp32 [B, Hq, Sq] contiguous)``, written into ``out`` (a view
    shaped like q) when given, else into a tensor like q (``torch.empty_like(q)``). Decode-shaped calls take the
    split-KV kernel, as ``tileattn.attention`` does."""
    b, hq, sq, _ = q.shape
    sk = k.shape[2]
    if b * hq * sq == 0 or sk == 0:  # nothing to launch: rows that see no key get 0 and lse -inf
        out = torch.zeros_like(q) if out is None else out.zero_()
        return out, torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
    from .. import dispatch

    with _device_guard(q):
        if dispatch.decode_shaped(q, k):
            from ..kernels.decode import decode_attention

            capturing = q.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
            result, lse = decode_attention(q, k, v, None, new_tokens=sk, window=window, scale=scale, return_lse=True,
                                           reuse_workspace=not capturing)  # result: torch.empty_like(q)
            if out is None:
                return result, lse
            return out.copy_(result), lse
        from ..kernels.prefill import prefill_attention

        return prefill_attention(q, k, v, window=window, scale=scale, return_lse=True, out=out)


def _attend_packed(q, k, v, out, cu_q, cu_k, max_q, max_k, *, scale, window):
    """Packed ``[tokens, H, D]`` sequences into ``out``; returns lse fp32 ``[Hq, total_q]``."""
    if q.shape[0] == 0 or cu_q.shape[0] <= 1 or k.shape[0] == 0:
        out.zero_()
        return torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    from ..kernels.prefill import prefill_attention_varlen

    with _device_guard(q):
        _, lse = prefill_attention_varlen(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k),
                                          window=window, scale=scale, return_lse=True, out=out)
    return lse


def _sdpa_flash_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None,
                        **extra):
    """``aten::_scaled_dot_product_flash_attention``: ``[B, H, S, D]`` in, ``(out like query, lse [B, Hq, Sq],
    None, None, Sq, Sk, rng_state, philox_offset, debug_mask)`` out."""
    op = "SDPA flash forward"
    _check(op, query, key, value, dropout_p=dropout_p, return_debug_mask=return_debug_mask, extra=extra)
    _check_heads(op, query.shape[1], key.shape[1])
    out, lse = _attend_bhsd(query, key, value, scale=_scale(scale, query.shape[-1]), window=_window(is_causal, -1, -1))
    rng_state, offset, debug_mask = _placeholders(query)
    return out, lse, None, None, query.shape[2], key.shape[2], rng_state, offset, debug_mask


def _flash_forward_into(op, out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                        return_debug_mask, scale, window_size_left, window_size_right, seqused_k, alibi_slopes,
                        block_table, extra):
    packed = cum_seq_q is not None
    _check(op, query, key, value, dropout_p=dropout_p, return_debug_mask=return_debug_mask, alibi_slopes=alibi_slopes,
           seqused_k=seqused_k, block_table=block_table, extra=extra, packed=packed)
    _check_heads(op, query.shape[-2], key.shape[-2])
    window = _window(is_causal, -1 if window_size_left is None else window_size_left,
                     -1 if window_size_right is None else window_size_right)
    scale = _scale(scale, query.shape[-1])
    if packed:
        if cum_seq_k is None:
            raise _unsupported(op, "cum_seq_q without cum_seq_k")
        return _attend_packed(query, key, value, out, cum_seq_q, cum_seq_k, max_q, max_k, scale=scale, window=window)
    if cum_seq_k is not None:
        raise _unsupported(op, "cum_seq_k without cum_seq_q")
    # dense [B, S, H, D]: the kernels take [B, H, S, D] views of the same memory
    return _attend_bhsd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), out.transpose(1, 2),
                        scale=scale, window=window)[1]


def _flash_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *,
                   scale=None, window_size_left=None, window_size_right=None, seqused_k=None, alibi_slopes=None,
                   block_table=None, num_splits=None, **extra):
    """``aten::_flash_attention_forward``: dense ``[B, S, H, D]`` or packed ``[tokens, H, D]`` (varlen_attn) in,
    ``(out like query, lse, rng_state, unused, debug_mask)`` out (``num_splits`` is a hint: the result does not
    depend on it)."""
    out = torch.empty_like(query)
    lse = _flash_forward_into("flash_attention forward", out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k,
                              dropout_p, is_causal, return_debug_mask, scale, window_size_left, window_size_right,
                              seqused_k, alibi_slopes, block_table, extra)
    return (out, lse, *_placeholders(query))


def _flash_forward_inplace(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
                           return_debug_mask, *, scale=None, window_size_left=None, window_size_right=None,
                           seqused_k=None, alibi_slopes=None, block_table=None, num_splits=None, **extra):
    """``aten::_flash_attention_forward_no_dropout_inplace`` (varlen_attn_out): writes ``out``, returns lse."""
    op = "flash_attention forward (in place)"
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        raise _unsupported(op, f"out must be like query ({tuple(query.shape)}, {query.dtype}), got "
                               f"{tuple(out.shape)}, {out.dtype}")
    return _flash_forward_into(op, out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                               is_causal, return_debug_mask, scale, window_size_left, window_size_right, seqused_k,
                               alibi_slopes, block_table, extra)


# ---- backward --------------------------------------------------------------------------------------------------

def _check_backward(op, grad_out, q, k, v, out, lse, dropout_p, packed, extra):
    _check(op, q, k, v, dropout_p=dropout_p, packed=packed, extra=extra)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.dtype != q.dtype:
            raise _unsupported(op, f"{name} must be like query ({tuple(q.shape)}, {q.dtype}), got "
                                   f"{tuple(t.shape)}, {t.dtype}")
    if lse.dtype != torch.float32:
        raise _unsupported(op, f"logsumexp must be float32, got {lse.dtype}")


def _gradients_bhsd(grad_out, q, k, v, out, lse, *, scale, window):
    """``(dq, dk, dv)`` of ``[B, H, S, D]`` views (like q, k, v), through tileattn's Triton backward."""
    if q.numel() == 0 or k.shape[2] == 0:  # no key or no query: every gradient is 0
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    from ..kernels.backward import attention_backward

    with _device_guard(q):
        dq, dk, dv, _ = attention_backward(grad_out, q, k, v, out, lse, window=window, scale=scale)
    return dq, dk, dv


def _sdpa_flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                         is_causal, philox_seed, philox_offset, *, scale=None, **extra):
    """``aten::_scaled_dot_product_flash_attention_backward``: ``[B, H, S, D]`` tensors, ``(dq, dk, dv)``."""
    op = "SDPA flash backward"
    _check_backward(op, grad_out, query, key, value, out, logsumexp, dropout_p, False, extra)
    return _gradients_bhsd(grad_out, query, key, value, out, logsumexp, scale=_scale(scale, query.shape[-1]),
                           window=_window(is_causal, -1, -1))


def _flash_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                    is_causal, rng_state, unused, *, scale=None, window_size_left=None, window_size_right=None,
                    **extra):
    """``aten::_flash_attention_backward``: dense ``[B, S, H, D]``, or packed ``[tokens, H, D]`` (varlen_attn's
    backward: run sequence by sequence, reading the cumulative lengths on the host)."""
    op = "flash_attention backward"
    packed = cum_seq_q is not None and cum_seq_q.numel() > 0
    _check_backward(op, grad_out, query, key, value, out, logsumexp, dropout_p, packed, extra)
    scale = _scale(scale, query.shape[-1])
    window = _window(is_causal, -1 if window_size_left is None else window_size_left,
                     -1 if window_size_right is None else window_size_right)
    if not packed:
        t = [x.transpose(1, 2) for x in (grad_out, query, key, value, out)]
        dq, dk, dv = _gradients_bhsd(*t, logsumexp, scale=scale, window=window)
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
    if cum_seq_k is None or cum_seq_k.numel() != cum_seq_q.numel():
        raise _unsupported(op, "packed backward needs cum_seq_q and cum_seq_k of one length")
    dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    starts_q, starts_k = cum_seq_q.tolist(), cum_seq_k.tolist()  # a host sync: the per-sequence launches need them
    for (q0, q1), (k0, k1) in zip(zip(starts_q, starts_q[1:]), zip(starts_k, starts_k[1:])):
        if q1 <= q0 or k1 <= k0:
            continue  # no query or no key: zero gradients

        def bhsd(x, a, b):  # tokens a..b of [tokens, H, D] as a [1, H, S, D] view
            return x[a:b].transpose(0, 1).unsqueeze(0)

        g = _gradients_bhsd(bhsd(grad_out, q0, q1), bhsd(query, q0, q1), bhsd(key, k0, k1), bhsd(value, k0, k1),
                            bhsd(out, q0, q1), logsumexp[:, q0:q1].unsqueeze(0), scale=scale, window=window)
        bhsd(dq, q0, q1).copy_(g[0])
        bhsd(dk, k0, k1).copy_(g[1])
        bhsd(dv, k0, k1).copy_(g[2])
    return dq, dk, dv
