"""Which backend runs a call.

Backends:
  ``"triton"``  the fused Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``,
               which is how CPU CI tests them). fp16, bf16, fp32.
  ``"torch"``   :func:`tileattn.reference.tiled_attention`, the same algorithm in PyTorch ops; any
               device and dtype PyTorch supports, float64 included.
  ``"naive"``   :func:`tileattn.reference.naive_attention`, materializes the score matrix (baseline).

``backend="auto"`` uses Triton for CUDA tensors when Triton imports, the tiled PyTorch path
otherwise. (Calibrated sequence-length crossovers come with ``tileattn tune``.)
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch", "naive")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


def choose_backend(q: torch.Tensor, requested: str) -> str:
    """Resolve ``requested`` (one of :data:`BACKENDS`) for a call on ``q``; raises if it cannot run."""
    if requested == "auto":
        if q.device.type == "cuda" and triton_unsupported_reason(q) is None:
            return "triton"
        return "torch"
    if requested == "triton":
        reason = triton_unsupported_reason(q)
        if reason:
            raise ValueError(f"backend='triton' cannot run this call: {reason}")
    return requested
