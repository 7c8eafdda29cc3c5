"""timm Vision Transformers: route the attention of ViT, DeiT, BEiT-style (``timm.layers.Attention``) and EVA /
EVA-02 (``timm.models.eva.EvaAttention``, rotary embeddings) models through tileattn.

    import timm, tileattn.integrations.timm as tileattn_timm
    model = timm.create_model("vit_base_patch16_224", pretrained=True).eval().cuda().half()
    tileattn_timm.patch(model)          # in place; returns the number of attention modules patched

Patching swaps each module's class for a subclass whose ``forward`` computes the same thing with
``tileattn.attention`` (parameters and state-dict keys are untouched). Inference only: attention dropout
must be inactive. Written against timm 1.0.x; the EVA forward reads its optional parts (gate, q/k/v biases,
``rotate_half``) with ``getattr`` so older 1.0 releases without them work too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import api


def _check_inference(module) -> None:
    if module.training and module.attn_drop.p > 0:
        raise ValueError("tileattn is an inference library: attention dropout is not supported (call model.eval())")


def _attend(module, q, k, v, attn_mask, is_causal) -> torch.Tensor:
    """``[B, H, N, D]`` q/k/v -> ``[B, N, H * D]``. SDPA's ``is_causal`` equals ours for square attention."""
    out = api.attention(q, k, v, causal=is_causal, scale=module.scale, mask=attn_mask, backend=module.tileattn_backend)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])


def _vit_forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """``timm.layers.Attention``: ``x [B, N, C]`` -> ``[B, N, C_out]``: qkv projection, optional q/k norms,
    attention, output projection."""
    _check_inference(self)
    batch, tokens, _ = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim)
    # [B, N, H, D] slices seen as [B, H, N, D]: views, read in place by the kernel.
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    q, k = self.q_norm(q), self.k_norm(k)
    return self.proj_drop(self.proj(self.norm(_attend(self, q, k, v, attn_mask, is_causal))))


def _eva_forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                 is_causal: bool = False):
    """``timm.models.eva.EvaAttention``: fused or separate q/k/v projections (with EVA's q/v-only biases),
    q/k norms, rotary embeddings on the non-prefix tokens, attention, scale norm, optional sigmoid gate."""
    from timm.layers import apply_rot_embed_cat

    _check_inference(self)
    batch, tokens, _ = x.shape
    if self.qkv is not None:
        bias = None if self.q_bias is None else torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if bias is not None and getattr(self, "qkv_bias_separate", False):
            qkv = self.qkv(x) + bias
        else:
            qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, -1)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (proj(x).reshape(batch, tokens, self.num_heads, -1).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
    q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:  # prefix (class / register) tokens carry no position
        prefix, half = self.num_prefix_tokens, getattr(self, "rotate_half", False)
        q, k = (torch.cat([t[:, :, :prefix], apply_rot_embed_cat(t[:, :, prefix:], rope, half=half)], dim=2).type_as(v)
                for t in (q, k))
    out = self.norm(_attend(self, q, k, v, attn_mask, is_causal))
    gate = getattr(self, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return self.proj_drop(self.proj(out))


def patch(model: torch.nn.Module, backend: str = "auto") -> int:
    """Make every timm ``Attention`` and ``EvaAttention`` in ``model`` use tileattn; returns how many were patched.

    ``backend`` is passed to :func:`tileattn.attention` (``"triton"`` forces tileattn's kernels). Patching
    an already patched model only changes the backend.
    """
    if backend not in api.dispatch.BACKENDS:
        raise ValueError(f"backend must be one of {api.dispatch.BACKENDS}, got {backend!r}")
    classes = _patched_classes()
    count = 0
    for module in model.modules():
        original = getattr(type(module), "tileattn_original", type(module))
        if original in classes:
            module.__class__ = classes[original]
            module.tileattn_backend = backend
            count += 1
    return count


def unpatch(model: torch.nn.Module) -> int:
    """Give patched modules their timm class back; returns how many were restored."""
    count = 0
    for module in model.modules():
        original = getattr(type(module), "tileattn_original", None)
        if original is not None:
            module.__class__ = original
            count += 1
    return count


_patched: dict = {}


def _patched_classes() -> dict:
    """timm class -> its tileattn subclass, made on first use (timm is optional)."""
    if not _patched:
        from timm.layers import Attention
        from timm.models.eva import EvaAttention

        for original, forward in ((Attention, _vit_forward), (EvaAttention, _eva_forward)):
            _patched[original] = type(f"Tileattn{original.__name__}", (original,),
                                      {"forward": forward, "tileattn_backend": "auto", "tileattn_original": original})
    return _patched
