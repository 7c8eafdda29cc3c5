"""FP8 KV caches: the formats, the scale granularities, and the quantization rule every backend shares.

A cache stored as ``torch.float8_e4m3fn`` or ``torch.float8_e5m2`` comes with an fp32 scale; a stored value ``x``
means ``x.float() * scale`` (the product rounded to fp32), and attention is exact over those dequantized values.

Scale granularities, told apart by shape (a cache is ``[N, Hkv, S, D]``: contiguous ``[B, Hkv, S_max, D]`` or paged
``[num_pages, Hkv, page_size, D]``):

* ``"tensor"``: 0-d, one scale for the whole cache;
* ``"head"``: ``[Hkv]``, one per KV head, or ``[B, Hkv]``, one per sequence and KV head (flash-attn 3's descale;
  ``B`` is the call's batch, which for a paged cache is ``block_table``'s rows, not the number of pages);
* ``"token"``: the cache's shape without the head dim, ``[B, Hkv, S_max]`` or ``[num_pages, Hkv, page_size]``:
  one scale per token and KV head, computed when the token is written.

The write rule (:func:`quantize`): divide by the scale in fp32, saturate finite quotients to the format's largest
finite value (e4m3fn has no infinity; e5m2's would otherwise overflow to it), round to nearest even. NaN and
``+-inf`` inputs are stored as NaN, so they make NaN every row that sees them, as the library's NaN rule says of any
NaN key or value. Per-token scales (:func:`token_scales`) are ``amax / format max`` over each token's finite
elements; a token with no finite element of magnitude above zero gets scale 1.0 (see there).

This module imports nothing of tileattn: the API, the PyTorch backends and the kernels build on it.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_DTYPES", "FP8_MAX", "GRANULARITIES", "SMALLEST_SCALE", "is_fp8", "scale_granularity",
           "dequantize", "quantize", "token_scales", "amax_scale", "calibrate_scales", "quantize_kv_cache"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_MAX = {dtype: torch.finfo(dtype).max for dtype in FP8_DTYPES}  # 448.0 and 57344.0
GRANULARITIES = ("tensor", "head", "token")
# A computed scale below fp32's smallest normal would be a subnormal (flushed to 0 by GPU arithmetic, and
# x / 0 saturates): such tokens are stored at scale 1.0 instead, where their values round to (near) zero.
SMALLEST_SCALE = torch.finfo(torch.float32).tiny


def is_fp8(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is one of the FP8 cache formats (:data:`FP8_DTYPES`)."""
    return dtype in FP8_DTYPES


def scale_granularity(scale: torch.Tensor, cache: torch.Tensor, paged: bool, batch: int | None = None, *,
                      name: str = "scale") -> str:
    """The granularity of ``scale`` for ``cache`` (``"tensor"``, ``"head"`` or ``"token"``), from its shape alone.

    Args:
        scale: the cache's scales (only the shape is read).
        cache: ``[B, Hkv, S_max, D]`` (contiguous) or ``[num_pages, Hkv, page_size, D]`` (paged).
        paged: whether ``cache`` is a page pool.
        batch: the call's number of sequences, the ``B`` of a ``[B, Hkv]`` scale; default the cache's first dim
            when contiguous. A paged cache's ``[B, Hkv]`` scale needs it (the pool's first dim counts pages).
        name: the argument named in the error.
    Raises:
        ValueError: any other shape, naming the allowed ones.
    """
    heads = cache.shape[1]
    if batch is None and not paged:
        batch = cache.shape[0]
    shape = tuple(scale.shape)
    if shape == ():
        return "tensor"
    if shape == (heads,) or (batch is not None and shape == (batch, heads)):
        return "head"
    if shape == tuple(cache.shape[:3]):
        return "token"
    layout = "[num_pages, Hkv, page_size]" if paged else "[B, Hkv, S_max]"
    raise ValueError(f"{name} must be 0-d (per tensor), [{heads}] or [{'B' if batch is None else batch}, {heads}] "
                     f"(per KV head) or {list(cache.shape[:3])} = {layout} (per token and KV head), got {list(shape)}")


def _over_tokens(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` of any granularity shaped to broadcast over ``[N, Hkv, S, D]`` values (by rank: 0-d, ``[Hkv]``,
    ``[N, Hkv]``, ``[N, Hkv, S]``)."""
    if scale.dim() == 3:
        return scale[..., None]
    if scale.dim() in (1, 2):
        return scale[..., None, None]
    return scale


def dequantize(cache: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The values an fp8 ``cache`` ``[N, Hkv, S, D]`` stands for: ``cache.float() * scale``, fp32, same shape.

    ``scale`` (fp32) is 0-d, ``[Hkv]``, ``[N, Hkv]`` or ``[N, Hkv, S]``. For a paged cache's per-sequence
    ``[B, Hkv]`` scale, dequantize each sequence's gathered tokens with its row (see
    :func:`tileattn.reference.gather_cache`).
    """
    return cache.float() * _over_tokens(scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> torch.Tensor:
    """``x`` ``[N, Hkv, S, D]`` (any float dtype) stored in the fp8 ``dtype`` at ``scale``, by the write rule.

    The quotient ``x.float() / scale`` is computed in fp32, finite quotients are saturated to
    ``+-FP8_MAX[dtype]`` and rounded to nearest even; a NaN or infinite ``x`` is stored as NaN (whatever the
    scale). ``scale`` (fp32) is 0-d, ``[Hkv]``, ``[N, Hkv]`` or ``[N, Hkv, S]``, positive and finite (not
    checked: a scale of 0 saturates every nonzero value, and 0 / 0 stores NaN).
    Returns an fp8 tensor of ``x``'s shape.
    """
    largest = FP8_MAX[dtype]
    quotient = (x.float() / _over_tokens(scale)).clamp(-largest, largest)
    # The clamp is explicit because torch's own cast does not saturate e5m2 (finite values overflow to inf there),
    # and not every version saturates e4m3fn; it keeps NaN, and an infinite x becomes NaN below.
    return torch.where(torch.isfinite(x), quotient, float("nan")).to(dtype)


def amax_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale that maps ``amax`` (fp32, of finite values) onto the format's largest value: ``amax / FP8_MAX``,
    or 1.0 where that is below fp32's smallest normal (``amax`` 0 included), so a scale is always a positive
    normal fp32 and an all-zero token stores zeros."""
    # The correctly rounded fp32 quotient, as the kernels' div_rn gives it, on every device and under torch.compile:
    # CUDA and Inductor divide by a Python scalar as a multiply by its reciprocal, which in fp32 is not correctly
    # rounded. In float64 either way is, once rounded to fp32: FP8_MAX is 7 * 2^k, so amax / FP8_MAX lies at least
    # 1/14 of an fp32 ulp from any fp32 rounding midpoint, far beyond float64's error.
    if amax.device.type == "mps":  # no float64 there; a tensor divisor is divided, correctly rounded
        scale = amax.float() / torch.full_like(amax.float(), FP8_MAX[dtype])
    else:
        scale = (amax.double() / FP8_MAX[dtype]).float()
    return torch.where(scale >= SMALLEST_SCALE, scale, 1.0)


def _finite_magnitudes(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` in fp32 with NaN and infinities as 0: they are stored as NaN whatever the scale, so they do not set
    it (the token's other values keep their precision)."""
    magnitudes = x.float().abs()
    return torch.where(torch.isfinite(magnitudes), magnitudes, 0.0)


def token_scales(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-token scales of new tokens ``x`` ``[N, Hkv, S, D]``: fp32 ``[N, Hkv, S]``, each
    :func:`amax_scale` of the token's largest finite magnitude. A token whose values are all 0 (or all
    non-finite) gets 1.0 and stores zeros (NaN where its input was not finite)."""
    return amax_scale(_finite_magnitudes(x).amax(dim=-1), dtype)


def calibrate_scales(sample: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                     granularity: str = "tensor") -> torch.Tensor:
    """Scales for a cache from sample keys or values ``[N, Hkv, S, D]`` (any float dtype): the
    :func:`amax_scale` of the sample's largest finite magnitude, per tensor (0-d) or per KV head (``[Hkv]``), fp32 on
    the sample's device. Values beyond the sample's range saturate when written later. Per-token scales are computed
    on write (:func:`token_scales`), so ``granularity`` is ``"tensor"`` or ``"head"``."""
    if granularity not in ("tensor", "head"):
        raise ValueError(f"granularity must be 'tensor' or 'head' (per-token scales are computed on write), got "
                         f"{granularity!r}")
    _check_format(dtype)
    if sample.dim() != 4:
        raise ValueError(f"sample must be [N, Hkv, S, D], got shape {tuple(sample.shape)}")
    magnitudes = _finite_magnitudes(sample)
    amax = magnitudes.amax() if granularity == "tensor" else magnitudes.amax(dim=(0, 2, 3))
    return amax_scale(amax, dtype)


def quantize_kv_cache(cache: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                      granularity: str = "tensor") -> tuple[torch.Tensor, torch.Tensor]:
    """An existing cache ``[N, Hkv, S, D]`` (contiguous or a page pool, any float dtype, e.g. bf16) stored as fp8.

    Returns ``(fp8 cache of the same shape, fp32 scale)``; the scale is 0-d (``"tensor"``), ``[Hkv]`` (``"head"``) or
    ``[N, Hkv, S]`` (``"token"``), from the cache's own values (:func:`calibrate_scales`, :func:`token_scales`).
    Every slot is quantized, the unused ones too: their values enter a tensor or head scale, so pass a cache whose
    unused slots hold zeros (or only the filled part) to keep them out of it.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    _check_format(dtype)
    if cache.dim() != 4:
        raise ValueError(f"cache must be [N, Hkv, S, D], got shape {tuple(cache.shape)}")
    scale = token_scales(cache, dtype) if granularity == "token" else calibrate_scales(cache, dtype, granularity)
    return quantize(cache, scale, dtype), scale


def _check_format(dtype):
    if not is_fp8(dtype):
        raise ValueError(f"dtype must be torch.float8_e4m3fn or torch.float8_e5m2, got {dtype}")
