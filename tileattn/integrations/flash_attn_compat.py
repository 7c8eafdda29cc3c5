"""An import-compatible subset of flash-attn 2's Python API, running on tileattn.

Code written against flash-attn runs where flash-attn cannot be built::

    import sys, tileattn.flash_attn_compat
    sys.modules["flash_attn"] = tileattn.flash_attn_compat      # before the code imports flash_attn
    from flash_attn import flash_attn_func

Same argument names, ``[batch, seqlen, heads, head_dim]`` layout, bottom-right causal alignment,
``window_size=(left, right)`` with -1 for unbounded, ``softcap=0.0`` meaning off, and the same return
values. ``alibi_slopes`` (fp32 ``[Hq]`` or ``[B, Hq]``) follow flash-attn's rule, lse included (under plain causal
masking flash-attn adds ``slope * j``, which shifts each row's lse by ``slope * (i + Sk - Sq)`` from tileattn's
``-slope * |i + Sk - Sq - j|``; the returned lse is flash-attn's). ``flash_attn_with_kvcache`` takes rotary
embeddings, ``cache_batch_idx``, ``cache_leftpad``, and fp8 caches with flash-attn 3's ``k_descale``/``v_descale``.
``dropout_p`` must be 0 (tileattn has no attention dropout).
``return_attn_probs=True`` returns ``(out, softmax_lse, None)``: flash-attn documents the probabilities
as a testing aid that may be wrongly scaled; tileattn never materializes them.

Gradients reach q, k and v (and packed ``qkv``/``kv``) as in flash-attn, with causal, windows, softcap and ALiBi,
through :func:`tileattn.attention`'s backends (each one ``auto`` may pick has a backward). ``deterministic`` is
accepted with nothing to choose: the Triton backward uses no atomics, so reruns give the same bits. Two differences,
both gradients flash-attn does not give: the returned lse has its true gradient (flash-attn's backward ignores the
lse's), and ``flash_attn_with_kvcache`` (no backward in flash-attn) differentiates too.

As in flash-attn 3 (not 2), v (and v_cache) may have a head dim ``D_v`` other than q/k's ``D`` in
``flash_attn_func``, ``flash_attn_varlen_func`` and ``flash_attn_with_kvcache`` (DeepSeek MLA: 192/128, 576/512);
the output is then ``[..., D_v]``. Head dims as in :func:`tileattn.attention`: up to 576 for q/k, 512 for v.
"""

from __future__ import annotations

import torch

from .. import api
from ..cache import write_kv

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_kvpacked_func", "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache"]


def _window(window_size):
    """``(left, right)`` as ints (flash-attn takes ints or 0-d tensors), or None for ``(-1, -1)``."""
    left, right = (int(side) for side in window_size)
    return None if (left, right) == (-1, -1) else (left, right)


def _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes):
    if dropout_p:
        raise ValueError("dropout_p must be 0: tileattn has no attention dropout")
    return dict(scale=softmax_scale, causal=causal, window=_window(window_size), softcap=softcap or None,
                alibi_slopes=alibi_slopes)


def _alibi_column_bias(alibi_slopes, causal, window_size, seqlen_k):
    """Whether flash-attn applies ALiBi as ``slope * j`` here: its "causal" case, right bound 0 and no left bound
    (a bound of at least Sk is none)."""
    left, right = (int(side) for side in window_size)
    return alibi_slopes is not None and (causal or right == 0) and (left < 0 or left >= seqlen_k)


def _flash_attn_lse(lse, alibi_slopes, query_positions):
    """tileattn's lse ``[B, Hq, Sq]`` -> flash-attn's under causal ALiBi: ``+ slope * (i + Sk - Sq)``, with
    ``query_positions [B or 1, Sq]`` the ``i + Sk - Sq`` of each row."""
    slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes[None]
    return lse + slopes[:, :, None] * query_positions[:, None, :].to(lse.dtype)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q ``[B, Sq, Hq, D]``, k ``[B, Sk, Hkv, D]``, v ``[B, Sk, Hkv, D_v]`` -> out ``[B, Sq, Hq, D_v]`` (plus lse
    ``[B, Hq, Sq]``)."""
    out, lse = api.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True,
                             **_options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes))
    out = out.transpose(1, 2)
    if return_attn_probs and _alibi_column_bias(alibi_slopes, causal, window_size, k.shape[1]):
        positions = torch.arange(q.shape[1], device=q.device) + (k.shape[1] - q.shape[1])
        lse = _flash_attn_lse(lse, alibi_slopes, positions[None])
    return (out, lse, None) if return_attn_probs else out


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                             alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q ``[B, Sq, Hq, D]``, kv ``[B, Sk, 2, Hkv, D]`` -> out ``[B, Sq, Hq, D]``."""
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                              alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv ``[B, S, 3, H, D]`` -> out ``[B, S, H, D]``."""
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs)


def _paged_varlen(q, k_pool, v_pool, cu_seqlens_q, lengths_q, lengths_k, max_seqlen_q, block_table, options):
    """Paged varlen prefill as one KV-cache call: each sequence's queries placed at the end of a
    ``[B, max_seqlen_q]`` batch (bottom-right alignment keeps their positions; the rows in front are discarded), the
    keys read through the page table. Returns ``(out [total_q, Hq, D_v], lse [Hq, total_q])``; no host read."""
    batch, total = len(lengths_q), q.shape[0]
    if total == 0 or max_seqlen_q == 0:
        return (q.new_zeros((*q.shape[:-1], v_pool.shape[-1])),
                torch.full((q.shape[1], 0), float("-inf"), device=q.device))
    sequence = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths_q, output_size=total)
    row = torch.arange(total, device=q.device) - cu_seqlens_q[sequence] + (max_seqlen_q - lengths_q)[sequence]
    padded = q.new_zeros(batch, max_seqlen_q, *q.shape[1:])
    padded[sequence, row] = q
    out, lse = api.attention_with_kvcache(
        padded.transpose(1, 2), k_pool.transpose(1, 2), v_pool.transpose(1, 2), lengths_k.to(torch.int32),
        block_table=block_table, return_lse=True, check_bounds=False, **options)
    return out.transpose(1, 2)[sequence, row], lse[sequence, :, row].T


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q ``[total_q, Hq, D]``, k ``[total_k, Hkv, D]``, v ``[total_k, Hkv, D_v]`` -> out ``[total_q, Hq, D_v]`` (plus
    lse ``[Hq, total_q]``). With ``block_table`` ``[B, max_pages]`` (paged prefill), k/v are page pools
    ``[num_pages, page_size, Hkv, D or D_v]`` holding each sequence's ``cu_seqlens_k`` keys."""
    lengths_q, lengths_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    if block_table is not None:
        out, lse = _paged_varlen(q, k, v, cu_seqlens_q, lengths_q, lengths_k, int(max_seqlen_q), block_table,
                                 _options(dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes))
    else:
        out, lse = api.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                        return_lse=True,
                                        **_options(dropout_p, softmax_scale, causal, window_size, softcap,
                                                   alibi_slopes))
    if return_attn_probs and _alibi_column_bias(alibi_slopes, causal, window_size, int(max_seqlen_k)):
        # Row i of sequence b sits at i + len_k[b] - len_q[b]; no host read (lengths stay on the device).
        sequence = torch.repeat_interleave(torch.arange(len(lengths_q), device=q.device), lengths_q,
                                           output_size=q.shape[0])
        positions = (torch.arange(q.shape[0], device=q.device) - cu_seqlens_q[sequence]
                     + (lengths_k - lengths_q)[sequence])
        slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[sequence].T  # [Hq] or [Hq, total_q]
        lse = lse + (slopes[:, None] if slopes.dim() == 1 else slopes) * positions[None].to(lse.dtype)
    return (out, lse, None) if return_attn_probs else out


def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of ``x [B, S, H, D]`` at ``positions [B, S]`` over its first ``2 * cos.shape[1]`` dims
    (computed in fp32, the rest unchanged)."""
    half = cos.shape[1]
    c, s = (t.float()[positions][:, :, None] for t in (cos, sin))  # [B, S, 1, half]
    rotated = x[..., : 2 * half].float()
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        rotated = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        rotated = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., 2 * half:]], dim=-1)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None,
                            num_splits=0, return_softmax_lse=False, k_descale=None, v_descale=None):
    """q ``[B, Sq, Hq, D]``; caches ``[B, S_max, Hkv, D]`` or, with ``block_table``,
    ``[num_blocks, block_size, Hkv, D]`` (v_cache's head dim ``D_v`` may differ, as in flash-attn 3: out is then
    ``[B, Sq, Hq, D_v]``); ``k``/``v`` ``[B, S_new, Hkv, D or D_v]`` appended at ``cache_seqlens`` (int or int32
    ``[B]``) before attending; the queries are the last ``Sq`` positions of the ``cache_seqlens + S_new`` keys
    (bottom-right, as in flash-attn).

    As in flash-attn, ``cache_seqlens`` and ``block_table`` are trusted on the GPU: they are not read back to the
    host (a device sync per call); a length past the cache's capacity is clamped to it, never read or written
    beyond. The PyTorch paths (CPU) check them. ``tileattn.attention_with_kvcache`` checks them by default.

    ``rotary_cos``/``rotary_sin`` ``[seqlen_ro, rotary_dim / 2]`` rotate the new keys at positions
    ``cache_seqlens[b] + i`` and q at the same positions when causal or windowed, else all at ``cache_seqlens[b]``
    (``rotary_interleaved``: pairs ``(0, 1), (2, 3)...``, else ``(i, i + rotary_dim / 2)``), before the append.
    ``cache_batch_idx`` int ``[B]``: sequence ``b`` uses cache row ``cache_batch_idx[b]`` (contiguous caches).
    ``cache_leftpad`` int32 ``[B]``: sequence ``b``'s tokens start at that slot of its row; ``cache_seqlens`` and
    rotary positions still count from the row's start (flash-attn's convention).
    With ``block_table``, lengths past what it addresses raise ``CacheBoundsError`` (a RuntimeError naming
    block_table, as flash-attn's own guard does; both read the lengths back to the host).

    fp8 caches (``torch.float8_e4m3fn``/``float8_e5m2``) take ``k_descale``/``v_descale`` as flash-attn 3 names them:
    fp32 ``[B, Hkv]`` (or 0-d, or ``[Hkv]``), a stored ``x`` meaning ``x.float() * descale``; they are
    :func:`tileattn.attention_with_kvcache`'s ``k_scale``/``v_scale``. Unlike flash-attn 3, q and the new ``k``/``v``
    stay in float16, bfloat16 or float32 (flash-attn 3 takes fp8 q with a ``q_descale``, and new keys already
    quantized): the new tokens are quantized on write with the descales."""
    if cache_seqlens is None:  # flash-attn: the whole cache is valid
        cache_seqlens = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    quantized = api._quantized_cache(k_cache, v_cache)
    if quantized or k_descale is not None or v_descale is not None:  # checked before anything below writes
        _check_descales(q, k_cache, v_cache, k_descale, v_descale, quantized, paged=block_table is not None)
    window = _window(window_size)
    rotary_start = cache_seqlens  # positions in the cache row (flash-attn's, also with leftpad)
    seqlen_new = 0 if k is None else k.shape[1]
    if block_table is not None and api._may_read_device_values():
        # flash-attn's guard for paged caches, which reads the lengths back too (the kernels clamp them anyway)
        longest, capacity = int(cache_seqlens.max()) + seqlen_new, block_table.shape[1] * k_cache.shape[1]
        if longest > capacity:
            raise api.CacheBoundsError(f"paged KV cache: max(cache_seqlens) + new keys = {longest} exceeds what "
                                       f"block_table addresses ({block_table.shape[1]} pages of {k_cache.shape[1]})")
    if (cache_batch_idx is not None or cache_leftpad is not None) and block_table is not None:
        raise ValueError("cache_batch_idx and cache_leftpad cannot be used with block_table (as in flash-attn)")
    if cache_leftpad is not None:
        # Sequence b's tokens start at cache_leftpad[b] of its row: the cache as a pool of one-token pages, the page
        # table listing row b's slots from there (cache_seqlens counts from the row's start, as in flash-attn).
        if k_cache.stride(0) != k_cache.shape[1] * k_cache.stride(1):
            raise NotImplementedError("cache_leftpad needs each cache row to follow the previous one in memory")
        capacity = k_cache.shape[1]
        if q.device.type != "cuda" and api._may_read_device_values():  # the checked paths (see above), in row terms:
            longest = int((cache_seqlens.long() + seqlen_new).max())  # the page table below clamps the last slot
            if longest > capacity:
                raise api.CacheBoundsError(f"a sequence ends at slot {longest} of its cache row (cache_seqlens + new "
                                           f"keys), past the row's {capacity} slots")
        rows = (torch.arange(q.shape[0], device=q.device) if cache_batch_idx is None else cache_batch_idx.long())
        slots = cache_leftpad.long()[:, None] + torch.arange(capacity, device=q.device)[None]
        block_table = (rows[:, None] * capacity + slots.clamp(max=capacity - 1)).to(torch.int32)
        cache_seqlens = (cache_seqlens - cache_leftpad).to(torch.int32)
        k_cache, v_cache = (c.view(-1, 1, *c.shape[2:]) for c in (k_cache, v_cache))
    elif cache_batch_idx is not None:
        # Cache rows picked per sequence: the cache as a pool of one-row pages, cache_batch_idx as the page table.
        block_table = cache_batch_idx.to(torch.int32).view(-1, 1)
    if rotary_cos is not None or rotary_sin is not None:
        if rotary_cos is None or rotary_sin is None or k is None:
            raise ValueError("rotary_cos and rotary_sin go together and need the new keys k and v")
        start = rotary_start.long()[:, None]  # (a device op: only where rotary is asked for)
        k = _rotate(k, rotary_cos, rotary_sin, start + torch.arange(k.shape[1], device=q.device)[None],
                    rotary_interleaved)
        positions = start + torch.arange(q.shape[1], device=q.device)[None]
        # flash-attn counts a window side as unbounded from the cache's capacity on: then q is rotated as non-local
        capacity = k_cache.shape[1] * (1 if block_table is None else block_table.shape[1])  # keys a row can hold
        local = window is not None and any(0 <= side < capacity for side in window)
        q_positions = positions if causal or local else start.expand_as(positions)
        q = _rotate(q, rotary_cos, rotary_sin, q_positions, rotary_interleaved)
    if k is not None and seqlen_new != q.shape[1]:
        # flash-attn appends any number of new keys; the kernels' fused append takes one per query row
        if (v is None or v.shape[:-1] != k.shape[:-1] or k.shape[0] != q.shape[0] or k.shape[2:] != k_cache.shape[2:]
                or v.shape[2:] != v_cache.shape[2:]):
            raise ValueError(f"k and v must be [B, S_new, Hkv, D] = [{q.shape[0]}, S_new, {k_cache.shape[2]}, "
                             f"{k_cache.shape[3]}] and [B, S_new, Hkv, D_v] with D_v = {v_cache.shape[3]}, got "
                             f"{None if k is None else tuple(k.shape)} and {None if v is None else tuple(v.shape)}")
        if quantized:  # new tokens to quantize on write come in q's dtype
            if k.dtype != q.dtype or v.dtype != q.dtype:
                raise TypeError(f"k and v must have q's dtype {q.dtype} over fp8 caches, got {k.dtype} and {v.dtype}")
        elif k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
            raise TypeError(f"k and v must have the cache's dtype {k_cache.dtype}, got {k.dtype} and {v.dtype}")
        caches = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        if api._may_read_device_values():
            api._check_cache_bounds(caches[0], cache_seqlens, seqlen_new, block_table)
        write_kv(*caches, k.transpose(1, 2), v.transpose(1, 2), cache_seqlens, block_table, k_scale=k_descale,
                 v_scale=v_descale)
        cache_seqlens, k, v = (cache_seqlens + seqlen_new).to(torch.int32), None, None
    if alibi_slopes is not None or quantized:
        result = api.attention_with_kvcache(
            q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), cache_seqlens,
            k_new=None if k is None else k.transpose(1, 2), v_new=None if v is None else v.transpose(1, 2),
            block_table=block_table, k_scale=k_descale, v_scale=v_descale, causal=causal, scale=softmax_scale,
            window=window, softcap=softcap or None, alibi_slopes=alibi_slopes, return_lse=True, num_splits=num_splits,
            check_bounds=False)
        out, lse = result[0].transpose(1, 2), result[1]
        capacity = k_cache.shape[1] * (block_table.shape[1] if block_table is not None else 1)
        if return_softmax_lse and _alibi_column_bias(alibi_slopes, causal, window_size, capacity):
            # Row i of sequence b sits at i + cache_seqlens[b] (the new tokens are its last keys).
            appended = 0 if k is None else q.shape[1]
            positions = (cache_seqlens[:, None] + appended - q.shape[1]
                         + torch.arange(q.shape[1], device=q.device)[None])
            lse = _flash_attn_lse(lse, alibi_slopes, positions)
        return (out, lse) if return_softmax_lse else out
    return api._attention_with_kvcache_seq_first(q, k_cache, v_cache, cache_seqlens, k, v, block_table, causal,
                                                 softmax_scale, window, softcap or None, return_softmax_lse, num_splits)


def _check_descales(q, k_cache, v_cache, k_descale, v_descale, quantized, paged):
    """flash-attn 3's descales, checked under their own names before the new tokens are written: given exactly with
    fp8 caches ``[B, S, Hkv, D]`` (or pages), fp32 0-d, ``[Hkv]`` or ``[B, Hkv]``, and q of a dtype those take.
    Per-token scales are tileattn's alone (:func:`tileattn.attention_with_kvcache`); here the cache may be re-viewed
    as one-token pages (``cache_leftpad``), which a per-token scale would have to follow."""
    if quantized:
        api._check_quantized_dtypes(q, k_cache, v_cache)
    for name, t in (("k_descale", k_descale), ("v_descale", v_descale)):
        if isinstance(t, torch.Tensor) and t.dim() > 2:
            raise ValueError(f"{name} must be [B, Hkv] as in flash-attn 3 (or 0-d, or [Hkv]), got {list(t.shape)}; "
                             "per-token scales go to tileattn.attention_with_kvcache's k_scale/v_scale")
    api._check_kv_scales(k_cache.transpose(1, 2), v_cache.transpose(1, 2), k_descale, v_descale, quantized=quantized,
                         batch=q.shape[0], paged=paged, writes=False, names=("k_descale", "v_descale"))


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q ``[total_q, Hq, D]``, kv ``[total_k, 2, Hkv, D]`` -> out ``[total_q, Hq, D]``."""
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv ``[total, 3, H, D]`` -> out ``[total, H, D]``."""
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
