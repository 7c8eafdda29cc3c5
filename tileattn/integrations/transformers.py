"""Hugging Face Transformers (5.x): ``attn_implementation="tileattn"``.

    import tileattn.integrations.transformers as tt
    tt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tileattn")

:func:`register` adds the attention function to ``AttentionInterface`` and, under the same name,
:func:`padding_mask` to ``AttentionMaskInterface``: ``None`` when the mask can be skipped (no padding;
causality then comes from ``is_causal``); for a padded batch of a plain causal or bidirectional model, or a
chunk of several queries over a longer cache, the 2-D padding mask itself (all true without padding), read
by the kernel as a ``[B, 1, 1, Skv]`` broadcast view (no ``S x S`` mask is built); for other patterns
(sliding windows, packed sequences, static caches) SDPA's bool ``[B, 1, Sq, Skv]`` mask (True = attend), which holds causality, padding and windows.
GQA K/V heads arrive unrepeated and stay so. Decode steps (one query token, padded or not) go to the
split-KV decode kernel on CUDA, as every call with few query rows per K/V head does (``tileattn.attention``).

Semantics follow ``transformers.integrations.sdpa_attention`` exactly, including its one top-left case:
without a mask, a causal call with more keys than queries is the prefill of an empty static cache, whose
keys past the queries are unfilled slots, so they are cropped.

Attention sinks (``s_aux``, gpt-oss) become ``sinks`` of :func:`tileattn.attention`.
An fp8 KV cache: :class:`tileattn.integrations.transformers_fp8.FP8KVCache` as the model's cache.
Training works as with eager attention: every backend ``auto`` picks has a backward (on CUDA the Triton
FlashAttention backward), GQA and padded batches included.
Not supported (clear errors): ``output_attentions=True`` (the weights are never materialized: use
``attn_implementation="eager"``), attention dropout during training (set the model's attention dropout to 0).
"""

from __future__ import annotations

import weakref

import torch

from .. import api

NAME = "tileattn"
_backend = "auto"  # set by register(backend=...)


def tileattn_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                               **kwargs):
    """Transformers' attention-interface signature. ``query [B, Hq, Sq, D]``, ``key [B, Hkv, Skv, D]``, ``value
    [B, Hkv, Skv, D_v]`` (D_v may differ from D: DeepSeek-V3's MLA, 192/128, is passed through unpadded); returns
    ``(out [B, Sq, Hq, D_v], None)``."""
    if kwargs.get("output_attentions"):
        raise ValueError("attn_implementation='tileattn' never materializes attention weights; "
                         "load the model with attn_implementation='eager' to get output_attentions")
    if dropout and module.training:
        raise ValueError(f"attn_implementation='tileattn' has no attention dropout (the model asks for p={dropout}): "
                         "set the config's attention dropout to 0 to train with it (attention_dropout, or "
                         "attention_probs_dropout_prob for BERT), or call model.eval() for inference")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # Sliding windows (kwargs["sliding_window"]) are not passed on: Transformers builds them into the mask
    # whenever they matter (kv_length >= window), in absolute positions, which stay right with static caches
    # whose unfilled slots would shift a bottom-right-aligned window.
    # s_aux (gpt-oss and others): one sink logit per head in the softmax denominator.
    options = dict(scale=scaling, softcap=kwargs.get("softcap"), sinks=kwargs.get("s_aux"), backend=_backend)
    fp8_layer = _fp8_layers.pop(id(key), None) if _fp8_layers else None  # (a miss would raise and catch inside)
    if fp8_layer is not None and fp8_layer.holds(key):  # the new tokens of a transformers_fp8.FP8KVCache layer
        out = fp8_layer.attend(query, key, value, attention_mask, bool(is_causal), options)
    else:
        out = attend(query, key, value, attention_mask, bool(is_causal), options)
    return out.transpose(1, 2).contiguous(), None


def attend(query, key, value, attention_mask, is_causal: bool, options: dict) -> torch.Tensor:
    """:func:`tileattn.attention` of one attention-interface call over the keys Transformers passes (the cache's
    and the new ones) with the mask :func:`padding_mask` built: ``out [B, Hq, Sq, D_v]``."""
    q_len, kv_len = query.shape[2], key.shape[2]
    if attention_mask is not None and attention_mask.dim() == 2:  # padding_mask's [B, Skv]: True = a real token
        # Read as a [B, 1, 1, Skv] broadcast view (stride 0 over heads and queries): no S x S mask exists.
        # Queries are the last q_len positions of the cache, so causality is bottom-right aligned.
        keys = attention_mask[:, None, None, :]
        return api.attention(query, key, value, mask=keys, causal=is_causal and q_len > 1, **options)
    if attention_mask is not None:
        return api.attention(query, key, value, mask=attention_mask[..., :kv_len], **options)
    causal = is_causal and q_len > 1
    if causal and kv_len > q_len:  # empty static cache: the keys past the queries are unfilled slots
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    return api.attention(query, key, value, causal=causal, **options)


# FP8KVCache layers (tileattn.integrations.transformers_fp8) whose update() handed back new tokens to attend, by the
# id of the key tensor it returned: the attention function has no other way to reach the cache (Transformers passes
# it what update() returned, not the cache), and the cache layer checks the tensor is the one it returned.
_fp8_layers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def padding_mask(*args, **kwargs):
    """The mask function registered for ``"tileattn"``: for a plain causal or bidirectional mask whose 2-D mask
    covers exactly the keys (no cache offset, no static-cache slots) over a padded batch, or for several queries
    over a longer cache, the 2-D bool mask ``[B, Skv]`` itself, which the attention function reads as a broadcast
    view instead of an ``S x S`` mask; for every other pattern (sliding windows, packed sequences, static caches,
    overlays) SDPA's mask."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    mask, kv_length = kwargs.get("attention_mask"), kwargs.get("kv_length")
    plain = (not args and not torch.compiler.is_compiling() and kwargs.get("kv_offset", 0) == 0
             and kwargs.get("mask_function") in (causal_mask_function, bidirectional_mask_function)
             and (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == kv_length
                  or mask is None and isinstance(kwargs.get("q_offset"), int)))  # (no sync to find the end)
    if plain:  # the queries must be the last keys (a growing cache), as bottom-right causality assumes
        q_offset, cache_position = kwargs.get("q_offset"), kwargs.get("cache_position")
        if isinstance(q_offset, int) and isinstance(kwargs.get("q_length"), int):  # Transformers >= 5.2x
            q_length = kwargs["q_length"]
            end = q_offset + q_length
        elif isinstance(cache_position, torch.Tensor) and cache_position.numel():  # earlier 5.x
            q_length, end = cache_position.numel(), int(cache_position[-1]) + 1
        else:
            q_length = end = None
        several = end == kv_length and 1 < q_length < kv_length
        if mask is None:
            # Several queries over a longer cache (a chunk, a second turn) without a padding mask: an all-true 2-D
            # one, where SDPA's would be a [B, 1, Sq, Skv] causal mask (no mask here means an empty static cache).
            if several and isinstance(kwargs.get("batch_size"), int) and kwargs.get("device") is not None:
                return torch.ones(kwargs["batch_size"], kv_length, dtype=torch.bool, device=kwargs["device"])
        elif end == kv_length:
            # Several queries over a longer cache: the 2-D mask, padded or not, where SDPA's would be
            # [B, 1, Sq, Skv]; bottom-right causality is the attention call's.
            if several or not bool(mask.all()):  # one device sync, as sdpa_mask's own check costs
                return mask.bool()
            # No padding: the same as no 2-D mask, which spares sdpa_mask a second sync to find that out.
            kwargs["attention_mask"] = None
    return sdpa_mask(*args, **kwargs)


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
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, tileattn_attention_forward)
    AttentionMaskInterface.register(NAME, padding_mask)
