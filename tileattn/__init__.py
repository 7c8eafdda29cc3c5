"""tileattn: exact, IO-aware (FlashAttention) attention for Transformer inference.

Public API:
    attention(q, k, v, ...)                      [B, H, S, D] attention, masks, windows, softcap, GQA
    attention_varlen(q, k, v, cu_seqlens_q, ...)   packed variable-length sequences
    attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, ...)   decode over contiguous or paged caches
    merge_attention(out_a, lse_a, out_b, lse_b)  exact merge of partial attentions
    explain(q, k, v, ...)                        which backend attention() would use, and why
    cache.PagedKVCache                           paged K/V pools and block tables (fp8 pools too)
    quant                                        fp8 KV caches: formats, scale granularities, quantize/calibrate
    reference                                    plain-PyTorch implementations (the test oracle)
    use_for_sdpa() / restore_sdpa()              route SDPA's flash backend and varlen_attn to tileattn's kernels
                                                 (torch's flash-attention registry, name "TILEATTN"), and back
"""

from . import cache, quant, reference
from .api import attention, attention_varlen, attention_with_kvcache, explain, merge_attention
from .integrations import sdpa_provider as _sdpa_provider
from .integrations.sdpa_provider import restore_sdpa, use_for_sdpa

_sdpa_provider.register()  # "TILEATTN" in torch's flash-attention registry, where it exists; never activated here

__version__ = "0.1.0"
__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "explain", "merge_attention", "cache",
           "quant", "reference", "use_for_sdpa", "restore_sdpa", "__version__"]
