"""Which backend runs a call, and why.

Backends:
  ``"triton"``       the fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``,
                    which is how CPU CI tests them). fp16, bf16, fp32, and KV caches in fp8 (``float8_e5m2``;
                    ``float8_e4m3fn`` from compute capability 8.9: see ``quantized_cache_reason``); every feature
                    and head dim (q/k up to 576, v up to 512, unequal allowed); the backward takes equal head dims up to
                    :data:`TRITON_BACKWARD_MAX_HEAD_DIM` (``auto`` differentiates the others on ``"torch"``).
  ``"sdpa"``         PyTorch SDPA's fused kernels (``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``; on CPU
                    its fused CPU kernel), only for plain calls whose semantics match exactly (see ``sdpa``).
                    ``"sdpa"`` takes the fastest calibrated one; the three names pin one.
  ``"torch"``        :func:`tileattn.reference.tiled_attention`, the same algorithm in PyTorch ops; any
                    device and dtype PyTorch supports, float64 included.
  ``"naive"``        :func:`tileattn.reference.naive_attention`, materializes the score matrix (a baseline;
                    never chosen automatically).

``backend="auto"`` (the article's "switch algorithms by sequence length"): the calibration table for the
device (``calibration``: measured by ``tileattn tune``, or shipped defaults) ranks the backends fastest
first for the call's dtype, causality, head_dim and key length; the first one that can run the call with
its features wins. Without a table the built-in rule applies: Triton on CUDA; on CPU PyTorch's fused
kernel for plain calls (2-5x faster than the tiled path there), the tiled path otherwise.

Inside ``torch.compile`` ``auto`` follows the built-in rule without the table (Triton on CUDA, the tiled
path on CPU): the calibration is host state. Decisions are cached by everything they depend on (device, dtype, shapes, feature flags), so the host
cost of ``auto`` is one dict lookup after the first call of a shape. ``TILEATTN_LOG=1`` logs each new
decision to stderr; :func:`tileattn.explain` returns it for a call.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from . import calibration, quant, sdpa

BACKENDS = ("auto", "triton", "sdpa", *sdpa.KERNELS, "torch", "naive")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_BACKWARD_MAX_HEAD_DIM = 256  # its kernels keep head_dim-wide rows of q, k, v and three accumulators on chip
MAX_CACHED_DECISIONS = 4096

log = logging.getLogger("tileattn")


@dataclass(frozen=True)
class Decision:
    """The backend a call runs on, and why (``str()`` gives both)."""

    backend: str
    reason: str

    def __str__(self) -> str:
        return f"backend {self.backend!r}: {self.reason}"


# Calls with at most this many query rows per K/V head (Sq x Hq / Hkv) run on the split-KV decode kernel, which
# packs those rows into one tile and splits the keys across programs to fill the GPU; the prefill kernel would
# give each query head its own mostly empty 128-row tile. From the kernel crossover sweep (benchmarks/NOTES.md).
DECODE_MAX_ROWS = 64


def decode_shaped(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a Triton ``attention`` call runs on the split-KV decode kernel (see :data:`DECODE_MAX_ROWS`)."""
    return q.shape[2] * (q.shape[1] // k.shape[1]) <= DECODE_MAX_ROWS


_NOT_CHECKED = object()
_triton_error = _NOT_CHECKED


@torch.compiler.assume_constant_result  # a host fact: torch.compile folds it instead of tracing the import
def triton_import_error() -> str | None:
    """None when Triton imports, else the reason it does not (checked once per process)."""
    global _triton_error
    if _triton_error is _NOT_CHECKED:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # ImportError, or a broken install raising anything else
            _triton_error = f"triton is not importable ({type(exc).__name__}: {exc})"
        else:
            _triton_error = None
    return _triton_error


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the Triton backend cannot run on ``q``'s device and dtype, or None when it can."""
    err = triton_import_error()
    if err:
        return err
    if q.device.type == "cuda":
        if torch.version.hip is None and torch.cuda.get_device_capability(q.device) < (8, 0):
            return "the Triton kernels need an NVIDIA GPU of compute capability 8.0 (Ampere) or newer"
    elif not (q.device.type == "cpu" and interpreter_enabled()):
        return f"the Triton kernels need CUDA tensors (got {q.device.type}; CPU only with TRITON_INTERPRET=1)"
    if q.dtype not in TRITON_DTYPES:
        return f"the Triton kernels support float16, bfloat16 and float32 (got {q.dtype})"
    return None


def triton_backward_head_dims_reason(head_dim_qk: int, head_dim_v: int) -> str | None:
    """Why the Triton backward cannot take these head dims, or None when it can: it needs v's head dim equal to
    q/k's and at most :data:`TRITON_BACKWARD_MAX_HEAD_DIM` (the forward kernels take every head dim the API
    accepts)."""
    if head_dim_v != head_dim_qk:
        return f"v head_dim {head_dim_v} != q/k head_dim {head_dim_qk} (the Triton backward takes equal head dims)"
    if head_dim_qk > TRITON_BACKWARD_MAX_HEAD_DIM:
        return f"head_dim {head_dim_qk} > {TRITON_BACKWARD_MAX_HEAD_DIM} (the Triton backward's limit)"
    return None


# Triton reads e4m3fn only where the GPU converts it (Ada, compute capability 8.9, and newer); e5m2 everywhere.
FP8_E4M3_MIN_CAPABILITY = (8, 9)


def quantized_cache_reason(q: torch.Tensor, *caches: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot read these KV caches (those in q's dtype always can) on q's device, or None.
    fp8 caches (see :mod:`tileattn.quant`) run on NVIDIA GPUs (``float8_e4m3fn`` from compute capability 8.9 on) and
    in the interpreter; ROCm's fp8 formats are other ones, so fp8 caches take the PyTorch backends there."""
    formats = {t.dtype for t in caches if quant.is_fp8(t.dtype)}
    if not formats or q.device.type != "cuda":
        return None
    if torch.version.hip is not None:
        return "fp8 KV caches run on the PyTorch backends on ROCm (its GPUs' fp8 formats differ from torch's)"
    capability = torch.cuda.get_device_capability(q.device)
    if torch.float8_e4m3fn in formats and capability < FP8_E4M3_MIN_CAPABILITY:
        return (f"float8_e4m3fn KV caches need compute capability {'.'.join(map(str, FP8_E4M3_MIN_CAPABILITY))} or "
                f"newer in the Triton kernels (this GPU: {'.'.join(map(str, capability))}; float8_e5m2 works)")
    return None


def triton_call_unsupported_reason(q: torch.Tensor, v: torch.Tensor, k: torch.Tensor | None = None) -> str | None:
    """Why the Triton backend cannot run a call with these q and v (device, dtype; ``v`` may be an fp8 cache, and
    ``k`` the keys' cache, whose fp8 format may differ), or None: the forward kernels take every head dim the API
    accepts."""
    return triton_unsupported_reason(q) or quantized_cache_reason(q, *((v,) if k is None else (k, v)))


def choose_backend(q: torch.Tensor, v: torch.Tensor, requested: str, k: torch.Tensor | None = None) -> str:
    """The backend for a varlen or KV-cache call (no SDPA equivalent): Triton on CUDA when it can run the call
    (``v`` is the values or their cache, ``k`` optionally the keys' cache: fp8 caches included), else the tiled
    path."""
    if requested == "auto":
        return "triton" if q.device.type == "cuda" and triton_call_unsupported_reason(q, v, k) is None else "torch"
    if requested == "triton":
        reason = triton_call_unsupported_reason(q, v, k)
        if reason:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
    elif requested not in ("torch", "naive"):
        raise ValueError(f"backend={requested!r} is for tileattn.attention only; use 'auto', 'triton', 'torch' "
                         "or 'naive' here")
    return requested


_decisions: dict = {}


def decide(q, k, v, requested: str, *, causal: bool, has_mask: bool, windowed: bool, softcap, return_lse: bool
           ) -> Decision:
    """The backend for a validated ``attention`` call (``requested`` is one of :data:`BACKENDS`)."""
    features = dict(causal=causal, has_mask=has_mask, windowed=windowed, softcap=softcap, return_lse=return_lse)
    if torch.compiler.is_compiling():  # traced once per graph: no cache, no files (see _decide)
        return _decide(q, k, v, requested, features)
    plain_strides = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    key = (requested, q.device, q.dtype, q.shape, k.shape, v.shape[-1], plain_strides, causal, has_mask, windowed,
           softcap is not None, return_lse)
    decision = _decisions.get(key)
    if decision is None:
        decision = _decide(q, k, v, requested, features)
        if len(_decisions) >= MAX_CACHED_DECISIONS:
            _decisions.clear()
        _decisions[key] = decision
        if os.environ.get("TILEATTN_LOG", "0") not in ("", "0"):
            _log_decision(q, k, causal, decision)
    return decision


_reset_hooks: list = []


def on_reset(hook) -> None:
    """Call ``hook()`` on :func:`reset` (for caches of decisions kept above this module, e.g. in ``api``)."""
    _reset_hooks.append(hook)


def reset() -> None:
    """Forget cached decisions and calibration tables (after ``tileattn tune``, and in tests)."""
    _decisions.clear()
    calibration.reset()
    for hook in _reset_hooks:
        hook()


def _why_not(backend: str, q, k, v, features: dict) -> str | None:
    if backend == "triton":
        return triton_call_unsupported_reason(q, v)
    if backend in sdpa.KERNELS:
        return (sdpa.unsupported_reason(q, k, v, **features)
                or sdpa.kernel_unsupported_reason(backend, q, k, v, features["causal"]))
    if backend == "torch":
        return None
    return "never chosen automatically (it materializes the score matrix)"


def _decide(q, k, v, requested: str, features: dict) -> Decision:
    if requested in ("torch", "naive"):
        return Decision(requested, "requested")
    if requested != "auto" and requested != "sdpa":
        reason = _why_not(requested, q, k, v, features)
        if reason:
            raise ValueError(f"backend={requested!r} cannot run this call: {reason}")
        return Decision(requested, "requested")
    if requested == "auto" and (q.shape[-1] != v.shape[-1] or q.shape[-1] > sdpa.MAX_HEAD_DIM):
        # SDPA is used for equal head dims up to 256 only, and the calibration measures those only: no table.
        head_dims = (f"head_dim {q.shape[-1]}" if q.shape[-1] == v.shape[-1] else
                     f"q/k head_dim {q.shape[-1]} with v head_dim {v.shape[-1]}")
        reason = triton_unsupported_reason(q) if q.device.type == "cuda" else f"{q.device.type} tensors"
        if reason is None:
            return Decision("triton", f"{head_dims}: the Triton kernels (SDPA is used for equal head dims up to "
                                      f"{sdpa.MAX_HEAD_DIM} only)")
        return Decision("torch", f"{head_dims}: the tiled PyTorch path (Triton: {reason}; SDPA is used for equal "
                                 f"head dims up to {sdpa.MAX_HEAD_DIM} only)")
    if (requested == "auto" and q.device.type == "cuda" and decode_shaped(q, k)
            and triton_unsupported_reason(q) is None):
        return Decision("triton", f"decode-shaped ({q.shape[2]} queries x {q.shape[1] // k.shape[1]} heads per K/V "
                                  f"head <= {DECODE_MAX_ROWS} rows): the split-KV decode kernel (the calibration "
                                  "ranks prefill kernels; the decode bench measures this one at SDPA's best or above)")
    # Inside torch.compile the built-in rule applies (on CUDA the Triton kernel, as a custom op Inductor keeps
    # whole): the calibration is host state (files, warnings, SDPA's eligibility checks on real tensors).
    calibrated = q.device.type in ("cuda", "cpu") and not torch.compiler.is_compiling()
    table = calibration.table_for(q.device) if calibrated else None
    found = table.lookup(q.dtype, features["causal"], q.shape[-1], k.shape[2]) if table else None
    if requested == "sdpa":
        return _decide_sdpa(q, k, v, features, found)
    skipped = []
    if found:
        ranking, where = found
        for backend in ranking:
            reason = _why_not(backend, q, k, v, features)
            if reason is None:
                note = "; ".join(skipped)
                return Decision(backend, f"calibrated on {table.device} ({table.source}): {where}, measured order "
                                         f"{' < '.join(ranking)}" + (f"; skipped {note}" if note else ""))
            skipped.append(f"{backend} ({reason})")
    return _built_in_rule(q, k, v, features, table, skipped)


def _decide_sdpa(q, k, v, features, found) -> Decision:
    reason = sdpa.unsupported_reason(q, k, v, **features)
    if reason:
        raise ValueError(f"backend='sdpa' cannot run this call exactly: {reason}")
    order = [b for b in (found[0] if found else ()) if b in sdpa.KERNELS]
    order += [b for b in sdpa.KERNELS if b not in order]
    why = {b: sdpa.kernel_unsupported_reason(b, q, k, v, features["causal"]) for b in order}
    for backend in order:
        if why[backend] is None:
            return Decision(backend, "requested 'sdpa'; " + ("fastest calibrated SDPA kernel" if found else
                                                             "first usable SDPA kernel (no calibration)"))
    raise ValueError("backend='sdpa' cannot run this call: " + "; ".join(f"{b}: {r}" for b, r in why.items()))


def _built_in_rule(q, k, v, features, table, skipped) -> Decision:
    if torch.compiler.is_compiling():
        context = "inside torch.compile"
    elif table is None:
        context = f"no calibration for {calibration.device_name(q.device)}"
    elif skipped:
        context = "no calibrated backend can run this call (" + "; ".join(skipped) + ")"
    else:
        context = f"the calibration for {table.device} has no entry for {q.dtype}, causal={features['causal']}"
    if q.device.type == "cuda":
        reason = triton_unsupported_reason(q)
        if reason is None:
            return Decision("triton", f"{context}; built-in rule: the Triton kernel on CUDA")
        return Decision("torch", f"{context}; Triton cannot run it ({reason}): the tiled PyTorch path")
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and _why_not("sdpa_flash", q, k, v, features) is None:
        return Decision("sdpa_flash", f"{context}; built-in rule: PyTorch's fused CPU kernel for a plain call")
    return Decision("torch", f"{context}; built-in rule: the tiled PyTorch path")


def _log_decision(q, k, causal, decision) -> None:
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[tileattn] %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.info("attention q%s k%s %s %s causal=%s -> %s", list(q.shape), list(k.shape), str(q.dtype).removeprefix(
        "torch."), q.device, causal, decision)
