"""timm Vision Transformers: route ``Attention`` modules (ViT, DeiT, BEiT-style ``timm.layers.Attention``)
through tileattn.

    import timm, tileattn.integrations.timm as tileattn_timm
    model = timm.create_model("vit_base_patch16_224", pretrained=True).eval().cuda().half()
    tileattn_timm.patch(model)          # in place; returns the number of attention modules patched

Patching swaps each module's class for a subclass whose ``forward`` computes the same thing with
``tileattn.attention`` (parameters and state-dict keys are untouched). Attention with rotary embeddings
(EVA's ``AttentionRope``) is not patched yet. Inference only: attention dropout must be inactive.
"""

from __future__ import annotations

import torch

from .. import api


def _forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """``x [B, N, C]`` -> ``[B, N, C_out]``: qkv projection, optional q/k norms, attention, output projection."""
    if self.training and self.attn_drop.p > 0:
        raise ValueError("tileattn is an inference library: attention dropout is not supported (call model.eval())")
    batch, tokens, _ = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
    # [B, N, H, D] slices seen as [B, H, N, D]: views, read in place by the kernel.
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q, k = self.q_norm(q), self.k_norm(k)
    out = api.attention(q, k, v, causal=is_causal, scale=self.scale, mask=attn_mask, backend=self.tileattn_backend)
    out = out.transpose(1, 2).reshape(batch, tokens, self.num_heads * self.head_dim)
    return self.proj_drop(self.proj(self.norm(out)))


def patch(model: torch.nn.Module, backend: str = "auto") -> int:
    """Make every ``timm.layers.Attention`` in ``model`` use tileattn; returns how many were patched.

    ``backend`` is passed to :func:`tileattn.attention` (``"triton"`` forces tileattn's kernels). Patching
    an already patched model only changes the backend.
    """
    from timm.layers import Attention

    if backend not in api.dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {api.dispatch.BACKENDS}, got {backend!r}")
    count = 0
    for module in model.modules():
        if type(module) is Attention or type(module) is _patched_class():
            module.__class__ = _patched_class()
            module.tileattn_backend = backend
            count += 1
    return count


_patched = None


def _patched_class():
    """One subclass of timm's ``Attention`` with tileattn's forward, made on first use (timm is optional)."""
    global _patched
    if _patched is None:
        from timm.layers import Attention

        _patched = type("TileattnAttention", (Attention,), {"forward": _forward, "tileattn_backend": "auto"})
    return _patched
