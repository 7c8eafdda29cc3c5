"""``tileattn.attention``: validation, the cases that need no kernel, dispatch to a backend."""

from __future__ import annotations

import math
import numbers

import torch

from . import dispatch
from .reference import naive_attention, tiled_attention, window_bounds

MAX_HEAD_DIM = 256
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
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact softmax attention ``softmax(q @ k^T * scale + mask) @ v``, computed block by block.

    Args:
        q: ``[B, Hq, Sq, D]``. Any strides: a ``[B, S, H, D]`` tensor is passed as ``x.transpose(1, 2)``.
        k, v: ``[B, Hkv, Sk, D]`` with ``Hq % Hkv == 0`` (GQA/MQA; K/V are never repeated in memory).
            q, k, v share dtype (float16, bfloat16, float32; float64 on the torch backends) and device.
            ``D`` is any value from 1 to 256.
        causal: query ``i`` sees key ``j`` iff ``j <= i + Sk - Sq`` (bottom-right aligned, the KV-cache
            convention; PyTorch SDPA's ``is_causal`` is top-left aligned, which differs when Sq != Sk).
        scale: softmax scale, default ``D ** -0.5``.
        mask: bool (True = attend) or float (added to the scaled scores) tensor broadcastable to
            ``[B, Hq, Sq, Sk]``, on q's device.
        window: ``(left, right)``: query ``i`` sees keys ``i + Sk - Sq - left ..= i + Sk - Sq + right``;
            None or -1 leaves a side unbounded. Combined with ``causal``, ``right`` is capped at 0.
        softcap: if given (> 0), scores become ``softcap * tanh(scores / softcap)`` before masking.
        return_lse: also return the natural-log logsumexp of each row, fp32 ``[B, Hq, Sq]``.
        backend: ``"auto"``, ``"triton"``, ``"torch"`` (tiled PyTorch) or ``"naive"`` (see ``dispatch``).

    Returns:
        ``out`` with q's dtype, device and logical shape ``[B, Hq, Sq, D]`` (same memory layout as q when
        q is dense), or ``(out, lse)``. A row that sees no key gets output 0 and lse ``-inf``. Scores are
        accumulated in fp32 (fp64 for fp64 inputs). NaN/Inf in q/k/v propagate as IEEE arithmetic does
        (a NaN in a key a row sees makes that row NaN); inputs are not scanned.
    """
    _check_tensors(q, k, v)
    scale = _check_scale(q.shape[-1], scale)
    left, right = _check_window(window, causal)
    softcap = _check_softcap(softcap)
    if mask is not None:
        mask = _check_mask(mask, q, k)
    if backend not in dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {dispatch.BACKENDS}, got {backend!r}")
    chosen = dispatch.choose_backend(q, backend)

    b, hq, sq, d = q.shape
    sk = k.shape[2]
    if b == 0 or sq == 0 or sk == 0:  # nothing to launch: empty result, or rows that see no key
        out = q.new_zeros(q.shape)
        lse = torch.full((b, hq, sq), float("-inf"), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out

    options = dict(scale=scale, mask=mask, softcap=softcap)
    if chosen == "triton":
        from .kernels.prefill import prefill_attention

        out, lse = prefill_attention(q, k, v, window=(left, right), return_lse=bool(return_lse), **options)
    else:
        reference = tiled_attention if chosen == "torch" else naive_attention
        result = reference(q, k, v, window=(left, right), return_lse=return_lse, **options)
        out, lse = result if return_lse else (result, None)
    return (out, lse) if return_lse else out


def _check_tensors(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} batch size {t.shape[0]} != q batch size {q.shape[0]}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} head_dim {t.shape[3]} != q head_dim {q.shape[3]}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same heads and length, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[3]
    if hq == 0 or hkv == 0 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be between 1 and {MAX_HEAD_DIM}, got {d}")


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
