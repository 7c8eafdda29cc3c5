"""Context parallelism: exact attention over a sequence whose tokens are sharded across the ranks of a
``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

Every rank passes its own slice of q, k and v; the result on each rank is that rank's rows of
:func:`tileattn.attention` over the whole (gathered) sequence, exact up to rounding: partial results over key blocks
are merged by their logsumexp (:func:`tileattn.merge_attention`), in fp32 (fp64 for fp64 inputs).

Layouts (how a sequence of ``S`` tokens is cut; :func:`shard_sequence` / :func:`unshard_sequence` do it):
    ``"zigzag"``: ``2W`` chunks for ``W`` ranks, rank ``r`` holds chunks ``r`` and ``2W - 1 - r`` (in that order).
        With ``causal=True`` every rank then does the same work (a late chunk's many keys pair with an early
        chunk's few); the default.
    ``"contiguous"``: ``W`` chunks, rank ``r`` holds chunk ``r``. Balanced without causality (or with a window much
        shorter than a chunk); with ``causal=True`` the last rank does ``2W - 1`` times the first rank's work.
    Chunk sizes follow ``torch.tensor_split``: ``S`` need not divide evenly, the first ``S % n`` chunks get one
    token more (a rank may hold no token at all when ``S < n``).

Variants (how keys reach the queries):
    ``"ring"``: K/V blocks travel around the ring of ranks (``batch_isend_irecv``); the next block's transfer is
        posted before the current block is computed, so it hides behind compute when a step's compute outlasts the
        transfer of one block (``benchmarks/cp_model.py``). Memory per rank: two K/V blocks beyond the inputs.
    ``"allgather"``: one all-gather of every rank's K/V, then one attention call per local chunk over the keys it
        sees. It materializes the whole sequence's K/V on every rank, and its transfer is not overlapped.
    ``"auto"`` (the rule, :func:`choose_variant`): ``"allgather"`` when ``world_size * Hkv <= Hq``, i.e. when the
        gathered K/V is no larger than the rank's own q (GQA/MQA: e.g. up to 4 ranks with Llama-3's 32/8 heads),
        else ``"ring"``. Both move the same bytes. The ring hides them behind compute (from ~560 tokens per rank
        over NVLink, ~5000 over InfiniBand, causal, for that shape) but merges each block's result into its
        accumulators, W - 1 passes over the rank's output; the all-gather exposes its transfer but merges
        nothing. With GQA over NVLink the exposed transfer costs less than those merges, and groups of up to
        ``Hq / Hkv`` ranks (4-8) are the ones that fit in one NVLink domain; larger groups cross slower links,
        where the ring wins, and would gather too much K/V per rank (``benchmarks/cp_model.py``).

GQA/MQA: K/V travel with their ``Hkv`` heads, never repeated. Gradients: ``ring_attention`` and
``ring_attention_varlen`` are differentiable (the ring's backward is a second ring pass that recomputes each block
and carries the K/V gradients home with the blocks, in fp32; the all-gather's backward is a reduce-scatter).

Every entry point first exchanges a small vector of shapes and options with an all-gather, so that ranks whose
arguments disagree (or a rank whose arguments are refused) raise a ValueError on every rank instead of leaving the
others waiting in a collective. On CUDA that exchange is one host sync per call.

``torch.distributed`` is imported by this module only: ``import tileattn.distributed`` explicitly.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import api
from .reference import UNBOUNDED, lse_dtype

LAYOUTS = ("zigzag", "contiguous")
VARIANTS = ("auto", "ring", "allgather")
BACKENDS = ("auto", "triton", "torch", "naive")  # the backends that return the lse every merge needs
_BACKEND_DEVICES = {"gloo": "cpu", "nccl": "cuda", "xccl": "xpu"}  # which tensors each collective backend carries
_META_FIELDS = 16  # ints per rank in the argument exchange (padded), so every rank sends the same size


# ---- layouts -------------------------------------------------------------------------------------------------

def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _check_rank(rank, world_size):
    for name, value in (("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank {rank}, world_size {world_size}")


def shard_ranges(seq_len: int, rank: int, world_size: int, layout: str = "zigzag") -> list[range]:
    """The global positions rank ``rank`` holds of a sequence of ``seq_len`` tokens, in local order: one range
    (``"contiguous"``) or two (``"zigzag"``: chunks ``rank`` and ``2W - 1 - rank``), possibly empty. For RoPE
    positions: ``torch.cat([torch.arange(r.start, r.stop) for r in shard_ranges(...)])``."""
    _check_layout(layout)
    _check_rank(rank, world_size)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise ValueError(f"seq_len must be an int >= 0, got {seq_len!r}")
    chunks = 2 * world_size if layout == "zigzag" else world_size
    base, extra = divmod(seq_len, chunks)
    starts = [i * base + min(i, extra) for i in range(chunks + 1)]
    owned = (rank, chunks - 1 - rank) if layout == "zigzag" else (rank,)
    return [range(starts[i], starts[i + 1]) for i in owned]


def _seq_lens_of(cu_seqlens, name="cu_seqlens") -> list[int]:
    """Sequence lengths from a ``[batch + 1]`` int tensor or list of offsets (starts at 0, never decreases)."""
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int32 (or int64) tensor, got {cu_seqlens.dtype} of shape "
                            f"{tuple(cu_seqlens.shape)}")
        values = cu_seqlens.tolist()
    elif isinstance(cu_seqlens, (list, tuple)) and all(isinstance(c, int) and not isinstance(c, bool)
                                                       for c in cu_seqlens):
        values = list(cu_seqlens)
    else:
        raise TypeError(f"{name} must be an int tensor or a list of ints, got {type(cu_seqlens).__name__}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if not values or values[0] != 0 or min(lengths, default=0) < 0:
        raise ValueError(f"{name} must start at 0 and never decrease, got {values}")
    return lengths


def _check_dim(x, dim, name="x"):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int naming one of {name}'s {x.dim()} dims, got {dim!r}")
    return dim % x.dim()


def _cat(parts, x, dim):
    """``torch.cat`` that keeps a single part a view (no copy)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim) if parts else x.narrow(dim, 0, 0)


def shard_sequence(x: torch.Tensor, rank: int, world_size: int, layout: str = "zigzag", dim: int = 2):
    """Rank ``rank``'s share of ``x`` along its sequence axis ``dim`` (2 for ``[B, H, S, D]``): a view for
    ``"contiguous"``, a copy of two chunks for ``"zigzag"``. See the module docstring for the layouts."""
    dim = _check_dim(x, dim)
    ranges = shard_ranges(x.shape[dim], rank, world_size, layout)
    return _cat([x.narrow(dim, r.start, len(r)) for r in ranges if len(r)], x, dim)


def unshard_sequence(shards: Sequence[torch.Tensor], layout: str = "zigzag", dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's share, ``shards[r]`` being rank ``r``'s (the inverse of
    :func:`shard_sequence`). Raises a ValueError if the shards' lengths are not the layout's."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise TypeError("shards must be a non-empty list of tensors, one per rank")
    dim = _check_dim(shards[0], dim, "shards[0]")
    world_size = len(shards)
    seq_len = sum(s.shape[dim] for s in shards)
    pieces = []
    for rank, shard in enumerate(shards):
        ranges = shard_ranges(seq_len, rank, world_size, layout)
        if shard.shape[dim] != sum(map(len, ranges)):
            raise ValueError(f"shards: rank {rank} holds {shard.shape[dim]} tokens, but layout {layout!r} gives it "
                             f"{sum(map(len, ranges))} of {seq_len} ({[len(r) for r in ranges]})")
        offset = 0
        for r in ranges:
            pieces.append((r.start, shard.narrow(dim, offset, len(r))))
            offset += len(r)
    return torch.cat([p for _, p in sorted(pieces, key=lambda item: item[0])], dim)


def shard_varlen(x: torch.Tensor, cu_seqlens, rank: int, world_size: int, layout: str = "zigzag", dim: int = 0):
    """Rank ``rank``'s share of packed sequences (``x`` ``[total, H, D]``, sequence ``b`` being tokens
    ``cu_seqlens[b] .. cu_seqlens[b + 1]`` along ``dim``): each sequence is sharded as :func:`shard_sequence`
    shards one, and the rank's parts are packed in sequence order."""
    dim = _check_dim(x, dim)
    lengths = _seq_lens_of(cu_seqlens)
    if sum(lengths) != x.shape[dim]:
        raise ValueError(f"cu_seqlens ends at {sum(lengths)}, but x has {x.shape[dim]} tokens along dim {dim}")
    parts, start = [], 0
    for length in lengths:
        parts += [x.narrow(dim, start + r.start, len(r)) for r in shard_ranges(length, rank, world_size, layout)
                  if len(r)]
        start += length
    return _cat(parts, x, dim)


def unshard_varlen(shards: Sequence[torch.Tensor], cu_seqlens, layout: str = "zigzag", dim: int = 0):
    """The packed sequences from every rank's share (the inverse of :func:`shard_varlen`)."""
    if not isinstance(shards, (list, tuple)) or not shards:
        raise TypeError("shards must be a non-empty list of tensors, one per rank")
    dim = _check_dim(shards[0], dim, "shards[0]")
    lengths = _seq_lens_of(cu_seqlens)
    table = _plan(lengths, len(shards), layout)
    for rank, (shard, chunks) in enumerate(zip(shards, table)):
        expected = sum(c.length for c in chunks)
        if shard.shape[dim] != expected:
            raise ValueError(f"shards: rank {rank} holds {shard.shape[dim]} tokens, but cu_seqlens and layout "
                             f"{layout!r} give it {expected}")
    order = sorted((c.seq, c.start, rank, c.offset, c.length) for rank, chunks in enumerate(table) for c in chunks)
    return _cat([shards[rank].narrow(dim, offset, length) for _, _, rank, offset, length in order], shards[0], dim)


class _Chunk(NamedTuple):
    """A run of consecutive tokens of one sequence held by one rank."""

    seq: int  # which sequence of the batch (always 0 for ring_attention)
    start: int  # its first position in that sequence
    length: int
    offset: int  # its first token on the owning rank's local token axis


def _plan(seq_lens: list[int], world_size: int, layout: str) -> list[list[_Chunk]]:
    """Every rank's non-empty chunks, in local order, for packed sequences of ``seq_lens`` tokens."""
    table = []
    for rank in range(world_size):
        chunks, offset = [], 0
        for seq, length in enumerate(seq_lens):
            for r in shard_ranges(length, rank, world_size, layout):
                if len(r):
                    chunks.append(_Chunk(seq, r.start, len(r), offset))
                    offset += len(r)
        table.append(chunks)
    return table


# ---- which part of a key block a query block sees ------------------------------------------------------------

class _Block(NamedTuple):
    """The visible part of a (query chunk, key chunk) pair: rows ``q0:q1`` and keys ``k0:k1`` (chunk-local), which
    ``attention`` computes exactly with ``causal`` and ``window`` (bottom-right aligned on that sub-block)."""

    q0: int
    q1: int
    k0: int
    k1: int
    causal: bool
    window: tuple[int | None, int | None] | None

    @property
    def full(self) -> bool:
        return not self.causal and self.window is None


def _block(q_start, q_len, k_start, k_len, left, right) -> _Block | None:
    """Queries at positions ``q_start ..`` (``q_len`` of them) against keys at ``k_start ..`` of one sequence,
    where query ``p`` sees key ``g`` iff ``p - left <= g <= p + right`` (-1: unbounded; causal is ``right == 0``).
    Rows that see no key of the chunk and keys no row sees are cut off, so every row left sees at least one key
    (no lse of -inf, hence no NaN in a backward) and the rest is one ``attention`` call. None if nothing is seen."""
    shift = q_start - k_start
    lo = -math.inf if left == UNBOUNDED else shift - left  # local key j - local query i >= lo
    hi = math.inf if right == UNBOUNDED else shift + right  # and <= hi
    q0, q1 = max(0, -hi), min(q_len, k_len - lo)
    if q0 >= q1:
        return None
    k0, k1 = max(0, q0 + lo), min(k_len, q1 + hi)
    q0, q1, k0, k1 = int(q0), int(q1), int(k0), int(k1)
    # In attention's frame on the sub-block (bottom-right aligned, diag = (k1 - k0) - (q1 - q0)), row i' sees keys
    # diag - wl .. diag + wr; a side that never binds is left unbounded, which picks the plainer kernel.
    wl = None if lo == -math.inf or k1 - q1 - lo >= k1 - k0 - 1 else int(k1 - q1 - lo)
    wr = None if hi == math.inf or hi - k1 + q1 >= q1 - q0 - 1 else int(hi - k1 + q1)
    if wl is None and wr == 0:
        return _Block(q0, q1, k0, k1, True, None)
    return _Block(q0, q1, k0, k1, False, None if wl is None and wr is None else (wl, wr))


def _pieces(mine: list[_Chunk], theirs: list[_Chunk], left, right) -> list[_Block]:
    """The attention calls of this rank's queries against one rank's K/V block, in local/buffer coordinates.
    Fully visible rectangles that share their rows (or their keys) and touch are joined into one call: with
    zigzag and causal, a step's two full chunk pairs become one call of twice the size."""
    pieces = []
    for m in mine:
        for t in theirs:
            b = _block(m.start, m.length, t.start, t.length, left, right) if m.seq == t.seq else None
            if b is not None:
                pieces.append(b._replace(q0=b.q0 + m.offset, q1=b.q1 + m.offset, k0=b.k0 + t.offset,
                                         k1=b.k1 + t.offset))
    full = [p for p in pieces if p.full]
    return _join(_join(full, "k"), "q") + [p for p in pieces if not p.full]


def _join(full: list[_Block], along: str) -> list[_Block]:
    """Join fully visible pieces that share their rows and touch along the keys (``along="k"``), or share their
    keys and touch along the rows (``"q"``): a union of fully visible rectangles is fully visible."""
    lo, hi = ("k0", "k1") if along == "k" else ("q0", "q1")
    shared = ("q0", "q1") if along == "k" else ("k0", "k1")

    def order(p):
        return (*(getattr(p, f) for f in shared), getattr(p, lo))

    joined = []
    for p in sorted(full, key=order):
        a = joined[-1] if joined else None
        if a is not None and order(a)[:2] == order(p)[:2] and getattr(a, hi) == getattr(p, lo):
            joined[-1] = a._replace(**{hi: getattr(p, hi)})
        else:
            joined.append(p)
    return joined


# ---- the process group, and the exchange that makes every rank agree on the call -----------------------------

def choose_variant(world_size: int, heads_q: int, heads_kv: int) -> str:
    """``variant="auto"``'s rule: ``"allgather"`` when the gathered K/V is no larger than a rank's own q
    (``world_size * heads_kv <= heads_q``, with q/k head dims alike), else ``"ring"``."""
    return "allgather" if world_size * heads_kv <= heads_q else "ring"


def _group_of(group):
    """``(group, rank, world_size)``; raises if torch.distributed is not initialized or this rank is not a member."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group() first "
                           "(a world of one process works: world_size=1)")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return group, rank, dist.get_world_size(group)


def _backend_devices(backend: str) -> list[tuple[str, str]]:
    """``dist.get_backend(group)`` as ``(device type, backend)`` pairs: ``"nccl"`` or ``"cpu:gloo,cuda:nccl"``."""
    pairs = []
    for entry in str(backend).lower().split(","):
        device, _, name = entry.rpartition(":")
        pairs.append((device or _BACKEND_DEVICES.get(name, ""), name))
    return pairs


def check_backend_device(backend: str, device: torch.device) -> None:
    """Raise a ValueError naming ``group`` if a group of collective backend ``backend`` cannot carry tensors on
    ``device`` (gloo carries CPU tensors, NCCL CUDA tensors). Backends of unknown reach are let through."""
    pairs = _backend_devices(backend)
    if any(d == device.type or d == "" for d, _ in pairs):
        return
    carried = ", ".join(f"{name}: {d} tensors" for d, name in pairs)
    raise ValueError(f"group: its backend {backend!r} cannot carry {device.type} tensors ({carried}); create the "
                     f"group with a backend for {device.type} tensors (gloo for cpu, nccl for cuda) or move the "
                     "tensors")


def _exchange_device(group) -> torch.device:
    """Where this group's small exchange tensors live: the CPU when the backend carries CPU tensors."""
    pairs = _backend_devices(dist.get_backend(group))
    devices = [d for d, _ in pairs if d]
    if not devices or "cpu" in devices:
        return torch.device("cpu")
    module = getattr(torch, devices[0])
    return torch.device(devices[0], module.current_device())


def _agree(group, world_size, fields: list[int], error: Exception | None) -> list[list[int]]:
    """Every rank's ``fields`` (ints), exchanged after each rank validated its own arguments: a rank whose
    arguments were refused raises its own error and every other rank a ValueError naming it, so no rank is left
    waiting in a later collective."""
    row = torch.zeros(_META_FIELDS + 1, dtype=torch.int64)
    row[0] = error is not None
    if error is None:
        row[1:1 + len(fields)] = torch.tensor(fields, dtype=torch.int64)
    row = row.to(_exchange_device(group))
    rows = [torch.empty_like(row) for _ in range(world_size)]
    dist.all_gather(rows, row, group=group)
    rows = torch.stack(rows).tolist()
    if error is not None:
        raise error
    refused = [r for r, values in enumerate(rows) if values[0]]
    if refused:
        raise ValueError(f"the arguments of rank(s) {refused} of the group were refused (see the error on those "
                         "ranks); this rank's were valid")
    return [values[1:1 + len(fields)] for values in rows]


def _check_same(rows, names, skip=()):
    """Every rank must pass the same values, except those named in ``skip``."""
    for i, name in enumerate(names):
        values = [row[i] for row in rows]
        if name not in skip and len(set(values)) > 1:
            raise ValueError(f"the ranks disagree on {name}: {values} (rank by rank); every rank must make the "
                             "same call on its own shard")


def _check_call(q, k, v, group, causal, scale, window, softcap, return_lse, layout, variant, backend, layout_desc):
    """Local validation of a ring call: ``(scale, (left, right), softcap)`` normalized, or raises."""
    api._check_tensors(q, k, v, layout=layout_desc)
    seq_dim = 2 if q.dim() == 4 else 0
    if q.shape[seq_dim] != k.shape[seq_dim]:
        raise ValueError(f"q and k must hold the same local tokens (self-attention over one sharded sequence), got "
                         f"{q.shape[seq_dim]} and {k.shape[seq_dim]} along the sequence axis")
    scale = api._check_scale(q.shape[-1], scale)
    left, right = api._check_window(window, causal)
    softcap = api._check_softcap(softcap)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    _check_layout(layout)
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (each block's lse is needed for the merge), got "
                         f"{backend!r}")
    check_backend_device(dist.get_backend(group), q.device)
    return scale, (left, right), softcap


class _Setup(NamedTuple):
    """What every rank agreed on: the group, the chunk table, and the options of each block's attention call."""

    group: object
    rank: int
    world_size: int
    table: list[list[_Chunk]]  # every rank's chunks
    lengths: list[int]  # every rank's local token count
    seq_lens: list[int]  # the (unsharded) sequences' lengths
    left: int
    right: int
    options: dict  # scale, softcap, backend: passed to every attention call


def _setup(q, k, v, group, causal, scale, window, softcap, return_lse, layout, variant, backend, cu_seqlens=None):
    """Validate a ring call on every rank and agree on it; ``cu_seqlens``: the packed sequences of a varlen call
    (the same on every rank), None for one sequence whose length is the sum of the ranks' shares."""
    group, rank, world_size = _group_of(group)
    error, fields, seq_lens = None, [], None
    varlen = cu_seqlens is not None
    try:
        if varlen:
            seq_lens = _seq_lens_of(cu_seqlens)
        scale, (left, right), softcap = _check_call(
            q, k, v, group, causal, scale, window, softcap, return_lse, layout, variant, backend,
            "[tokens, heads, head_dim]" if varlen else "[batch, heads, seq, head_dim]")
        b, tokens = (1, q.shape[0]) if varlen else (q.shape[0], q.shape[2])
        fingerprint = [len(seq_lens), sum(i * n for i, n in enumerate(seq_lens, 1)) % 2**61] if varlen else [0, 0]
        fields = [tokens, b, q.shape[-2 if varlen else 1], k.shape[-2 if varlen else 1], q.shape[-1], v.shape[-1],
                  api.FLOAT_DTYPES.index(q.dtype), LAYOUTS.index(layout), VARIANTS.index(variant), left, right,
                  *fingerprint]
    except (TypeError, ValueError) as exc:
        error = exc
    rows = _agree(group, world_size, fields, error)
    names = ("local tokens", "batch", "q heads", "k/v heads", "q/k head_dim", "v head_dim", "dtype", "layout",
             "variant", "window left", "window right", "the number of sequences", "the sequence lengths")
    _check_same(rows, names, skip=("local tokens",))
    lengths = [row[0] for row in rows]
    if seq_lens is None:
        seq_lens = [sum(lengths)]
    table = _plan(seq_lens, world_size, layout)
    expected = [sum(c.length for c in chunks) for chunks in table]
    if lengths != expected:
        what = "cu_seqlens" if varlen else f"{sum(lengths)} tokens"
        raise ValueError(f"the ranks hold {lengths} tokens, but layout {layout!r} over {what} gives {expected}: "
                         f"shard with tileattn.distributed.{'shard_varlen' if varlen else 'shard_sequence'}")
    return _Setup(group, rank, world_size, table, lengths, seq_lens, left, right,
                  dict(scale=scale, softcap=softcap, backend=backend))


# ---- the ring ------------------------------------------------------------------------------------------------

class _Transfer(NamedTuple):
    """Posted point-to-point transfers, holding their tensors until ``wait()`` completes them."""

    works: list
    tensors: list

    def wait(self):
        for work in self.works:
            work.wait()


_NOTHING = _Transfer([], [])


class _Ring:
    """Point-to-point transfers to the next rank of the group while receiving from the previous one."""

    def __init__(self, setup: _Setup):
        self.group = setup.group
        w = setup.world_size
        self.to_next = dist.get_global_rank(setup.group, (setup.rank + 1) % w)
        self.from_prev = dist.get_global_rank(setup.group, (setup.rank - 1) % w)

    def start(self, send: list[torch.Tensor], recv: list[torch.Tensor]) -> _Transfer:
        """Post the transfers; empty tensors are skipped, on both ends alike (every rank knows every size)."""
        ops = [dist.P2POp(dist.isend, t, self.to_next, self.group) for t in send if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self.from_prev, self.group) for t in recv if t.numel()]
        return _Transfer(dist.batch_isend_irecv(ops) if ops else [], [*send, *recv])


def _buffers(k, v, length, dtype=None):
    """Receive buffers for a block of ``length`` tokens shaped like ``[B, Hkv, S, D]`` k and ``[.., D_v]`` v."""
    b, hkv = k.shape[:2]
    return [torch.empty(b, hkv, length, t.shape[-1], dtype=dtype or t.dtype, device=t.device) for t in (k, v)]


def _attend(q, k, v, piece: _Block, options):
    """One block's ``(out, lse)``: q, k, v already cut to the piece's rows and keys."""
    return api.attention(q, k, v, causal=piece.causal, window=piece.window, return_lse=True, **options)


class _RingAttention(torch.autograd.Function):
    """The ring on ``[B, H, S, D]`` tensors (varlen calls pass ``[1, H, total, D]`` views): forward W steps, each
    computing this rank's queries against the K/V block it holds while the next block arrives; backward a second
    ring that recomputes each block and carries the K/V gradients with the blocks back to their rank."""

    @staticmethod
    def forward(ctx, q, k, v, setup: _Setup):
        ring, rank, w = _Ring(setup), setup.rank, setup.world_size
        acc = lse_dtype(q.dtype)
        out = torch.zeros(*q.shape[:3], v.shape[-1], dtype=acc, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
        k_blk, v_blk = k.contiguous(), v.contiguous()  # the wire takes dense tensors
        for step in range(w):
            source = (rank - step) % w
            incoming, transfer = None, _NOTHING
            if step + 1 < w:  # post the next block's transfer before computing on this one: it hides behind compute
                incoming = _buffers(k, v, setup.lengths[(rank - step - 1) % w])
                transfer = ring.start([k_blk, v_blk], incoming)
            for piece in _pieces(setup.table[rank], setup.table[source], setup.left, setup.right):
                rows, keys = slice(piece.q0, piece.q1), slice(piece.k0, piece.k1)
                blk_out, blk_lse = _attend(q[:, :, rows], k_blk[:, :, keys], v_blk[:, :, keys], piece, setup.options)
                out[:, :, rows], lse[:, :, rows] = api.merge_attention(out[:, :, rows], lse[:, :, rows], blk_out,
                                                                       blk_lse)
            transfer.wait()
            if incoming is not None:
                k_blk, v_blk = incoming
        ctx.setup = setup
        ctx.save_for_backward(q, k, v, out, lse)
        return out.to(q.dtype), lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        setup = ctx.setup
        ring, rank, w = _Ring(setup), setup.rank, setup.world_size
        acc = out.dtype
        grad_out, grad_lse = grad_out.to(acc), grad_lse.to(acc)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        k_blk, v_blk = k.contiguous(), v.contiguous()
        grads_in, grads_transfer = None, _NOTHING
        for step in range(w):
            source = (rank - step) % w
            incoming, transfer = None, _NOTHING
            if step + 1 < w:
                incoming = _buffers(k, v, setup.lengths[(rank - step - 1) % w])
                transfer = ring.start([k_blk, v_blk], incoming)
            dk_blk = torch.zeros(k_blk.shape, dtype=acc, device=k.device)
            dv_blk = torch.zeros(v_blk.shape, dtype=acc, device=v.device)
            for piece in _pieces(setup.table[rank], setup.table[source], setup.left, setup.right):
                rows, keys = slice(piece.q0, piece.q1), slice(piece.k0, piece.k1)
                leaves = [t.detach().requires_grad_() for t in (q[:, :, rows], k_blk[:, :, keys], v_blk[:, :, keys])]
                with torch.enable_grad():  # recompute the block, then its backward with the merge's chain rule
                    blk_out, blk_lse = _attend(*leaves, piece, setup.options)
                # The merged out is sum_b exp(lse_b - lse) * out_b: block b gets dout scaled by that weight, and its
                # lse the weight times (<dout, out_b - out> + dlse). Every row of a piece sees a key: lse_b is finite.
                weight = torch.exp(blk_lse.to(acc) - lse[:, :, rows])
                g_out = grad_out[:, :, rows]
                g_lse = weight * ((g_out * (blk_out.to(acc) - out[:, :, rows])).sum(-1) + grad_lse[:, :, rows])
                grads = ((weight[..., None] * g_out).to(blk_out.dtype), g_lse.to(blk_lse.dtype))
                gq, gk, gv = torch.autograd.grad((blk_out, blk_lse), leaves, grads)
                dq[:, :, rows] += gq
                dk_blk[:, :, keys] += gk
                dv_blk[:, :, keys] += gv
            if w > 1:
                # The gradient of this block from the ranks before arrived while this step computed: add it and pass
                # the sum on; the last step passes it to the block's own rank, and receives this rank's own.
                grads_transfer.wait()
                if grads_in is not None:
                    dk_blk += grads_in[0]
                    dv_blk += grads_in[1]
                grads_in = _buffers(k, v, setup.lengths[(rank - step - 1) % w], dtype=acc)
                grads_transfer = ring.start([dk_blk, dv_blk], grads_in)
            else:
                grads_in = [dk_blk, dv_blk]
            transfer.wait()
            if incoming is not None:
                k_blk, v_blk = incoming
        grads_transfer.wait()
        dk, dv = grads_in
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


# ---- the all-gather variant ----------------------------------------------------------------------------------

class _AllGather(torch.autograd.Function):
    """All-gather of one equally shaped tensor per rank; backward: each rank's gradient summed over the ranks (a
    reduce-scatter), in fp32."""

    @staticmethod
    def forward(ctx, x, group, rank, world_size):
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.rank = group, rank
        return tuple(parts)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        dtype = grads[0].dtype
        grads = [g.to(lse_dtype(dtype)).contiguous() for g in grads]
        if grads[0].device.type == "cuda":
            mine = torch.empty_like(grads[0])
            dist.reduce_scatter(mine, grads, group=ctx.group)
        else:  # gloo's reduce-scatter is recent: sum everything everywhere instead (CPU groups are small)
            total = torch.stack(grads)
            dist.all_reduce(total, group=ctx.group)
            mine = total[ctx.rank]
        return mine.to(dtype), None, None, None


def _allgather_attention(q, k, v, setup: _Setup):
    """Every rank's K/V gathered (padded to the longest share: collectives take equal shapes) and put back in
    sequence order, then one ``attention`` call per local chunk over the keys it sees; differentiable."""
    rank, w = setup.rank, setup.world_size
    kv = torch.cat([k, v], dim=-1)  # one collective for both
    kv = F.pad(kv, (0, 0, 0, max(setup.lengths) - kv.shape[2]))
    parts = _AllGather.apply(kv, setup.group, rank, w)
    order = sorted((c.seq, c.start, r, c.offset, c.length) for r, chunks in enumerate(setup.table) for c in chunks)
    whole = _cat([parts[r][:, :, offset:offset + length] for _, _, r, offset, length in order], kv, 2)
    k_all, v_all = whole.split([k.shape[-1], v.shape[-1]], dim=-1)
    seq_starts = [0]
    for length in setup.seq_lens:
        seq_starts.append(seq_starts[-1] + length)
    outs, lses = [], []
    for c in setup.table[rank]:
        # Against its whole sequence no row of a chunk is cut off (every query sees its own key): one call per chunk.
        piece = _block(c.start, c.length, 0, setup.seq_lens[c.seq], setup.left, setup.right)
        keys = slice(seq_starts[c.seq] + piece.k0, seq_starts[c.seq] + piece.k1)
        chunk_out, chunk_lse = _attend(q[:, :, c.offset:c.offset + c.length], k_all[:, :, keys], v_all[:, :, keys],
                                       piece, setup.options)
        outs.append(chunk_out)
        lses.append(chunk_lse)
    if not outs:  # this rank holds no token
        return (q.new_zeros(*q.shape[:3], v.shape[-1]),
                torch.empty(q.shape[:3], dtype=lse_dtype(q.dtype), device=q.device))
    return _cat(outs, q, 2), _cat(lses, q, 2)


# ---- the public functions ------------------------------------------------------------------------------------

def _run(q, k, v, setup: _Setup, variant):
    if variant == "auto":  # the same on every rank: the head counts were checked equal
        variant = choose_variant(setup.world_size, q.shape[1], k.shape[1])
    if variant == "allgather":
        return _allgather_attention(q, k, v, setup)
    return _RingAttention.apply(q, k, v, setup)


def ring_attention(q, k, v, *, group=None, causal=False, scale=None, window=None, softcap=None, return_lse=False,
                   layout="zigzag", variant="auto", backend="auto"):
    """Exact attention over a sequence sharded across the ranks of ``group``: this rank's rows of
    ``tileattn.attention`` over the whole sequence.

    Args:
        q: ``[B, Hq, S_local, D]``, k: ``[B, Hkv, S_local, D]``, v: ``[B, Hkv, S_local, D_v]``: this rank's share of
            the sequence in ``layout`` (:func:`shard_sequence`; uneven lengths are fine when sharded by that rule).
            Any strides; dtypes and head dims as in :func:`tileattn.attention`, the same on every rank.
        group: the process group (default: the world). Its backend must carry q's device (gloo: CPU, NCCL: CUDA).
        causal, scale, window, softcap: as in :func:`tileattn.attention`, over global positions (the whole
            sequence has Sq == Sk, so bottom-right and top-left alignment agree).
        return_lse: also return this rank's rows of the lse, ``[B, Hq, S_local]``, fp32 (fp64 for fp64 inputs).
        layout: ``"zigzag"`` (default; balances causal work) or ``"contiguous"``.
        variant: ``"ring"``, ``"allgather"`` or ``"auto"`` (:func:`choose_variant`).
        backend: the backend of each block's ``attention`` call: ``"auto"``, ``"triton"``, ``"torch"``, ``"naive"``.

    Returns:
        ``out [B, Hq, S_local, D_v]`` in q's dtype, or ``(out, lse)``. Differentiable in q, k and v.
    """
    setup = _setup(q, k, v, group, causal, scale, window, softcap, return_lse, layout, variant, backend)
    out, lse = _run(q, k, v, setup, variant)
    return (out, lse) if return_lse else out


def ring_attention_varlen(q, k, v, cu_seqlens, *, group=None, causal=False, scale=None, window=None, softcap=None,
                          return_lse=False, layout="zigzag", variant="auto", backend="auto"):
    """:func:`ring_attention` over packed variable-length sequences, each sharded across the ranks.

    Args:
        q: ``[tokens_local, Hq, D]``; k: ``[tokens_local, Hkv, D]``; v: ``[tokens_local, Hkv, D_v]``: this rank's share
            (:func:`shard_varlen`: each sequence sharded in ``layout``, the parts packed in sequence order).
        cu_seqlens: the whole batch's offsets, ``[batch + 1]`` (an int tensor on any device, read on the host, or a
            list of ints), the same on every rank: sequence ``b`` is tokens ``cu_seqlens[b] .. cu_seqlens[b + 1]``
            of the unsharded packed tensor.
        Other arguments as in :func:`ring_attention`; causal is per sequence.

    Returns:
        ``out [tokens_local, Hq, D_v]`` or ``(out, lse)`` with lse ``[Hq, tokens_local]`` (as
        :func:`tileattn.attention_varlen` lays it out). Differentiable in q, k and v.
    """
    setup = _setup(q, k, v, group, causal, scale, window, softcap, return_lse, layout, variant, backend,
                   cu_seqlens=cu_seqlens)
    out, lse = _run(*(t.transpose(0, 1)[None] for t in (q, k, v)), setup, variant)  # [1, H, tokens, D] views
    out = out[0].transpose(0, 1).contiguous()
    return (out, lse[0]) if return_lse else out


def sharded_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, group=None, k_new=None, v_new=None,
                                   block_table=None, causal=True, scale=None, softcap=None, return_lse=False,
                                   backend="auto"):
    """Decode (or chunked prefill) over a KV cache sharded by sequence position: each rank attends its part of the
    cache (:func:`tileattn.attention_with_kvcache`), then the ranks' results are merged exactly by their lse (one
    all-gather of ``out`` and ``lse``). Inference only: the result carries no gradient.

    Every sequence's tokens are held in rank order (rank 0 the oldest), ``cache_seqlens`` counting this rank's;
    the last rank of the group holds the newest, where ``k_new``/``v_new`` (given on that rank only, None on the
    others) are appended. q is the same on every rank: the Sq newest tokens. With ``causal`` (bottom-right aligned
    over the whole sequence) every other rank's keys precede all queries, so they are attended in full; with
    ``Sq > 1`` the last rank must hold at least Sq tokens of each sequence (the queries' own, after the append).
    No ``window``: a sliding-window layer keeps only its last ``left`` tokens, which belong on one device.

    Args and returns as in :func:`tileattn.attention_with_kvcache` (``out [B, Hq, Sq, D_v]``, lse fp32
    ``[B, Hq, Sq]``); ``group`` as in :func:`ring_attention`.
    """
    group, rank, world_size = _group_of(group)
    last = rank == world_size - 1
    error, fields = None, []
    try:
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
        api._check_kvcache_call(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, causal, scale, None,
                                softcap, return_lse, 0, backend)
        check_backend_device(dist.get_backend(group), q.device)
        if k_new is not None and not last:
            raise ValueError(f"k_new/v_new: only the last rank of the group (rank {world_size - 1}, which holds the "
                             f"newest positions) appends tokens; rank {rank} must pass None")
        new_tokens = q.shape[2] if k_new is not None else 0
        if api._may_read_device_values():
            api._check_cache_bounds(k_cache, cache_seqlens, new_tokens, block_table)
            if last and causal and q.shape[2] > 1 and int(cache_seqlens.min()) + new_tokens < q.shape[2]:
                raise ValueError(f"cache_seqlens: with causal and Sq = {q.shape[2]} queries the last rank must hold "
                                 f"at least Sq tokens of every sequence (the queries' own), got "
                                 f"{(cache_seqlens + new_tokens).tolist()}")
        fields = [q.shape[0], q.shape[1], q.shape[2], k_cache.shape[1], q.shape[-1], v_cache.shape[-1],
                  api.FLOAT_DTYPES.index(q.dtype), int(causal)]
    except (TypeError, ValueError) as exc:
        error = exc
    rows = _agree(group, world_size, fields, error)
    _check_same(rows, ("batch", "q heads", "query tokens", "k/v heads", "q/k head_dim", "v head_dim", "dtype",
                       "causal"))
    out, lse = api.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=k_new, v_new=v_new,
                                          block_table=block_table, causal=causal and last, scale=scale,
                                          softcap=softcap, return_lse=True, check_bounds=False, backend=backend)
    acc = lse_dtype(q.dtype)
    mine = torch.cat([out.to(acc), lse.to(acc)[..., None]], dim=-1).contiguous()  # one collective for both
    parts = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(parts, mine.detach(), group=group)
    parts = torch.stack(parts)  # [W, B, Hq, Sq, D_v + 1]
    lses = parts[..., -1]
    total = torch.logsumexp(lses, dim=0)
    seen = total != float("-inf")  # a row no rank's keys reach: out 0, lse -inf (exp(-inf - -inf) would be NaN)
    weights = torch.where(seen, torch.exp(lses - torch.where(seen, total, 0)), 0)
    out = (weights[..., None] * parts[..., :-1]).sum(0).to(q.dtype)
    return (out, total) if return_lse else out
