"""An FP8 KV cache for Hugging Face Transformers' ``generate()`` with ``attn_implementation="tileattn"``.

    import tileattn.integrations.transformers as tt
    from tileattn.integrations.transformers_fp8 import FP8KVCache
    tt.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="tileattn")
    out = model.generate(**inputs, past_key_values=FP8KVCache(model.config), max_new_tokens=64)
    # (Transformers 5.24+ names the argument cache=; past_key_values= still works there, with a FutureWarning.)

The cache stores every layer's keys and values as ``float8_e4m3fn`` (or ``float8_e5m2``) with fp32 scales (see
:mod:`tileattn.quant`): per token and KV head (``granularity="token"``, the default: each token's own scale, set when
it is written), per KV head or per tensor (``"head"``, ``"tensor"``: calibrated on the prompt's keys and values,
later values beyond them saturate; calibrated over the whole batch, so a row's scale depends on the other prompts).
Half a bf16 cache's bytes per token, and each decode step reads only those: the step is one
:func:`tileattn.attention_with_kvcache` call that quantizes the new token into the cache and attends over what is
stored (on CUDA the Triton decode kernel, one launch). Without ``max_cache_len`` the capacity grows by a quarter
(at least 256 tokens) when it is full, so up to a quarter of it may be unused.

Semantics: the prompt attends over its own keys and values as computed (unquantized, as serving engines prefill),
then they are stored quantized; every later token attends over the stored cache, its own key and value included.
A padded prompt's real tokens are stored first in each row (left or right padding alike: the 2-D attention mask
says which), so each sequence keeps its own length and later steps need no mask. Supported: decoder models whose
every layer attends causally over the whole context, each with its own keys and values (LLaMA, Qwen, Mistral
without a sliding window; attention sinks too). Refused with a clear error: configs with sliding-window or chunked
layers (gpt-oss, Gemma 2/3, Mistral's window) or layers that share another's KV (Gemma 3n/4), other mask patterns
(packed sequences), ``crop`` (assisted generation) and gradients. A model that changes the keys between the
cache's update and the attention call is not supported either (the next step raises).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .. import api, quant
from ..cache import write_kv
from . import transformers as integration

_ROUND = 256  # capacity grows in whole multiples of this many tokens
_MAX_LENGTH = (1 << 31) - 1  # lengths are int32 on the device


class FP8KVCacheLayer(DynamicLayer):
    """One layer's fp8 cache: ``keys``/``values`` fp8 ``[B, Hkv, capacity, D]``, their scales, and ``lengths`` int32
    ``[B]``, the real tokens stored per sequence (padding left out), which ``tileattn`` advances."""

    is_croppable = False

    def __init__(self, dtype=torch.float8_e4m3fn, granularity="token", max_cache_len=None):
        super().__init__()
        self.fp8_dtype, self.granularity, self.max_cache_len = dtype, granularity, max_cache_len
        self.seen = 0  # positions Transformers has processed, padding included: its view of the cache length
        self.lengths = self.k_scale = self.v_scale = None
        self._new = None  # (key, value) that update() handed back and attend() has not taken yet

    def lazy_initialization(self, key_states, value_states):
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        """Hand the new tokens back unstored: the attention call (``attn_implementation="tileattn"``) stores them
        and attends over the cache in one step."""
        if self._new is not None:
            self._forget_new()
            raise RuntimeError("FP8KVCache: the previous tokens of this layer were never attended by tileattn (the "
                               "model must run with attn_implementation='tileattn', call tt.register() first, and "
                               "pass the cache's keys to attention unchanged)")
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            raise RuntimeError("FP8KVCache is for inference: quantized keys carry no gradient (use torch.no_grad(), "
                               "as generate() does)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._new = (key_states, value_states)
        integration._fp8_layers[id(key_states)] = self  # a weak reference: a dropped cache leaves no entry
        return key_states, value_states

    def _forget_new(self):
        if self._new is not None and integration._fp8_layers.get(id(self._new[0])) is self:
            del integration._fp8_layers[id(self._new[0])]
        self._new = None

    def holds(self, key) -> bool:
        """Whether ``key`` is the tensor this layer's last update() handed back."""
        return self._new is not None and self._new[0] is key

    def attend(self, query, key, value, attention_mask, is_causal, options):
        """The attention of ``query`` ``[B, Hq, Sq, D]`` over this layer's cache and the new ``key``/``value``
        ``[B, Hkv, Sq, D]`` (which it stores): ``out [B, Hq, Sq, D_v]``."""
        self._new = None
        if attention_mask is not None and attention_mask.dim() != 2:
            raise NotImplementedError(
                "FP8KVCache supports causal attention over the whole context with a padding mask only; this model "
                "asks for another pattern (a sliding window, packed sequences or a static layout): use its default "
                "cache")
        if not is_causal:
            raise NotImplementedError("FP8KVCache is for causal decoders (this attention is bidirectional)")
        if self.seen == 0:
            # The prompt: attended over its keys as computed, then stored quantized for the steps after it.
            out = integration.attend(query, key, value, attention_mask, True, options)
            self._store_prompt(key, value, None if attention_mask is None else attention_mask.bool())
        else:
            # New tokens are real (generate() extends the padding mask with ones): the cache rows hold no padding.
            self._reserve(self.seen + key.shape[2])
            out = api.attention_with_kvcache(query, self.keys, self.values, self.lengths, k_new=key, v_new=value,
                                             k_scale=self.k_scale, v_scale=self.v_scale, causal=True,
                                             check_bounds=False, **options)
            self.lengths += key.shape[2]
        self.seen += key.shape[2]
        return out

    def _store_prompt(self, key, value, real):
        batch, heads, length = key.shape[:3]
        if real is not None:  # each row's real tokens first, in order (a stable sort of the padding to the end)
            order = torch.sort((~real[:, -length:]).to(torch.uint8), dim=1, stable=True).indices
            key, value = (t.gather(2, order[:, None, :, None].expand_as(t)) for t in (key, value))
            self.lengths = real[:, -length:].sum(1, dtype=torch.int32)
            kept = (torch.arange(length, device=key.device) < self.lengths[:, None])[:, None, :, None]
            key, value = key * kept, value * kept  # what a row stores past its length is never read; zeros
        else:
            self.lengths = torch.full((batch,), length, dtype=torch.int32, device=key.device)
        capacity = self.max_cache_len or -(-(length + _ROUND) // _ROUND) * _ROUND
        if length > capacity:
            raise ValueError(f"FP8KVCache: the prompt has {length} tokens, more than max_cache_len={capacity}")
        self.keys = torch.zeros(batch, heads, capacity, key.shape[3], dtype=self.fp8_dtype, device=key.device)
        self.values = torch.zeros(batch, heads, capacity, value.shape[3], dtype=self.fp8_dtype, device=key.device)
        if self.granularity == "token":
            self.k_scale, self.v_scale = (torch.ones(batch, heads, capacity, device=key.device) for _ in range(2))
        else:
            self.k_scale, self.v_scale = (quant.calibrate_scales(t, self.fp8_dtype, self.granularity)
                                          for t in (key, value))
        write_kv(self.keys, self.values, key, value, torch.zeros_like(self.lengths), k_scale=self.k_scale,
                 v_scale=self.v_scale)

    def _reserve(self, needed: int):
        """Room for ``needed`` tokens per row (``seen`` bounds every row's length): grown, or refused past
        ``max_cache_len``."""
        capacity = self.keys.shape[2]
        if needed <= capacity:
            return
        if self.max_cache_len is not None:
            raise ValueError(f"FP8KVCache: {needed} tokens do not fit max_cache_len={self.max_cache_len}")
        grown = -(-max(needed, capacity + max(_ROUND, capacity // 4)) // _ROUND) * _ROUND

        def widen(t):
            wide = torch.zeros(*t.shape[:2], grown, *t.shape[3:], dtype=t.dtype, device=t.device)
            wide[:, :, :capacity] = t
            return wide

        self.keys, self.values = widen(self.keys), widen(self.values)
        if self.granularity == "token":
            self.k_scale, self.v_scale = widen(self.k_scale), widen(self.v_scale)

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1 if self.max_cache_len is None else self.max_cache_len

    def reset(self) -> None:
        self._forget_new()
        self.keys = self.values = self.lengths = self.k_scale = self.v_scale = None
        self.seen, self.is_initialized = 0, False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("FP8KVCache cannot crop (assisted generation): use the model's default cache")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` (beam search, contrastive search)."""
        if self.seen == 0:
            return
        indices = indices.to(self.keys.device)
        self.keys, self.values, self.lengths = (t.index_select(0, indices) for t in (self.keys, self.values,
                                                                                    self.lengths))
        if self.granularity == "token":
            self.k_scale, self.v_scale = (t.index_select(0, indices) for t in (self.k_scale, self.v_scale))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.seen:
            self.batch_select_indices(torch.arange(self.keys.shape[0], device=self.keys.device
                                                   ).repeat_interleave(repeats))

    def memory_bytes(self) -> int:
        """Bytes this layer holds on its device (fp8 keys and values, scales, lengths)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.k_scale, self.v_scale,
                                                          self.lengths) if t is not None)


class FP8KVCache(Cache):
    """The cache to pass as ``past_key_values`` (see the module docstring).

    Args:
        config: the model's config (``model.config``): its layer count, and its attention implementation, which
            must be ``"tileattn"``.
        dtype: ``torch.float8_e4m3fn`` (default) or ``torch.float8_e5m2``.
        granularity: ``"token"`` (default), ``"head"`` or ``"tensor"`` (see :mod:`tileattn.quant`).
        max_cache_len: a fixed capacity in tokens per sequence; None grows the cache as generation goes (by a
            quarter, at least 256 tokens, when full).
    """

    def __init__(self, config, dtype=torch.float8_e4m3fn, granularity="token", max_cache_len=None):
        if dtype not in quant.FP8_DTYPES:
            raise ValueError(f"dtype must be one of {quant.FP8_DTYPES}, got {dtype}")
        if granularity not in quant.GRANULARITIES:
            raise ValueError(f"granularity must be one of {quant.GRANULARITIES}, got {granularity!r}")
        if max_cache_len is not None and not 0 < max_cache_len <= _MAX_LENGTH:
            raise ValueError(f"max_cache_len must be a positive int32, got {max_cache_len}")
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "_attn_implementation", None) != integration.NAME:
            raise ValueError(f"FP8KVCache needs the model loaded with attn_implementation='{integration.NAME}' "
                             f"(this one has {getattr(config, '_attn_implementation', None)!r})")
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            windowed = any(kind != "full_attention" for kind in layer_types)
        else:
            windowed = bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
        if windowed or getattr(config, "attention_chunk_size", None):
            raise ValueError("FP8KVCache supports models whose every layer attends over the whole context; this "
                             "config has sliding-window or chunked attention layers: use its default cache")
        if getattr(config, "num_kv_shared_layers", 0):
            raise ValueError("FP8KVCache does not support layers that reuse another layer's keys and values "
                             "(num_kv_shared_layers): use the model's default cache")
        super().__init__(layers=[FP8KVCacheLayer(dtype, granularity, max_cache_len)
                                 for _ in range(config.num_hidden_layers)])

    def memory_bytes(self) -> int:
        """Bytes the cache holds on its device, every layer."""
        return sum(layer.memory_bytes() for layer in self.layers)
