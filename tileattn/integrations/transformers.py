"""Hugging Face Transformers (5.x): ``attn_implementation="tileattn"``.

    import tileattn.integrations.transformers as tt
    tt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tileattn")

:func:`register` adds the attention function to ``AttentionInterface`` and, under the same name, SDPA's
mask function to ``AttentionMaskInterface``, so models hand us what they hand SDPA: ``None`` when the
mask can be skipped (no padding; causality then comes from ``is_causal``), else a bool
``[B, 1, Sq, Skv]`` mask (True = attend) that already holds causality, padding and sliding windows
(so padded batches currently read a materialized mask; a per-sequence-length path is future work).
GQA K/V heads arrive unrepeated and stay so. Decode steps without a mask (one query token) go to the
split-KV decode kernel on CUDA.

Semantics follow ``transformers.integrations.sdpa_attention`` exactly, including its one top-left case:
without a mask, a causal call with more keys than queries is the prefill of an empty static cache, whose
keys past the queries are unfilled slots, so they are cropped.

Not supported (clear errors): ``output_attentions=True`` (the weights are never materialized: use
``attn_implementation="eager"``), attention sinks (``s_aux``), dropout during training.
"""

from __future__ import annotations

import torch

from .. import api

NAME = "tileattn"
_backend = "auto"  # set by register(backend=...)


def tileattn_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                               **kwargs):
    """Transformers' attention-interface signature. ``query [B, Hq, Sq, D]``, ``key``/``value``
    ``[B, Hkv, Skv, D]``; returns ``(out [B, Sq, Hq, D], None)``."""
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='tileattn' never materializes attention weights; "
                         "load the model with attn_implementation='eager' to get output_attentions")
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by tileattn yet")
    if dropout and module.training:
        raise ValueError("tileattn is an inference library: attention dropout is not supported (call model.eval())")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Sliding windows (kwargs["sliding_window"]) are not passed on: Transformers builds them into the mask
    # whenever they matter (kv_length >= window), in absolute positions, which stay right with static caches
    # whose unfilled slots would shift a bottom-right-aligned window.
    options = dict(scale=scaling, softcap=kwargs.get("softcap"), backend=_backend)
    q_len, kv_len = query.shape[2], key.shape[2]

    if attention_mask is not None:
        out = api.attention(query, key, value, mask=attention_mask[..., :kv_len], **options)
    elif q_len == 1 and query.is_cuda:
        lengths = torch.full((query.shape[0],), kv_len, dtype=torch.int32, device=query.device)
        out = api.attention_with_kvcache(query, key, value, lengths, check_bounds=False, **options)
    else:
        causal = bool(is_causal) and q_len > 1
        if causal and kv_len > q_len:  # empty static cache: the keys past the queries are unfilled slots
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        out = api.attention(query, key, value, causal=causal, **options)
    return out.transpose(1, 2).contiguous(), None


def register(backend: str = "auto") -> None:
    """Make ``attn_implementation="tileattn"`` available to every Transformers model (idempotent).

    ``backend`` is passed to every tileattn call: ``"auto"`` (the calibrated choice, which may be one of
    SDPA's kernels for plain prefill calls) or ``"triton"`` to force tileattn's own kernels.
    """
    global _backend
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    _backend = backend
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, tileattn_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
