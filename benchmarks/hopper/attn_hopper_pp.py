"""Hopper prefill attention, versions 2 and 3 (Triton 3.6 Gluon, sm_90).  See benchmarks/NOTES.md, issue 13.

v2 (PINGPONG=False) and v3 (PINGPONG=True) are one kernel.  One CTA = one (batch, head, BLOCK_M = NUM_WG x 64
query rows) tile, split over NUM_WG + 1 warp-specialized partitions:

  * NUM_WG consumer partitions of 4 warps (one warpgroup each).  Consumer w owns query rows
    [start_m + 64 w, start_m + 64 w + 64) with its own Q buffer, running max / sum and O accumulator
    (wgmma m64 tiles: S 64 x BLOCK_N and O 64 x D in registers, P as the register A operand of P V).
    Consumer 0 is the default partition (the kernel's num_warps = 4), the others are workers.
    Every consumer reads the SAME K / V ring slots (the CTA's key tiles), like FA3 at head_dim 128.
    Why 64 rows per warpgroup and not a full 128-row Q tile each (CTA of 256 rows): a 128 x 128 tile per
    warpgroup holds S (128 fp32 regs/thread) + O (128 at D=128) + P (64) = 320 registers > the 240 a
    consumer can get with a 3-warpgroup CTA; FA3 makes the same choice at head_dim 128 (kBlockM 128 over
    2 MMA warpgroups).  Shared memory would allow it (Q 2 x 32 KB + 2 x 64 KB K/V = 192 KB at D=128).
  * 1 producer warp: all TMA loads (Q, K ring, V ring).  It alone refills slots.

  Registers (setmaxnreg through warp_specialize): NUM_WG = 2: 4 + 4 + 1 (-> 4) warps = 384 threads,
  maxnreg 168 -> 64512 registers; producer 24, consumer 1 240, consumer 0 (default) the rest = 240.

  v2 versus v1/ws: no barrier of more than one warpgroup in the main loop.  In v1 the ring refill needed a
  CTA-wide bar.sync (both warpgroups had to be done with the slot), and in ws a 256-thread partition barrier
  before each "empty" arrive; here each warpgroup is its own partition and releases a slot by its own
  arrive on an "empty" mbarrier that expects NUM_WG arrivals.  The barriers Gluon's membar analysis still
  inserts (around mbarrier ops, in the epilogue) are named barriers of one partition = one warpgroup
  (bar.sync id, 128): they never make one warpgroup wait for another.

  v3 adds FA3's inter-warpgroup ping-pong: the consumers take turns to ISSUE their wgmmas (the two of
  iteration j: S_j = Q K_j^T and O += P_{j-1} V_{j-1}), so that the tensor cores run consumer 1's products
  while consumer 0 does its softmax, and the other way round.  Each consumer also keeps the intra-warpgroup
  overlap of v1 (S_j is issued before P_{j-1} V_{j-1}; the softmax of tile j runs while P_{j-1} V_{j-1} is on
  the tensor cores).

Synchronization protocol (all mbarriers; "parity" = the argument of mbarrier.wait, which returns once the
phase with that parity has completed; a fresh barrier is in phase 0, so waiting on parity 1 returns at once):

  barrier           count     arrivals (who, when)                         waits (who, parity)
  q_bar[w]          1 + tx    producer expect + TMA bytes of Q rows of w   consumer w once, parity 0
  k_ready[s]        1 + tx    producer expect + TMA bytes of K_t, t%ST==s  every consumer, tile t: (t // ST) & 1
  v_ready[s]        1 + tx    same for V_t                                 every consumer, tile t: (t // ST) & 1
  k_empty[s]        NUM_WG    each consumer after its S_t = Q K_t^T has    producer before loading tile t into
                              completed (wgmma_wait(1)), thread 0 after      slot s: ((t // ST) & 1) ^ 1 (the first
                              a warpgroup barrier                           pass over the ring does not wait)
  v_empty[s]        NUM_WG    each consumer after its P_t V_t completed    producer, same parity as k_empty
                              (wgmma_wait(0)); the last tile is never
                              released (never refilled)
  turn[w] (v3)      1         consumer w-1 (mod NUM_WG) at the end of      consumer w before its i-th issue turn:
                              each of its issue turns                       parity (i & 1) ^ (w == 0)

  Ring phases: tile t sits in slot t % ST in the (t // ST)-th use of that slot; the producer's wait on
  empty[s] for tile t (t >= ST) needs tile t - ST released by all NUM_WG consumers (one phase = NUM_WG
  arrivals), i.e. phase (t // ST) - 1 complete: parity ((t // ST) - 1) & 1 = ((t // ST) & 1) ^ 1.  A ready
  barrier can never run two phases ahead of a consumer that still waits on it: tile t + ST's load waits for
  that consumer's own release of tile t, which comes after its wait on tile t.
  Turns: every consumer makes n_tiles + 1 issue turns (S_0 | S_j + P_{j-1} V_{j-1} for j = 1 .. n-1 |
  P_{n-1} V_{n-1}; n_tiles is per CTA, so equal for all consumers).  Consumer 0's turn 0 passes at once
  (parity 1 of a fresh barrier); consumer w's turn i (w > 0) waits for the completion of phase i of turn[w]
  = consumer w-1's (i+1)-th turn end; consumer 0's turn i (i > 0) waits for phase i-1 of turn[0] = consumer
  NUM_WG-1's i-th turn end.  So the issue order is 0, 1, .., NUM_WG-1, 0, 1, ... strictly.  turn[w] cannot
  run two phases ahead of consumer w: consumer w-1's next arrive needs its next turn, which needs the arrive
  that consumer w makes at the end of the turn it is waiting for.  The last arrival of consumer NUM_WG-1 on
  turn[0] is never waited on (harmless: nothing reuses the barrier).
  Before each arrive that hands something over (a ring slot, the turn), gl.thread_barrier() makes all 4 warps
  of the warpgroup reach that point (a 128-thread named barrier: mbarrier.arrive is issued by one thread).
  Gluon's membar pass adds one more such warpgroup-local barrier per iteration (before the ready waits at
  the top of the loop); 4 bar.sync of 128 threads per iteration in all, none spanning two warpgroups.

Host side: attn_hopper.attention_hopper with OPTS_V2 / OPTS_V3 (Q and O descriptors of 64-row blocks,
grid over BLOCK_M = NUM_WG x 64 rows, num_warps 4).  Check + time on an H100:
    python3 benchmarks/hopper/attn_hopper.py --only gluon,ws_deep,v2,pp,pp3
(v2 = OPTS_V2, pp = OPTS_V3, pp3 = OPTS_V3_WG3: 3 consumers / 192-row CTA at D=64, same as pp at D=128.)
Compile locally (no GPU):  PYTHONPATH=. /tmp/v36/bin/python benchmarks/hopper/compile_check.py --only-pp
"""

import os
import sys

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn_hopper import _epilogue, _key_range, _softmax_tile, _tile2d, _wait_tile  # noqa: E402

WG_M = 64  # query rows per consumer warpgroup
PRODUCER_REGS = gl.constexpr(24)
# consumer indices, as constexpr objects: plain ints in a partition's argument tuple do not flatten
WG0, WG1, WG2 = gl.constexpr(0), gl.constexpr(1), gl.constexpr(2)


def num_wg_for(head_dim, wg64=2):
    """Consumer warpgroups per CTA.  D=128: 2 (a third would leave < 160 registers each; a consumer needs
    ~190 at D=128).  D=64: 2, or 3 (`wg64=3`: FA3's 192-row tile; consumers fit in 160 registers)."""
    return wg64 if head_dim == 64 else 2


def stages_for(head_dim):
    """K/V ring depth.  smem = NUM_WG x 64 x D (Q) + STAGES x 2 x 128 x D (K, V), 2-byte elements:
    D=64: 16 KB + 4 x 32 KB = 144 KB;  D=128: 32 KB + 3 x 64 KB = 224 KB (of 227 KB; no layout-conversion
    scratch is needed: P goes from the S accumulator to the A operand in registers)."""
    return {64: 4, 128: 3}[head_dim]


def maxnreg_for(head_dim, wg64=2):
    # NUM_WG 2: (4 + 4 + 4) warps x 32 x 168 = 64512 <= 65536 registers; NUM_WG 3: 16 warps x 32 x 128 = 65536.
    return {2: 168, 3: 128}[num_wg_for(head_dim, wg64)]


# ----------------------------------------------------------------------------------------------
# partitions
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _pp_producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                 off_b, off_h, off_hk, start_m, n_tiles):
    NUM_WG: gl.constexpr = q_bufs.type.shape[0]
    WGM: gl.constexpr = q_desc.block_type.shape[2]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    for w in gl.static_range(NUM_WG):
        mbarrier.expect(q_bars.index(w), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m + w * WGM, 0], q_bars.index(w),
                                        q_bufs.index(w))
    for t in range(n_tiles):
        slot = t % STAGES
        phase = (t // STAGES) & 1
        mbarrier.wait(k_empty.index(slot), phase ^ 1)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [off_b, off_hk, t * BLOCK_N, 0], k_ready.index(slot),
                                        k_bufs.index(slot))
        mbarrier.wait(v_empty.index(slot), phase ^ 1)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [off_b, off_hk, t * BLOCK_N, 0], v_ready.index(slot),
                                        v_bufs.index(slot))


@gluon.jit
def _turn_begin(turn_bars, turn, W: gl.constexpr, PINGPONG: gl.constexpr):
    """Wait until this consumer may issue its wgmmas (turn-th turn, counted from 0)."""
    if PINGPONG:
        FIRST: gl.constexpr = 1 if W == 0 else 0
        mbarrier.wait(turn_bars.index(W), (turn & 1) ^ FIRST)


@gluon.jit
def _turn_end(turn_bars, W: gl.constexpr, PINGPONG: gl.constexpr):
    """Hand the issue turn to the next consumer once all 4 warps have issued."""
    if PINGPONG:
        NUM_WG: gl.constexpr = turn_bars.type.shape[0]
        gl.thread_barrier()
        mbarrier.arrive(turn_bars.index((W + 1) % NUM_WG))


@gluon.jit
def _release(bars, tile):
    STAGES: gl.constexpr = bars.type.shape[0]
    gl.thread_barrier()  # all 4 warps past the wgmma wait that covers this slot
    mbarrier.arrive(bars.index(tile % STAGES))


@gluon.jit
def _pp_consumer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                 turn_bars, o_desc, Lse, off_b, off_h, off_hk, start_m, n_tiles, full_end, diag, seqlen_q, seqlen_k,
                 qk_scale, stride_lb, stride_lh,
                 W: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                 RETURN_LSE: gl.constexpr, PINGPONG: gl.constexpr):
    NUM_WARPS: gl.constexpr = gl.num_warps()
    gl.static_assert(NUM_WARPS == 4, "a consumer partition is one warpgroup")
    WGM: gl.constexpr = q_desc.block_type.shape[2]
    dtype: gl.constexpr = q_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)

    row0 = start_m + W * WGM
    rows = row0 + gl.arange(0, WGM, layout=srow_l)
    q_smem = q_bufs.index(W)
    q = _tile2d(q_smem, WGM, HEAD_DIM)
    zero_s = gl.zeros([WGM, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([WGM], float("-inf"), gl.float32, srow_l)
    l_i = gl.zeros([WGM], gl.float32, srow_l)
    acc = gl.zeros([WGM, HEAD_DIM], gl.float32, o_layout)

    # Turn 0: S_0.
    mbarrier.wait(q_bars.index(W), 0)
    k = _tile2d(_wait_tile(k_bufs, k_ready, 0), BLOCK_N, HEAD_DIM)
    _turn_begin(turn_bars, 0, W, PINGPONG)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    _turn_end(turn_bars, W, PINGPONG)
    s, _, _ = warpgroup_mma_wait(0, deps=(s_tok, q, k))
    _release(k_empty, 0)
    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, 0, full_end, rows, seqlen_k, diag, qk_scale,
                                       s_layout, BLOCK_N, CAUSAL)
    p_op = gl.convert_layout(p.to(dtype), p_layout)

    # Turn j: S_j and P_{j-1} V_{j-1}.
    for j in range(1, n_tiles):
        k = _tile2d(_wait_tile(k_bufs, k_ready, j), BLOCK_N, HEAD_DIM)
        v = _tile2d(_wait_tile(v_bufs, v_ready, j - 1), BLOCK_N, HEAD_DIM)
        _turn_begin(turn_bars, j, W, PINGPONG)
        s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        _turn_end(turn_bars, W, PINGPONG)
        # Softmax of tile j while P_{j-1} V_{j-1} (and the other warpgroup's products) run.
        s, _, _ = warpgroup_mma_wait(1, deps=(s_tok, q, k))
        _release(k_empty, j)
        p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, j * BLOCK_N, full_end, rows, seqlen_k, diag, qk_scale,
                                           s_layout, BLOCK_N, CAUSAL)
        acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))
        _release(v_empty, j - 1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

    # Turn n_tiles: the last P V (its V slot is never refilled: no release).
    v = _tile2d(_wait_tile(v_bufs, v_ready, n_tiles - 1), BLOCK_N, HEAD_DIM)
    _turn_begin(turn_bars, n_tiles, W, PINGPONG)
    o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    _turn_end(turn_bars, W, PINGPONG)
    acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))

    _epilogue(acc, m_i, l_i, q_smem, o_desc, Lse, off_b, off_h, row0, seqlen_q, stride_lb, stride_lh,
              o_layout, WGM, HEAD_DIM, RETURN_LSE)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
# As attn_hopper_v4.V4_DO_NOT_SPECIALIZE: no "== 1" / "% 16" specialization of the problem sizes (40 compiles for
# the driver's 72 check cases of one variant before, 8 now); nothing here needs the hints (TMA for Q / K / V / O,
# per-row Lse stores).
PP_DO_NOT_SPECIALIZE = ["stride_lb", "stride_lh", "seqlen_q", "seqlen_k", "num_heads", "group_size"]


@gluon.jit(do_not_specialize=PP_DO_NOT_SPECIALIZE)
def _attn_fwd_pp_kernel(q_desc, k_desc, v_desc, o_desc, Lse, stride_lb, stride_lh,
                        seqlen_q, seqlen_k, num_heads, group_size, qk_scale,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr,
                        NUM_WG: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    WGM: gl.constexpr = q_desc.block_type.shape[2]
    gl.static_assert(WGM * NUM_WG == BLOCK_M, "BLOCK_M = NUM_WG x (rows of the Q / O descriptor block)")
    gl.static_assert(gl.num_warps() == 4, "launch with num_warps=4 (the default partition is consumer 0)")

    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (causal) query blocks first
    pid_bh = gl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // group_size
    start_m = pid_m * BLOCK_M
    n_tiles, full_end, diag = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

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
    fence_async_shared()  # barrier inits visible to the async proxy (TMA) before any partition starts

    # (Partition arguments are spelled out: a tuple literal of constexprs only becomes a Python tuple of ints,
    # which warp_specialize cannot flatten for a worker partition.)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_pp_consumer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                            turn_bars, o_desc, Lse, off_b, off_h, off_hk, start_m, n_tiles, full_end, diag, seqlen_q,
                            seqlen_k, qk_scale, stride_lb, stride_lh, WG0, HEAD_DIM, BLOCK_N, CAUSAL, RETURN_LSE,
                            PINGPONG)),
            (_pp_consumer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                            turn_bars, o_desc, Lse, off_b, off_h, off_hk, start_m, n_tiles, full_end, diag, seqlen_q,
                            seqlen_k, qk_scale, stride_lb, stride_lh, WG1, HEAD_DIM, BLOCK_N, CAUSAL, RETURN_LSE,
                            PINGPONG)),
            (_pp_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                            off_b, off_h, off_hk, start_m, n_tiles)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.static_assert(NUM_WG == 3, "NUM_WG in {2, 3}")
        gl.warp_specialize([
            (_pp_consumer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                            turn_bars, o_desc, Lse, off_b, off_h, off_hk, start_m, n_tiles, full_end, diag, seqlen_q,
                            seqlen_k, qk_scale, stride_lb, stride_lh, WG0, HEAD_DIM, BLOCK_N, CAUSAL, RETURN_LSE,
                            PINGPONG)),
            (_pp_consumer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                            turn_bars, o_desc, Lse, off_b, off_h, off_hk, start_m, n_tiles, full_end, diag, seqlen_q,
                            seqlen_k, qk_scale, stride_lb, stride_lh, WG1, HEAD_DIM, BLOCK_N, CAUSAL, RETURN_LSE,
                            PINGPONG)),
            (_pp_consumer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                            turn_bars, o_desc, Lse, off_b, off_h, off_hk, start_m, n_tiles, full_end, diag, seqlen_q,
                            seqlen_k, qk_scale, stride_lb, stride_lh, WG2, HEAD_DIM, BLOCK_N, CAUSAL, RETURN_LSE,
                            PINGPONG)),
            (_pp_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_ready, v_ready, k_empty, v_empty,
                            off_b, off_h, off_hk, start_m, n_tiles)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# host side: options for attn_hopper.attention_hopper (values may be functions of head_dim)
# ----------------------------------------------------------------------------------------------
def consumer_regs_for(head_dim, wg64=2):
    """Registers of each WORKER consumer; the default partition (consumer 0) gets what maxnreg leaves:
    NUM_WG 2: (168 x 384 - (240 + 24) x 128) / 128 = 240;  NUM_WG 3: (128 x 512 - (2 x 160 + 24) x 128) / 128 = 168.
    (Local compile: no spills down to 192 at D=128, 176 at D=64 with 2 consumers; 160 with 3 at D=64.)"""
    return {2: 240, 3: 160}[num_wg_for(head_dim, wg64)]


def _opts(pingpong, wg64=2):
    """Launch options for attn_hopper.attention_hopper (functions of head_dim where they depend on it)."""
    return dict(
        block_m=lambda d: num_wg_for(d, wg64) * WG_M, qo_rows=WG_M, num_warps=4,
        maxnreg=lambda d: maxnreg_for(d, wg64), stages=stages_for,
        extra=lambda d: dict(NUM_WG=num_wg_for(d, wg64), PINGPONG=pingpong, CONSUMER_REGS=consumer_regs_for(d, wg64)))


OPTS_V2 = _opts(False)         # version 2: per-warpgroup partitions, no ping-pong
OPTS_V3 = _opts(True)          # version 3: + ping-pong (2 consumers)
OPTS_V3_WG3 = _opts(True, 3)   # version 3 with 3 consumers (192-row CTA) at D=64; D=128 as OPTS_V3


def attention_hopper_pp(q, k, v, causal=False, scale=None, return_lse=False, pingpong=True):  # noqa: D103
    from attn_hopper import attention_hopper
    return attention_hopper(q, k, v, causal=causal, scale=scale, return_lse=return_lse, kernel=_attn_fwd_pp_kernel,
                            **(OPTS_V3 if pingpong else OPTS_V2))
