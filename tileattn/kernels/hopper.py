"""Prefill attention for Hopper (sm_90) in Gluon (Triton 3.6): TMA loads, warp-specialized wgmma consumers.

When it applies (:func:`hopper_unsupported_reason` says None): a CUDA device of capability 9.0, Triton 3.6 with
Gluon, fp16/bf16, ``D == D_v`` in {64, 128}, no mask / softcap / ALiBi / sinks, causal or no window, Sq and Sk both
at least :data:`MIN_SEQLEN` (shorter calls stay on the portable kernel, measured faster there: this kernel's pipeline
fill and epilogue are not hidden when a CTA visits few key tiles), and q, k, v and out views that TMA can address
(unit stride in D, every other stride and the base pointers 16-byte aligned). ``TILEATTN_HOPPER=0`` turns it off.
:func:`tileattn.kernels.prefill.prefill_plan` routes such calls here; callers see the same plan interface.

Shapes and semantics are the library's: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Sk, D]`` with any such strides (a
``[B, S, H, D]`` buffer seen through ``transpose(1, 2)`` included), GQA (query head h reads kv head
``h // (Hq // Hkv)``), causal bottom-right aligned (query i sees key j iff ``j <= i + Sk - Sq``), out
``[B, Hq, Sq, D]`` (a given view or a fresh one), lse fp32 ``[B, Hq, Sq]`` in natural log; a row that sees no key
gets output 0 and lse ``-inf``, as :func:`tileattn.kernels.common.finalize` gives them.

Design (benchmarks/hopper/attn_hopper_pp.py, versions 2 and 3, measured in benchmarks/NOTES.md). One CTA computes
``BLOCK_M = NUM_WG x 64`` query rows of one (batch, head), split over NUM_WG + 1 warp-specialized partitions:

* NUM_WG consumer partitions of one warpgroup (4 warps) each. Consumer w owns rows ``[start_m + 64 w, + 64)``: its
  Q tile, running max / sum and O accumulator (wgmma m64 tiles: S ``64 x BLOCK_N`` and O ``64 x D`` in registers,
  P the register A operand of P V). All consumers read the same K/V ring slots. Consumer 0 is the default partition
  (the kernel's ``num_warps`` = 4). 64 rows per warpgroup because a 128-row tile would need S 128 + O 128 + P 64 =
  320 registers a thread at D = 128, more than a consumer can get.
* One producer warp issues every TMA load (Q tiles, the K and V rings) and alone refills slots.
* Each consumer iteration j issues ``S_j = Q K_j^T`` before ``O += P_{j-1} V_{j-1}`` (both async), so the softmax of
  tile j runs while ``P_{j-1} V_{j-1}`` is on the tensor cores. With ``PINGPONG`` the consumers also take turns to
  issue (FA3's inter-warpgroup ping-pong): one's products run during another's softmax.
* Softmax in log2 units (scale x log2 e folded into one multiply, exp2), fp32 state; tiles above the causal diagonal
  are never loaded; only tiles that cut the diagonal or the end of K are masked elementwise.
* Rank-4 TMA descriptors over the ``[B, H, S, D]`` tensors themselves: reads past S are zero-filled and the O
  store is clipped at S, so no padding copy exists and no row of a neighbouring head is read or written.

:data:`CONFIGS` picks the variant per head dim: version 2 (2 consumers, no ping-pong) at 128, "pp3" (3 consumers,
ping-pong) at 64, the best of each in the measurements (H100, bf16, S = 8192: v2 634-673 TFLOP/s non-causal, 613
causal, cuDNN 671 / 600; pp3 513-527 / 459-463, cuDNN 483-493 / 434).

Synchronization (mbarriers; "parity" is mbarrier.wait's argument: it returns once the phase of that parity has
completed, and a fresh barrier is in phase 0, so waiting on parity 1 returns at once):

  barrier       count     arrivals                                       waits
  q_bars[w]     1 + tx    producer expect + the TMA bytes of Q rows of w  consumer w, once, parity 0
  k_ready[s]    1 + tx    producer expect + TMA bytes of K_t, t%ST == s   every consumer, tile t: (t // ST) & 1
  v_ready[s]    1 + tx    the same for V_t                                every consumer, tile t: (t // ST) & 1
  k_empty[s]    NUM_WG    each consumer once its S_t has completed        producer before loading tile t into slot s:
                                                                          ((t // ST) & 1) ^ 1 (the ring's first pass
                                                                          does not wait)
  v_empty[s]    NUM_WG    each consumer once its P_t V_t has completed;   producer, as for k_empty
                          the last tile is never released (never refilled)
  turn_bars[w]  1         consumer w-1 (mod NUM_WG) at the end of each    consumer w before its i-th issue turn:
  (PINGPONG)              of its issue turns                              parity (i & 1) ^ (w == 0)

Ring: tile t sits in slot t % ST in the (t // ST)-th use of that slot; the producer's wait for tile t needs tile
t - ST released by all NUM_WG consumers (one phase = NUM_WG arrivals). A ready barrier cannot run two phases ahead of
a consumer still waiting on it: tile t + ST's load waits for that consumer's own release of tile t.
Turns: every consumer makes n_tiles + 1 issue turns (S_0 | S_j and P_{j-1} V_{j-1} for j = 1 .. n-1 | P_{n-1} V_{n-1});
n_tiles is per CTA, so the same for all. The issue order is 0, 1, .., NUM_WG-1, 0, 1, ... strictly; turn_bars[w]
cannot run two phases ahead of consumer w, since consumer w-1's next arrive needs its next turn, which needs consumer
w's arrive at the end of the turn it waits for. Before each arrive that hands something over (a slot, the turn),
``gl.thread_barrier()`` (a 128-thread named barrier of the warpgroup) makes all 4 warps reach it, because
mbarrier.arrive is issued by one thread. No barrier spans two warpgroups.
"""

import functools
import os
from typing import NamedTuple

import torch
import triton

from .common import LN2, LOG2E, cdiv, output_like
from .launch import _current_device, _current_stream, _hooked, knobs

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    GLUON_MISSING = None
except Exception as error:  # noqa: BLE001  (Triton < 3.6, or a Gluon whose names moved: refuse, never fail to import)
    GLUON_MISSING = f"{type(error).__name__}: {error}"

    class _NoGluon:
        """Stands in for ``gluon`` and ``gl`` where Gluon cannot be imported: the definitions below still run (the
        decorator returns the function, annotations and module constants become plain values) and nothing is ever
        compiled, because :func:`hopper_unsupported_reason` refuses every call."""

        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def constexpr(value=None):
            return value

    gluon = gl = _NoGluon()

VERIFIED_TRITON = "3.6."  # the Gluon API (warp_specialize's form, TMA, the launcher's descriptor handling) read here
MIN_SEQLEN = 2048  # Sq and Sk below this stay on the portable kernel (benchmarks/NOTES.md, "Hopper v2 and v3")
WG_ROWS = 64  # query rows per consumer warpgroup: one wgmma m64 tile
BLOCK_N = 128  # keys per K/V tile
NUM_WARPS = 4  # of the default partition (consumer 0); the other partitions are workers
_WG_ROWS, _BLOCK_N = gl.constexpr(WG_ROWS), gl.constexpr(BLOCK_N)  # the same, for the kernels
_PRODUCER_REGS = gl.constexpr(24)
# Consumer indices as constexpr objects: a plain int in a partition's argument tuple does not flatten to IR.
_CONSUMER0, _CONSUMER1, _CONSUMER2 = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2)


class HopperConfig(NamedTuple):
    """One variant of the kernel. Registers: the kernel's ``maxnreg`` x its threads is shared out by setmaxnreg:
    each worker consumer gets ``consumer_regs``, the producer 24, consumer 0 (the default partition) the rest."""

    consumers: int  # consumer warpgroups per CTA (NUM_WG): BLOCK_M = 64 x consumers
    pingpong: bool  # consumers take turns to issue their wgmmas (version 3)
    stages: int  # K/V ring depth
    maxnreg: int
    consumer_regs: int


# By head dim. Shared memory = consumers x 64 x D (Q, reused for O) + stages x 2 x BLOCK_N x D (K, V), 2-byte elements.
# To run version 2 at head dim 64 instead of pp3: 64: HopperConfig(2, False, 4, 168, 240)  (144 KB).
CONFIGS = {
    # version 2: 4 + 4 + 1 (allocated as 4) warps = 384 threads x 168 = 64512 registers: consumer 1 240, producer 24,
    # consumer 0 240; 32 KB + 3 x 64 KB = 224 KB of the 227 KB.
    128: HopperConfig(consumers=2, pingpong=False, stages=3, maxnreg=168, consumer_regs=240),
    # pp3: 16 warps x 32 x 128 = 65536 registers: consumers 1, 2 160 each, producer 24, consumer 0 168;
    # 24 KB + 4 x 32 KB = 152 KB.
    64: HopperConfig(consumers=3, pingpong=True, stages=4, maxnreg=128, consumer_regs=160),
}


# ----------------------------------------------------------------------------------------------------------------
# device code
# ----------------------------------------------------------------------------------------------------------------
@gluon.jit
def _tile2d(buf, ROWS: gl.constexpr, D: gl.constexpr):
    """A ``[1, 1, ROWS, D]`` TMA tile in shared memory seen as the ``[ROWS, D]`` operand wgmma takes (same bytes, same
    swizzle)."""
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=buf.type.layout.swizzle_byte_width,
                                                element_bitwidth=buf.type.layout.element_bitwidth, rank=2)
    return buf._reinterpret(buf.dtype, [ROWS, D], layout)


@gluon.jit
def _wait_tile(bufs, bars, tile):
    """The ring slot of ``tile`` once its TMA load has landed, as a ``[ROWS, D]`` wgmma operand."""
    STAGES: gl.constexpr = bufs.type.shape[0]
    slot = tile % STAGES
    mbarrier.wait(bars.index(slot), (tile // STAGES) & 1)
    return _tile2d(bufs.index(slot), bufs.type.shape[3], bufs.type.shape[4])


@gluon.jit
def _release(bars, tile):
    """This consumer is done with ``tile``'s ring slot (all 4 warps past the wgmma wait that covers it)."""
    STAGES: gl.constexpr = bars.type.shape[0]
    gl.thread_barrier()
    mbarrier.arrive(bars.index(tile % STAGES))


@gluon.jit
def _turn_begin(turn_bars, turn, W: gl.constexpr, PINGPONG: gl.constexpr):
    """Wait until consumer W may issue its wgmmas (its ``turn``-th issue turn, counted from 0)."""
    if PINGPONG:
        FIRST: gl.constexpr = 1 if W == 0 else 0
        mbarrier.wait(turn_bars.index(W), (turn & 1) ^ FIRST)


@gluon.jit
def _turn_end(turn_bars, W: gl.constexpr, PINGPONG: gl.constexpr):
    """Hand the issue turn to the next consumer once all 4 warps of W have issued."""
    if PINGPONG:
        NUM_WG: gl.constexpr = turn_bars.type.shape[0]
        gl.thread_barrier()
        mbarrier.arrive(turn_bars.index((W + 1) % NUM_WG))


@gluon.jit
def _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """``(n_tiles, full_end, diag)``: the CTA visits key tiles ``[0, n_tiles)`` (at least one, so that a block of rows
    that see no key still runs through the epilogue and writes its zeros); tiles starting at or past ``full_end`` need
    elementwise masking (the causal diagonal, the ragged end of K)."""
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        row_hi = gl.minimum(start_m + BLOCK_M, seqlen_q) - 1
        hi = gl.minimum(gl.maximum(row_hi + diag + 1, 0), seqlen_k)
        full = gl.minimum(gl.maximum(start_m + diag + 1, 0), seqlen_k)
    else:
        hi = seqlen_k
        full = seqlen_k
    n_tiles = gl.maximum(gl.cdiv(hi, _BLOCK_N), 1)
    full_end = (full // _BLOCK_N) * _BLOCK_N
    return n_tiles, full_end, diag


@gluon.jit
def _softmax_tile(s, m_i, l_i, start_n, full_end, rows, seqlen_k, diag, qk_scale, CAUSAL: gl.constexpr):
    """Fold the raw score tile ``s = Q K^T`` (fp32 ``[64, BLOCK_N]``) into ``(m_i, l_i)`` (log2 units). Returns
    ``(p, alpha, m, l)``: p unnormalized, alpha the rescale of the output so far (common.online_softmax_step's rule)."""
    if start_n >= full_end:
        cols = start_n + gl.arange(0, _BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
        keep = gl.expand_dims(cols < seqlen_k, 0)
        if CAUSAL:
            keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + diag, 1))
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if CAUSAL:  # a row may have seen no key yet (Sq > Sk): use 0 as its max so that exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, off_b, off_h, off_hk, start_m, n_tiles):
    """The TMA warp: each consumer's Q rows, then K and V tile by tile as ring slots free up."""
    q_bars, k_ready, v_ready, k_empty, v_empty, turn_bars = bars
    NUM_WG: gl.constexpr = q_bufs.type.shape[0]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    for w in gl.static_range(NUM_WG):
        mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m + w * _WG_ROWS, 0], q_bars.index(w),
                                        q_bufs.index(w))
    for t in range(n_tiles):
        slot = t % STAGES
        phase = (t // STAGES) & 1
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [off_b, off_hk, t * _BLOCK_N, 0], k_ready.index(slot),
                                        k_bufs.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [off_b, off_hk, t * _BLOCK_N, 0], v_ready.index(slot),
                                        v_bufs.index(slot))


@gluon.jit
def _attend_tile(j, q, p_op, acc, m_i, l_i, k_bufs, v_bufs, bars, rows, full_end, seqlen_k, diag, qk_scale,
                 W: gl.constexpr, CAUSAL: gl.constexpr, PINGPONG: gl.constexpr):
    """Consumer W's iteration j (issue turn j): issue ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}``, fold S_j into the
    softmax while the P V product runs, then rescale O. Returns the new ``(p_op, acc, m_i, l_i)``; p_op is P_j as the
    register A operand of the next P V."""
    q_bars, k_ready, v_ready, k_empty, v_empty, turn_bars = bars
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, _BLOCK_N, 16])
    k = _wait_tile(k_bufs, k_ready, j)
    v = _wait_tile(v_bufs, v_ready, j - 1)
    _turn_begin(turn_bars, j, W, PINGPONG)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), gl.zeros([_WG_ROWS, _BLOCK_N], gl.float32, s_layout), use_acc=False,
                          is_async=True)
    o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    _turn_end(turn_bars, W, PINGPONG)
    s, _, _ = warpgroup_mma_wait(1, deps=(s_tok, q, k))  # S_j only: groups retire in issue order
    _release(k_empty, j)
    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, j * _BLOCK_N, full_end, rows, seqlen_k, diag, qk_scale, CAUSAL)
    acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))
    _release(v_empty, j - 1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout)), 1)
    return gl.convert_layout(p.to(q.dtype), p_op.type.layout), acc, m_i, l_i


@gluon.jit
def _consumer(q_bufs, k_bufs, v_bufs, bars, o_desc, Lse, pid_bh, off_b, off_h, start_m, n_tiles, full_end, diag,
              seqlen_q, seqlen_k, qk_scale, W: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr,
              PINGPONG: gl.constexpr):
    """Consumer warpgroup W: query rows ``[start_m + 64 W, + 64)`` over the CTA's key tiles, then its epilogue."""
    gl.static_assert(gl.num_warps() == 4, "a consumer partition is one warpgroup")
    q_bars, k_ready, v_ready, k_empty, v_empty, turn_bars = bars
    HEAD_DIM: gl.constexpr = q_bufs.type.shape[4]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, _BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_layout: gl.constexpr = gl.SliceLayout(1, o_layout)

    row0 = start_m + W * _WG_ROWS
    rows = row0 + gl.arange(0, _WG_ROWS, layout=srow_layout)
    q_smem = q_bufs.index(W)
    q = _tile2d(q_smem, _WG_ROWS, HEAD_DIM)
    m_i = gl.full([_WG_ROWS], float("-inf"), gl.float32, srow_layout)
    l_i = gl.zeros([_WG_ROWS], gl.float32, srow_layout)
    acc = gl.zeros([_WG_ROWS, HEAD_DIM], gl.float32, o_layout)

    # Turn 0: S_0 alone (no P V to overlap with yet).
    mbarrier.wait(q_bars.index(W), 0)
    k = _wait_tile(k_bufs, k_ready, 0)
    _turn_begin(turn_bars, 0, W, PINGPONG)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), gl.zeros([_WG_ROWS, _BLOCK_N], gl.float32, s_layout), use_acc=False,
                          is_async=True)
    _turn_end(turn_bars, W, PINGPONG)
    s, _, _ = warpgroup_mma_wait(0, deps=(s_tok, q, k))
    _release(k_empty, 0)
    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, 0, full_end, rows, seqlen_k, diag, qk_scale, CAUSAL)
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)

    for j in range(1, n_tiles):  # turns 1 .. n_tiles - 1: S_j and P_{j-1} V_{j-1}
        p_op, acc, m_i, l_i = _attend_tile(j, q, p_op, acc, m_i, l_i, k_bufs, v_bufs, bars, rows, full_end, seqlen_k,
                                           diag, qk_scale, W, CAUSAL, PINGPONG)

    # Turn n_tiles: the last P V (its V slot is never refilled: no release).
    v = _wait_tile(v_bufs, v_ready, n_tiles - 1)
    _turn_begin(turn_bars, n_tiles, W, PINGPONG)
    o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    _turn_end(turn_bars, W, PINGPONG)
    acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))

    # Epilogue (common.finalize's rule): rows that saw no key give 0 and lse -inf.
    l_o = gl.convert_layout(l_i, orow_layout)
    empty = l_o == 0.0
    l_safe = gl.where(empty, 1.0, l_o)
    out = acc * gl.expand_dims(1.0 / l_safe, 1)
    if RETURN_LSE:  # lse is a fresh contiguous [B, Hq, Sq]: row (b, h, i) at (b * Hq + h) * Sq + i, in 64 bits
        lse = gl.where(empty, float("-inf"), (gl.convert_layout(m_i, orow_layout) + gl.log2(l_safe)) * LN2)
        out_rows = row0 + gl.arange(0, _WG_ROWS, layout=orow_layout)
        gl.store(Lse + pid_bh.to(gl.int64) * seqlen_q + out_rows, lse, mask=out_rows < seqlen_q)
    # Q's buffer is free (every wgmma reading it has completed): stage O there for the TMA store, clipped at Sq.
    gl.thread_barrier()
    q.store(out.to(o_desc.dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(o_desc, [off_b, off_h, row0, 0], q_smem)
    tma.store_wait(0)


# Problem sizes are not specialized (no "== 1" / "% 16" variants): one compile per dtype, head dim, causal and lse.
# Specializing them once made the prototype's correctness run compile 56 variants and look like a hang.
@gluon.jit(do_not_specialize=["seqlen_q", "seqlen_k", "num_heads", "group_size"])
def _hopper_attention_kernel(q_desc, k_desc, v_desc, o_desc, Lse, seqlen_q, seqlen_k, num_heads, group_size, qk_scale,
                             STAGES: gl.constexpr, NUM_WG: gl.constexpr, PINGPONG: gl.constexpr,
                             CONSUMER_REGS: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr):
    gl.static_assert(gl.num_warps() == 4, "launch with num_warps=4: the default partition is consumer 0")
    dtype: gl.constexpr = q_desc.dtype
    BLOCK_M: gl.constexpr = NUM_WG * _WG_ROWS
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (causal) query blocks first
    pid_bh = gl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // group_size  # GQA: the query heads of a group read one K/V head
    start_m = pid_m * BLOCK_M
    n_tiles, full_end, diag = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, CAUSAL)

    q_bufs = gl.allocate_shared_memory(dtype, [NUM_WG] + q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(NUM_WG):
        mbarrier.init(q_bars.index(w), count=1)
        mbarrier.init(turn_bars.index(w), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_WG)
        mbarrier.init(v_empty.index(i), count=NUM_WG)
    fence_async_shared()  # the inits visible to the async proxy (TMA) before any partition starts
    bars = (q_bars, k_ready, v_ready, k_empty, v_empty, turn_bars)

    # (The partitions' argument tuples are spelled out: warp_specialize flattens tuple literals that mix runtime values
    # and constexpr objects, not tuples built by concatenation or held in variables.)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, Lse, pid_bh, off_b, off_h, start_m, n_tiles, full_end,
                         diag, seqlen_q, seqlen_k, qk_scale, _CONSUMER0, CAUSAL, RETURN_LSE, PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, Lse, pid_bh, off_b, off_h, start_m, n_tiles, full_end,
                         diag, seqlen_q, seqlen_k, qk_scale, _CONSUMER1, CAUSAL, RETURN_LSE, PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, off_b, off_h, off_hk, start_m, n_tiles)),
        ], [4, 1], [CONSUMER_REGS, _PRODUCER_REGS])
    else:
        gl.static_assert(NUM_WG == 3, "NUM_WG in {2, 3}")
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, Lse, pid_bh, off_b, off_h, start_m, n_tiles, full_end,
                         diag, seqlen_q, seqlen_k, qk_scale, _CONSUMER0, CAUSAL, RETURN_LSE, PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, Lse, pid_bh, off_b, off_h, start_m, n_tiles, full_end,
                         diag, seqlen_q, seqlen_k, qk_scale, _CONSUMER1, CAUSAL, RETURN_LSE, PINGPONG)),
            (_consumer, (q_bufs, k_bufs, v_bufs, bars, o_desc, Lse, pid_bh, off_b, off_h, start_m, n_tiles, full_end,
                         diag, seqlen_q, seqlen_k, qk_scale, _CONSUMER2, CAUSAL, RETURN_LSE, PINGPONG)),
            (_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, bars, off_b, off_h, off_hk, start_m, n_tiles)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, _PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------------------
_TORCH_TO_GLUON = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _tma_strides_ok(t: torch.Tensor) -> bool:
    """Whether TMA can describe the view's strides: unit stride in D, every other stride of a dim longer than 1 a
    positive multiple of 16 bytes below 2^40 (a dim of length 1 is never stepped through: its stride is replaced, see
    :func:`_descriptor_strides`)."""
    if t.stride(-1) != 1:
        return False
    size = t.element_size()
    return all(n == 1 or (0 < s * size < 2**40 and s * size % 16 == 0) for n, s in zip(t.shape[:-1], t.stride()[:-1]))


def _descriptor_strides(t: torch.Tensor) -> list[int]:
    """The view's strides for its descriptor, those of length-1 dims replaced by the view's span rounded up to 16
    bytes (any legal value would do: their coordinate is always 0; torch may give such dims any stride)."""
    align = 16 // t.element_size()
    span = cdiv(1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())), align) * align
    return [span if n == 1 else s for n, s in zip(t.shape, t.stride())]


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def hopper_unsupported_reason(q, k, v, *, window, softcap=None, mask=None, alibi_slopes=None, sinks=None,
                              out=None) -> str | None:
    """None when the Hopper kernel takes this prefill call (arguments as ``prefill_attention``'s, window with causal
    folded in; ``out`` the output view the call will write), else a short reason. The call's own features are tested
    before the platform, so a call's reason is the same on every machine."""
    if os.environ.get("TILEATTN_HOPPER", "1") == "0":  # read per plan (prefill_plan caches), never per call
        return "TILEATTN_HOPPER=0"
    if q.dtype not in _TORCH_TO_GLUON or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (Hopper kernel: fp16 or bf16)"
    d, d_v = q.shape[-1], v.shape[-1]
    if d not in CONFIGS:
        return f"head_dim {d} (Hopper kernel: {' or '.join(map(str, sorted(CONFIGS)))})"
    if d_v != d:
        return f"head_dim_v {d_v} != head_dim {d}"
    for name, value in (("mask", mask), ("softcap", softcap), ("ALiBi", alibi_slopes), ("sinks", sinks)):
        if value is not None:
            return name
    if tuple(window) not in ((-1, -1), (-1, 0)):
        return "sliding window"
    if q.shape[2] < MIN_SEQLEN:
        return f"Sq {q.shape[2]} < {MIN_SEQLEN}"
    if k.shape[2] < MIN_SEQLEN:
        return f"Sk {k.shape[2]} < {MIN_SEQLEN}"
    views = dict(q=q, k=k, v=v) if out is None else dict(q=q, k=k, v=v, out=out)
    for name, t in views.items():
        if not _tma_strides_ok(t):
            return f"strides not TMA-describable ({name} {tuple(t.stride())})"
        if t.data_ptr() % 16:
            return f"{name} not 16-byte aligned"
    if out is not None and out.dtype != q.dtype:
        return f"out dtype {out.dtype} != {q.dtype}"
    if q.device.type != "cuda":
        return "not a CUDA tensor"
    capability = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if capability != (9, 0):
        return f"not sm_90 (capability {capability[0]}.{capability[1]})"
    if GLUON_MISSING is not None:
        return "Triton < 3.6 / no gluon"
    if not triton.__version__.startswith(VERIFIED_TRITON):
        return f"Triton {triton.__version__} (Hopper kernel verified with {VERIFIED_TRITON}x)"
    return None


class _TmaOperand(NamedTuple):
    """What Triton 3.6's launcher reads of a host tensor descriptor to encode its TMA map (driver.make_tensordesc_arg:
    base.data_ptr(), shape, strides, padding): the per-call stand-in for a ``TensorDescriptor``, whose construction
    re-validates what the plan has checked once."""

    base: torch.Tensor
    shape: list
    strides: list
    padding: str = "zero"


# Compiled kernels by (device, dtype, head dim, constexprs): after a plan's first launch (compile or cache fetch
# through Triton's normal path), launches skip Triton's argument binding (tens of us, see launch.py).
_compiled: dict = {}


class HopperPlan:
    """The Hopper launch of one prefill call signature (:func:`tileattn.kernels.prefill.prefill_plan`), built once:
    grid, scalars, descriptor shapes / strides / layouts. :meth:`run` has :class:`PrefillPlan`'s interface.

    Host work per call (estimated, not measured): allocating out (if not given) and lse, four data_ptr reads, four
    small tuples, and inside Triton's launcher four TMA map encodings (cuTensorMapEncodeTiled, host only, ~1 us each:
    the maps embed the base pointers, so they cannot be kept across calls) and the launch itself; no argument binding.
    A call whose base pointers are not 16-byte aligned (a view offset into its buffer; the signature does not fix the
    pointers) runs the portable plan ``portable`` instead."""

    __slots__ = ("portable", "return_lse", "config", "grid", "args", "constexprs", "operands", "layouts", "key")

    def __init__(self, q, k, v, out, *, causal, scale, return_lse, portable):
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        config = CONFIGS[d]
        self.portable, self.return_lse, self.config = portable, return_lse, config
        self.grid = (cdiv(sq, config.consumers * WG_ROWS), b * hq, 1)
        # (seqlen_q, seqlen_k, num_heads, group_size, qk_scale): ints below 2^31 (a q of 2^31 rows would not fit)
        self.args = (sq, sk, hq, hq // hkv, float(scale) * LOG2E.value)
        self.constexprs = dict(STAGES=config.stages, NUM_WG=config.consumers, PINGPONG=config.pingpong,
                               CONSUMER_REGS=config.consumer_regs, CAUSAL=causal, RETURN_LSE=return_lse)
        rows = (WG_ROWS, BLOCK_N, BLOCK_N, WG_ROWS)  # q, k, v, out
        element = getattr(gl, _TORCH_TO_GLUON[q.dtype])
        self.operands = tuple((list(t.shape), _descriptor_strides(t), [1, 1, r, d])  # (shape, strides, block)
                              for t, r in zip((q, k, v, out), rows))
        self.layouts = tuple(gl.NVMMASharedLayout.get_default_for(block, element) for _, _, block in self.operands)
        self.key = (q.dtype, d, *self.constexprs.values())  # all that the compiled kernel depends on

    def run(self, q, k, v, mask=None, alibi_slopes=None, sinks=None, out=None):
        """``(out, lse or None)`` as ``prefill_attention`` returns them (mask, ALiBi and sinks are always None here:
        calls with them never get a Hopper plan)."""
        out = output_like(q, q.shape[-1]) if out is None else out
        if (q.data_ptr() | k.data_ptr() | v.data_ptr() | out.data_ptr()) % 16:  # one of them off a 16-byte boundary
            return self.portable.run(q, k, v, out=out)
        lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32) if self.return_lse else None
        self._launch((q, k, v, out), out if lse is None else lse)  # (without lse, out stands in: never written)
        return out, lse

    def _launch(self, tensors, lse):
        device = _current_device()
        kernel = _compiled.get((device, self.key))
        hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
        if kernel is None or _hooked(hooks[0]) or _hooked(hooks[1]):  # first launch, or a profiler listening
            descriptors = [TensorDescriptor(t, shape, strides, block, layout)
                           for t, (shape, strides, block), layout in zip(tensors, self.operands, self.layouts)]
            _compiled[(device, self.key)] = _hopper_attention_kernel[self.grid](
                *descriptors, lse, *self.args, **self.constexprs, num_warps=NUM_WARPS, maxnreg=self.config.maxnreg)
            return
        operands = [_TmaOperand(t, shape, strides) for t, (shape, strides, _) in zip(tensors, self.operands)]
        kernel.run(*self.grid, _current_stream(device), kernel.function, kernel.packed_metadata, None, None, None,
                   *operands, lse.data_ptr(), *self.args, *self.constexprs.values())
