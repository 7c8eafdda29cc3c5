"""PyTorch SDPA's fused kernels as tileattn backends, for the plain calls where their semantics are ours.

SDPA's cuDNN, FlashAttention-2 and memory-efficient kernels (and its fused CPU kernel) are exact and
never store the score matrix, so ``backend="auto"`` may pick them where they are measured to be faster
(see ``dispatch`` and ``tileattn tune``). They are used only for calls whose meaning they share exactly:
no mask (SDPA returns NaN for rows with no visible key; we return 0), no window, no softcap, no lse,
causal only when ``Sq == Sk`` (SDPA's ``is_causal`` is top-left aligned, ours bottom-right), head_dim a
multiple of 8 and a unit-stride last dim (what the fused kernels read without a copy), v's head dim equal to
q/k's and at most 256 (torch 2.13's fused CPU kernel refuses unequal head dims, its CUDA flash kernel stops at 256, and which of its CUDA kernels take the others varies with the version:
those calls run on the tiled path, which is checked against the oracle for them). GQA/MQA (fewer K/V heads than
query heads) goes only to the kernels that read each K/V head for its group of query heads without repeating it in
memory: cuDNN and FlashAttention-2 on CUDA (read on torch 2.11, H200: both give the right result from un-repeated
K/V, and ``F.scaled_dot_product_attention(..., enable_gqa=True)`` itself runs cuDNN's kernel) and the fused CPU
kernel; the memory-efficient kernel's ATen op refuses unequal head counts.

A call reaches its kernel through the kernel's torch builtin (:class:`SdpaPlan`), which costs less host time than
``F.scaled_dot_product_attention`` (which chooses its kernel again per call; inside ``sdpa_kernel(...)`` about 10 us
more on the context manager alone) and than the ATen op called from Python (Python dispatch first).

NaN/Inf: PyTorch's fused CPU kernel does not follow IEEE arithmetic on them (measured with torch 2.13: a NaN
query row gives a finite row when Sq < 16, a NaN in key 0 can vanish, an Inf in a key gives no NaN in
fp16/bf16, and a NaN value at a key hidden by causality reaches the rows before it). So on CPU the inputs are
scanned first (one ``aminmax`` pass each, ``O(S * D)``: 1.2-1.5% of the fused kernel's time at S = 512, 0.3-0.7%
at 2048; fp32, B = 1-4, H = 8, D = 64, one thread) and a call with any NaN/Inf runs on the tiled path (3-7x slower
than the fused kernel), which follows :mod:`tileattn.reference`'s rule. CUDA inputs are not scanned (it would cost
a host sync per call); ``tests/test_nan.py`` checks SDPA's CUDA kernels on the GPU.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .reference import tiled_attention, values_known_finite

KERNELS = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient")  # on CPU only "sdpa_flash" (PyTorch's fused CPU kernel)
_CAN_USE = {"sdpa_cudnn": "can_use_cudnn_attention", "sdpa_flash": "can_use_flash_attention",
            "sdpa_efficient": "can_use_efficient_attention"}
MAX_HEAD_DIM = 256  # tileattn's limit for SDPA (see the module docstring), not every kernel's


def unsupported_reason(q, k, v, *, causal, has_mask, windowed, softcap, return_lse) -> str | None:
    """Why no SDPA kernel can compute this call with tileattn's semantics, or None when one may."""
    if v.shape[-1] != q.shape[-1]:
        return f"v head_dim {v.shape[-1]} != q/k head_dim {q.shape[-1]} (tileattn uses SDPA for equal head dims only)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} (tileattn uses SDPA's fused kernels up to {MAX_HEAD_DIM})"
    if has_mask:
        return "a mask (SDPA returns NaN where a row sees no key; tileattn returns 0)"
    if windowed:
        return "a window (SDPA has no local-attention option)"
    if softcap is not None:
        return "softcap (SDPA has no logit capping)"
    if return_lse:
        return "return_lse (SDPA's public function does not return the logsumexp)"
    if causal and q.shape[2] != k.shape[2]:
        return "causal with Sq != Sk (SDPA's is_causal is top-left aligned, tileattn's bottom-right)"
    if q.shape[-1] % 8:
        return f"head_dim {q.shape[-1]} (the fused SDPA kernels need a multiple of 8)"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "a last dim with stride != 1 (SDPA would copy the inputs)"
    return None


def kernel_unsupported_reason(kernel: str, q, k, v, causal: bool) -> str | None:
    """Why SDPA's ``kernel`` cannot run this (plain) call on this device, or None when it can."""
    gqa = q.shape[1] != k.shape[1]
    if gqa and kernel == "sdpa_efficient":
        return "GQA (the memory-efficient kernel needs as many K/V heads as query heads: K/V would be repeated)"
    if q.device.type == "cpu":
        if kernel != "sdpa_flash":
            return f"{kernel} is a CUDA kernel"
        # PyTorch's own choice for these inputs: 1 = its fused CPU kernel, 0 = the materializing math path.
        if torch._fused_sdp_choice(q, k, v, None, 0.0, causal, enable_gqa=gqa) != 1:
            return "PyTorch's fused CPU kernel does not take these inputs"
        return None
    if q.device.type != "cuda":
        return f"SDPA kernels are not wired for {q.device.type} tensors"
    from torch.backends import cuda as sdp

    try:
        params = sdp.SDPAParams(q, k, v, None, 0.0, causal, gqa)
        usable = getattr(sdp, _CAN_USE[kernel])(params, False)
    except Exception as exc:  # an older/newer torch whose checker signature differs: do not use it
        return f"torch cannot tell whether {kernel} applies ({type(exc).__name__}: {exc})"
    return None if usable else f"torch reports {kernel} cannot run these inputs (dtype, head_dim or GPU)"


class SdpaPlan(NamedTuple):
    """SDPA's ``kernel`` for one plain CUDA call signature (one :func:`unsupported_reason` and
    :func:`kernel_unsupported_reason` accepted): ``run(q, k, v, mask=None)``
    gives ``(out, None)`` for calls that need no gradient. The kernel is called through its torch builtin (a C
    binding): ``F.scaled_dot_product_attention`` would pick the same kernel but choose it again on every call, and
    the ATen op goes through Python dispatch first (host us per call inside a LLaMA-7B prefill forward on the
    H100: 60 builtin, 67 F.sdpa; benchmarks/probe_host.py --prefill-host)."""

    kernel: str
    causal: bool
    scale: float

    def run(self, q, k, v, mask=None):
        return _cuda_kernel(self.kernel, q, k, v, self.causal, self.scale, save_lse=False), None


def sdpa_attention(q, k, v, *, kernel: str, causal: bool, scale: float) -> torch.Tensor:
    """Run SDPA's ``kernel`` on a call :func:`unsupported_reason` accepted. Returns ``[B, H, S, D]`` (SDPA's layout;
    q's layout when a CPU call with NaN/Inf runs on the tiled path instead, see the module docstring)."""
    if q.device.type == "cpu":
        if not values_known_finite(q, k, v):
            return tiled_attention(q, k, v, causal=causal, scale=scale)
        return torch._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[0]
    # cuDNN's and the memory-efficient kernel's backward read the logsumexp, which they save only when asked (as
    # F.scaled_dot_product_attention asks whenever an input requires grad); FA2 always saves it.
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return _cuda_kernel(kernel, q, k, v, causal, scale, save_lse=grad)


def _cuda_kernel(kernel, q, k, v, causal, scale, save_lse):
    if kernel == "sdpa_cudnn":
        return torch._scaled_dot_product_cudnn_attention(q, k, v, None, save_lse, 0.0, causal, False, scale=scale)[0]
    if kernel == "sdpa_flash":
        return torch._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
    return torch._scaled_dot_product_efficient_attention(q, k, v, None, save_lse, 0.0, causal, scale=scale)[0]
