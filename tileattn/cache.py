"""KV caches: writing new tokens into contiguous or paged caches, and :class:`PagedKVCache`, the block
allocator a serving loop needs.

Layouts (logical, any strides):
  contiguous: ``[B, Hkv, S_max, D]``;
  paged:      ``[num_pages, Hkv, page_size, D]`` plus ``block_table [B, max_pages]`` (int32): token ``j`` of
              sequence ``b`` lives in page ``block_table[b, j // page_size]``, slot ``j % page_size``.
              The common storage ``[num_pages, page_size, Hkv, D]`` is passed as ``.transpose(1, 2)``.
"""

from __future__ import annotations

import torch

from . import quant


def cache_positions(cache_seqlens: torch.Tensor, num_new: int, block_table: torch.Tensor | None, page_size: int):
    """Where ``num_new`` tokens appended after ``cache_seqlens[b]`` go: ``(index0, slot)``, both ``[B, num_new]``;
    index0 is the batch row (contiguous) or the page (paged), slot the position inside it."""
    pos = cache_seqlens.long()[:, None] + torch.arange(num_new, device=cache_seqlens.device)
    if block_table is None:
        return torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos), pos
    return block_table.long().gather(1, pos // page_size), pos % page_size


def write_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table=None, *, k_scale=None, v_scale=None):
    """Write ``k_new``/``v_new`` ``[B, Hkv, Sq, D]`` at positions ``cache_seqlens[b] ..`` of each sequence.

    fp8 caches take their scales (see :mod:`tileattn.quant`): the new tokens are quantized by the write rule, and
    per-token scales get each new token's own scale, written at its position. Quantization rounds, so the stored
    tokens carry no gradient back to ``k_new``/``v_new``.
    Pure tensor indexing (no host sync), so it can be captured in a CUDA graph. Bounds are the caller's
    to check (``attention_with_kvcache`` does, outside graph capture)."""
    index0, slot = cache_positions(cache_seqlens, k_new.shape[2], block_table, k_cache.shape[2])
    # Advanced indices on dims 0 and 2 around a slice: the result is [B, Sq, Hkv, D].
    k_cache[index0, :, slot] = _stored(k_new, k_cache.dtype, k_scale, index0, slot).transpose(1, 2)
    v_cache[index0, :, slot] = _stored(v_new, v_cache.dtype, v_scale, index0, slot).transpose(1, 2)


def _stored(new, dtype, scale, index0, slot):
    """What a cache of ``dtype`` stores for ``new`` ``[B, Hkv, Sq, D]``: ``new`` itself, or with an fp8 cache's
    ``scale`` its quantized values (a per-token ``scale`` first receives the new tokens' scales at ``index0, slot``)."""
    if scale is None:
        return new
    with torch.no_grad():
        if scale.dim() == 3:  # per token and KV head: [B, Hkv, S_max] or [num_pages, Hkv, page_size]
            new_scale = quant.token_scales(new, dtype)
            scale[index0, :, slot] = new_scale.transpose(1, 2)
            scale = new_scale
        return quant.quantize(new, scale, dtype)


class PagedKVCache:
    """K and V page pools on one device, with per-sequence page lists, a block table and lengths.

    ``k_pool``/``v_pool`` are stored ``[num_pages, page_size, Hkv, D]`` (token-major pages, as in
    vLLM/flash-attn); :meth:`kernel_args` hands the kernels their ``[num_pages, Hkv, page_size, D]`` views.
    Sequences are slots ``0 .. max_seqs-1``; every misuse raises before anything is modified.

    Example::

        cache = PagedKVCache(num_pages=1024, page_size=16, kv_heads=8, head_dim=128, max_seqs=64,
                             max_pages_per_seq=256, dtype=torch.bfloat16, device="cuda")
        seq = cache.add_sequence()
        cache.append(seq, k_prompt, v_prompt)      # [Hkv, n, D]
        # Decode step: make room, let the kernel write the new token while attending, then count it.
        out = cache.attention([seq], q, k_new=k, v_new=v)   # q [1, Hq, 1, D], k/v [1, Hkv, 1, D]
        # The same by hand (kernel_args gives the cache arguments of attention_with_kvcache):
        cache.reserve(seq, 1)
        out = tileattn.attention_with_kvcache(q, **cache.kernel_args([seq]), k_new=k, v_new=v)
        cache.advance(seq, 1)

    FP8 pools (``dtype=torch.float8_e4m3fn`` or ``torch.float8_e5m2``, see :mod:`tileattn.quant`) hold scales
    ``k_scale``/``v_scale`` of one ``scale_granularity``: ``"token"`` (the default; each token's own, computed when
    it is written, stored ``[num_pages, page_size, Hkv]`` like the pools), ``"head"`` (``[Hkv]``) or ``"tensor"``
    (0-d). Head and tensor scales are fixed when the cache is made: pass them (fp32 tensors of those shapes, or a
    number for all heads), e.g. from :func:`tileattn.quant.calibrate_scales` on sample keys and values. Tokens are
    given to :meth:`append` and :meth:`attention` in float16, bfloat16 or float32 and quantized on write;
    :meth:`kernel_args` and :meth:`attention` pass the scales along.
    """

    def __init__(self, num_pages, page_size, kv_heads, head_dim, *, max_seqs, max_pages_per_seq,
                 dtype=torch.float16, device="cpu", scale_granularity=None, k_scale=None, v_scale=None):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("kv_heads", kv_heads),
                            ("head_dim", head_dim), ("max_seqs", max_seqs), ("max_pages_per_seq", max_pages_per_seq)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.page_size, self.kv_heads, self.head_dim = page_size, kv_heads, head_dim
        self.k_pool = torch.zeros(num_pages, page_size, kv_heads, head_dim, dtype=dtype, device=device)
        self.dtype, self.device = dtype, self.k_pool.device  # "cuda" resolved to "cuda:0": compare like with like
        self.v_pool = torch.zeros_like(self.k_pool)
        self.scale_granularity, self.k_scale, self.v_scale = self._scales(scale_granularity, k_scale, v_scale)
        self.block_table = torch.zeros(max_seqs, max_pages_per_seq, dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=device)
        self._free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out low ids first
        self._free_seqs = list(range(max_seqs - 1, -1, -1))
        self._pages: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}

    def _scales(self, granularity, k_scale, v_scale):
        """``(granularity, k_scale, v_scale)`` as stored: ``(None, None, None)`` for pools that are not fp8."""
        if not quant.is_fp8(self.dtype):
            if granularity is not None or k_scale is not None or v_scale is not None:
                raise ValueError(f"scale_granularity, k_scale and v_scale are for fp8 pools; dtype is {self.dtype}")
            return None, None, None
        granularity = "token" if granularity is None else granularity
        if granularity not in quant.GRANULARITIES:
            raise ValueError(f"scale_granularity must be one of {quant.GRANULARITIES}, got {granularity!r}")
        if granularity == "token":
            if k_scale is not None or v_scale is not None:
                raise ValueError("per-token scales are computed as tokens are written: pass no k_scale or v_scale")
            # Token-major like the pools; a slot's scale is written with its token (unwritten slots are never read).
            ones = torch.ones(self.k_pool.shape[:3], dtype=torch.float32, device=self.device)
            return granularity, ones, ones.clone()
        shape = () if granularity == "tensor" else (self.kv_heads,)
        scales = []
        for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale is None:
                raise ValueError(f"{name} is needed with scale_granularity={granularity!r} (e.g. from "
                                 "tileattn.quant.calibrate_scales on sample keys and values)")
            if not isinstance(scale, torch.Tensor):
                scale = torch.full(shape, float(scale))
            if tuple(scale.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} with scale_granularity={granularity!r}, got "
                                 f"{list(scale.shape)}")
            scales.append(scale.to(dtype=torch.float32, device=self.device))
        return granularity, *scales

    def _scale_args(self) -> dict:
        """The scales as keyword arguments of ``attention_with_kvcache`` (none for pools that are not fp8)."""
        if self.k_scale is None:
            return {}
        if self.scale_granularity == "token":  # [num_pages, Hkv, page_size] views, as the pools are handed over
            return dict(k_scale=self.k_scale.transpose(1, 2), v_scale=self.v_scale.transpose(1, 2))
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)

    @property
    def num_free_pages(self) -> int:
        return len(self._free_pages)

    def length(self, seq: int) -> int:
        self._check_seq(seq)
        return self._lengths[seq]

    def add_sequence(self) -> int:
        if not self._free_seqs:
            raise RuntimeError(f"all {self.block_table.shape[0]} sequence slots are in use")
        seq = self._free_seqs.pop()
        self._pages[seq], self._lengths[seq] = [], 0
        self.seqlens[seq] = 0
        return seq

    def free_sequence(self, seq: int) -> None:
        self._check_seq(seq)
        self._free_pages.extend(reversed(self._pages.pop(seq)))
        del self._lengths[seq]
        self.seqlens[seq] = 0
        self._free_seqs.append(seq)

    def reserve(self, seq: int, num_tokens: int) -> None:
        """Make room for ``num_tokens`` more tokens (allocating pages); raises and changes nothing if it cannot."""
        self._check_seq(seq)
        need = -(-(self._lengths[seq] + num_tokens) // self.page_size) - len(self._pages[seq])
        if len(self._pages[seq]) + need > self.block_table.shape[1]:
            raise ValueError(f"sequence {seq} would need {len(self._pages[seq]) + need} pages, more than "
                             f"max_pages_per_seq={self.block_table.shape[1]}")
        if need > len(self._free_pages):
            raise RuntimeError(f"out of pages: sequence {seq} needs {need} more, {len(self._free_pages)} free")
        for _ in range(max(need, 0)):
            page = self._free_pages.pop()
            self.block_table[seq, len(self._pages[seq])] = page
            self._pages[seq].append(page)

    def advance(self, seq: int, num_tokens: int) -> None:
        """Count ``num_tokens`` more tokens as written (by ``attention_with_kvcache(..., k_new=, v_new=)``
        into pages made ready by :meth:`reserve`)."""
        self._check_seq(seq)
        room = len(self._pages[seq]) * self.page_size - self._lengths[seq]
        if not 0 <= num_tokens <= room:
            raise ValueError(f"sequence {seq} has room for {room} more tokens (reserve first), got {num_tokens}")
        self._lengths[seq] += num_tokens
        self.seqlens[seq] = self._lengths[seq]

    def append(self, seq: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k``/``v`` ``[Hkv, n, D]`` to sequence ``seq`` (pages are allocated as needed)."""
        self._check_seq(seq)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor [kv_heads, n, head_dim], got {type(t).__name__}")
            if t.dim() != 3 or t.shape[0] != self.kv_heads or t.shape[2] != self.head_dim:
                raise ValueError(f"{name} must be [kv_heads={self.kv_heads}, n, head_dim={self.head_dim}] (heads "
                                 f"first: a [n, heads, head_dim] tensor is passed as .transpose(0, 1)), got "
                                 f"{tuple(t.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
        # fp8 pools take tokens to quantize (in the dtypes attention_with_kvcache takes over them)
        dtypes = (torch.float16, torch.bfloat16, torch.float32) if self.k_scale is not None else (self.dtype,)
        for name, t in (("k", k), ("v", v)):
            if t.dtype not in dtypes or t.device != self.device:
                raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))} on {self.device}, got {t.dtype} on "
                                f"{t.device}")
        self.reserve(seq, k.shape[1])
        start = torch.tensor([self._lengths[seq]], dtype=torch.int32, device=self.device)
        table = self.block_table[seq:seq + 1]
        write_kv(self.k_pool.transpose(1, 2), self.v_pool.transpose(1, 2), k[None], v[None], start, table,
                 **self._scale_args())
        self.advance(seq, k.shape[1])

    def kernel_args(self, seqs) -> dict:
        """``k_cache``, ``v_cache``, ``cache_seqlens`` and ``block_table`` (and with fp8 pools ``k_scale``,
        ``v_scale``) for the sequences ``seqs``, in that order, as keyword arguments of ``attention_with_kvcache``."""
        for seq in seqs:
            self._check_seq(seq)
        rows = self._rows(seqs)
        return dict(k_cache=self.k_pool.transpose(1, 2), v_cache=self.v_pool.transpose(1, 2),
                    cache_seqlens=self.seqlens[rows], block_table=self.block_table[rows], **self._scale_args())

    def attention(self, seqs, q, k_new=None, v_new=None, **options):
        """One step of the serving loop for the sequences ``seqs``: make room for ``q``'s ``Sq`` tokens when
        ``k_new``/``v_new`` ``[len(seqs), Hkv, Sq, D]`` are given, write them and attend (``q [len(seqs), Hq, Sq,
        D]``, causal by default), then count them. Returns what :func:`tileattn.attention_with_kvcache` returns
        (``options`` are its keyword options). The cache's own bookkeeping guarantees what that function's
        ``check_bounds`` would read back from the device, so this skips that device sync."""
        from .api import attention_with_kvcache

        seqs = list(seqs)
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs must not repeat a sequence, got {seqs}")
        new = 0 if k_new is None else k_new.shape[2]
        for seq in seqs:  # all or nothing: check every sequence before reserving pages for any
            self._check_seq(seq)
            if new and -(-(self._lengths[seq] + new) // self.page_size) > self.block_table.shape[1]:
                raise ValueError(f"sequence {seq} would exceed max_pages_per_seq={self.block_table.shape[1]}")
        if new and sum(max(0, -(-(self._lengths[s] + new) // self.page_size) - len(self._pages[s])) for s in seqs) \
                > len(self._free_pages):
            raise RuntimeError(f"out of pages: {len(seqs)} sequences need more than the {len(self._free_pages)} free")
        held = {seq: len(self._pages[seq]) for seq in seqs}
        for seq in seqs:
            self.reserve(seq, new)
        rows = self._rows(seqs)
        try:
            result = attention_with_kvcache(q, self.k_pool.transpose(1, 2), self.v_pool.transpose(1, 2),
                                            self.seqlens[rows], block_table=self.block_table[rows], k_new=k_new,
                                            v_new=v_new, check_bounds=False, **self._scale_args(), **options)
        except Exception:  # a call attention_with_kvcache refuses changes nothing: give back the pages reserved
            for seq, count in held.items():
                while len(self._pages[seq]) > count:
                    self._free_pages.append(self._pages[seq].pop())
            raise
        if new:
            for seq in seqs:
                self._lengths[seq] += new
            self.seqlens[rows] += new  # one device op for the batch, not one per sequence
        return result

    def _rows(self, seqs):
        """Index of ``seqs`` into the per-slot tensors: a slice (views, no device work) when they are
        consecutive slots in order, else a device index tensor."""
        seqs = list(seqs)
        if seqs and seqs == list(range(seqs[0], seqs[0] + len(seqs))):
            return slice(seqs[0], seqs[0] + len(seqs))
        return torch.as_tensor(seqs, dtype=torch.long, device=self.device)

    def _check_seq(self, seq):
        if seq not in self._lengths:
            raise ValueError(f"sequence {seq!r} is not an active sequence of this cache")
