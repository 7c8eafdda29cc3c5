"""tileattn: exact, IO-aware (FlashAttention) attention for Transformer inference.

Public API:
    attention(q, k, v, *, causal, scale, mask, window, softcap, return_lse, backend)
    reference.naive_attention / reference.tiled_attention (plain PyTorch implementations)
"""

from . import reference
from .api import attention

__version__ = "0.1.0"
__all__ = ["attention", "reference", "__version__"]
