"""The Triton launchers as PyTorch custom ops (``torch.ops.tileattn.*``), with fake (meta) implementations,
so ``torch.compile(..., fullgraph=True)`` sees attention as one opaque op instead of breaking the graph
at a Triton launch, and CUDA graphs capture it like any other kernel.

The public functions call these ops only while compiling: in eager mode they call the launchers
directly, which skips the custom-op dispatcher's host overhead (tens of microseconds, as much as a
whole decode step at batch 1).
"""

from __future__ import annotations

import torch

from .cache import write_kv
from .kernels.backward import attention_backward
from .kernels.common import output_like
from .kernels.decode import decode_attention, decode_plan
from .kernels.hopper import hopper_unsupported_reason
from .kernels.prefill import prefill_attention, prefill_attention_varlen, prefill_plan


def _lse_or_empty(lse, like):
    return lse if lse is not None else like.new_empty(0, dtype=torch.float32)


@torch.library.custom_op("tileattn::prefill", mutates_args=())
def prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
            window_left: int, window_right: int, softcap: float, return_lse: bool, alibi_slopes: torch.Tensor | None,
            sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefill_attention``; softcap 0 means none; lse is empty unless ``return_lse``."""
    out, lse = prefill_attention(q, k, v, window=(window_left, window_right), scale=scale, softcap=softcap or None,
                                 mask=mask, alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse)
    return out, _lse_or_empty(lse, q)


@prefill.register_fake
def _(q, k, v, mask, scale, window_left, window_right, softcap, return_lse, alibi_slopes, sinks):
    return output_like(q, v.shape[-1]), q.new_empty(q.shape[:3] if return_lse else (0,), dtype=torch.float32)


@torch.library.custom_op("tileattn::prefill_backward", mutates_args=())
def prefill_backward(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     window_left: int, window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                     sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv, dsinks)`` of ``tileattn::prefill`` (see ``kernels.backward``); softcap 0 means none; dsinks is
    empty without sinks."""
    dq, dk, dv, dsinks = attention_backward(
        grad_out, q, k, v, out, lse, grad_lse=grad_lse, window=(window_left, window_right), scale=scale,
        softcap=softcap or None, mask=mask, alibi_slopes=alibi_slopes, sinks=sinks)
    return dq, dk, dv, _lse_or_empty(dsinks, q)


@prefill_backward.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, mask, scale, window_left, window_right, softcap, alibi_slopes, sinks):
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else torch.empty_like(sinks)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dsinks


def _prefill_setup_context(ctx, inputs, output):
    q, k, v, mask, scale, window_left, window_right, softcap, return_lse, alibi_slopes, sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, alibi_slopes, sinks)
    ctx.options = (scale, window_left, window_right, softcap)
    ctx.unsupported = None
    if not return_lse:
        ctx.unsupported = "the forward was called with return_lse=False (no lse to recompute the probabilities from)"


def _prefill_grad(ctx, grad_out, grad_lse):
    if ctx.unsupported:
        raise RuntimeError(f"tileattn::prefill backward: {ctx.unsupported}")
    q, k, v, out, lse, mask, alibi_slopes, sinks = ctx.saved_tensors
    dq, dk, dv, dsinks = prefill_backward(grad_out, grad_lse, q, k, v, out, lse, mask, *ctx.options, alibi_slopes,
                                          sinks)
    return dq, dk, dv, None, None, None, None, None, None, None, None if sinks is None else dsinks


# The mask and the ALiBi slopes get no gradient (tileattn.attention sends a call where they require grad to the
# torch backend).
torch.library.register_autograd("tileattn::prefill", _prefill_grad, setup_context=_prefill_setup_context)


@torch.library.custom_op("tileattn::prefill_varlen", mutates_args=())
def prefill_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
                   window_right: int, softcap: float, return_lse: bool, alibi_slopes: torch.Tensor | None,
                   sinks: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = prefill_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                        window=(window_left, window_right), scale=scale, softcap=softcap or None,
                                        alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse)
    return out, _lse_or_empty(lse, q)


@prefill_varlen.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap,
      return_lse, alibi_slopes, sinks):
    return output_like(q, v.shape[-1]), q.new_empty((q.shape[1], q.shape[0]) if return_lse else (0,), dtype=torch.float32)


@torch.library.custom_op("tileattn::decode", mutates_args=())
def decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor | None,
           block_table: torch.Tensor | None, mask: torch.Tensor | None, new_tokens: int, scale: float,
           window_left: int, window_right: int, softcap: float, return_lse: bool,
           num_splits: int, alibi_slopes: torch.Tensor | None,
           sinks: torch.Tensor | None, k_scale: torch.Tensor | None = None,
           v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``decode_attention`` over tokens already in the cache (new ones are written before, see :func:`run_decode`);
    ``k_scale``/``v_scale``: an fp8 cache's scales."""
    out, lse = decode_attention(q, k_cache, v_cache, cache_seqlens, new_tokens=new_tokens, block_table=block_table,
                                window=(window_left, window_right), scale=scale, softcap=softcap or None, mask=mask,
                                alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse, num_splits=num_splits,
                                reuse_workspace=False, k_scale=k_scale, v_scale=v_scale)
    return out, _lse_or_empty(lse, q)


@decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, mask, new_tokens, scale, window_left, window_right, softcap,
      return_lse, num_splits, alibi_slopes, sinks, k_scale=None, v_scale=None):
    return output_like(q, v_cache.shape[-1]), q.new_empty(q.shape[:3] if return_lse else (0,), dtype=torch.float32)


def _result(out, lse, return_lse):
    return out, (lse if return_lse else None)


def run_prefill(q, k, v, *, mask, scale, window, softcap, return_lse, alibi_slopes=None, sinks=None):
    if torch.compiler.is_compiling():
        return _result(*prefill(q, k, v, mask, scale, *window, softcap or 0.0, return_lse, alibi_slopes, sinks),
                       return_lse)
    return prefill_attention(q, k, v, window=window, scale=scale, softcap=softcap, mask=mask,
                             alibi_slopes=alibi_slopes, sinks=sinks, return_lse=return_lse)


def attention_plan(q, k, v, *, decode_shaped, mask, scale, window, softcap, return_lse):
    """The prepared launch of an eager ``tileattn.attention`` call on the Triton kernels (no ALiBi, no sinks; mask
    already expanded to ``[B, Hq, Sq, Sk]``), for every later call of its signature: ``plan.run(q, k, v, mask)``
    gives ``(out, lse or None)``, as :func:`run_decode` (decode-shaped calls) or :func:`run_prefill` would."""
    if decode_shaped:
        return decode_plan(q, k, v, None, new_tokens=k.shape[2], window=window, scale=scale, softcap=softcap,
                           mask=mask, return_lse=return_lse)
    return prefill_plan(q, k, v, window=window, scale=scale, softcap=softcap, mask=mask, return_lse=return_lse)


def prefill_kernel(q, k, v, *, mask, window, softcap) -> str:
    """Which prefill kernel a Triton ``attention`` call of this signature runs (for ``explain``): the Hopper
    kernel, or the portable one and why the Hopper kernel does not take it."""
    reason = hopper_unsupported_reason(q, k, v, window=window, softcap=softcap, mask=mask)
    return "the Hopper prefill kernel" if reason is None else f"the portable prefill kernel (Hopper kernel: {reason})"


def run_prefill_differentiable(q, k, v, *, mask, scale, window, softcap, return_lse, alibi_slopes=None, sinks=None):
    """:func:`run_prefill` through the ``tileattn::prefill`` op and its autograd (the FlashAttention backward), in
    eager mode too: for calls whose inputs (q, k, v, sinks) require grad."""
    out, lse = prefill(q, k, v, mask, scale, *window, softcap or 0.0, True, alibi_slopes, sinks)
    return out, (lse if return_lse else None)


def run_prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale, window, softcap,
                       return_lse, alibi_slopes=None, sinks=None):
    if torch.compiler.is_compiling():
        return _result(*prefill_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                                       *window, softcap or 0.0, return_lse, alibi_slopes, sinks), return_lse)
    return prefill_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window=window,
                                    scale=scale, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                    return_lse=return_lse)


def run_decode(q, k_cache, v_cache, cache_seqlens, *, new_tokens, block_table, scale, window, softcap, return_lse,
               num_splits, mask=None, k_new=None, v_new=None, seq_first=False, alibi_slopes=None, sinks=None,
               k_scale=None, v_scale=None):
    """Decode attention; with ``k_new``/``v_new`` the new tokens are first written into the cache (quantized into an
    fp8 one with its ``k_scale``/``v_scale``): in eager mode by the same launch, while compiling by PyTorch indexing
    (an in-place write Inductor sees) before the op. ``seq_first``: tensors in ``[B, S, H, D]`` order (eager mode
    only)."""
    if seq_first:
        if torch.compiler.is_compiling():
            raise RuntimeError("seq_first decode is for eager calls: transpose to [B, H, S, D] under torch.compile")
        return decode_attention(q, k_cache, v_cache, cache_seqlens, new_tokens=new_tokens, block_table=block_table,
                                window=window, scale=scale, softcap=softcap, return_lse=return_lse,
                                num_splits=num_splits, k_new=k_new, v_new=v_new, seq_first=True,
                                alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale, v_scale=v_scale)
    if torch.compiler.is_compiling():
        if k_new is not None:
            write_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, k_scale=k_scale, v_scale=v_scale)
        return _result(*decode(q, k_cache, v_cache, cache_seqlens, block_table, mask, new_tokens, scale, *window,
                               softcap or 0.0, return_lse, num_splits, alibi_slopes, sinks, k_scale, v_scale),
                       return_lse)
    return decode_attention(q, k_cache, v_cache, cache_seqlens, new_tokens=new_tokens, block_table=block_table,
                            window=window, scale=scale, softcap=softcap, mask=mask, alibi_slopes=alibi_slopes,
                            sinks=sinks, return_lse=return_lse, num_splits=num_splits, k_new=k_new, v_new=v_new,
                            k_scale=k_scale, v_scale=v_scale)

