"""Hopper prefill attention, version 4: persistent grid (Triton 3.6 Gluon, sm_90).  See benchmarks/NOTES.md, issue 13.

v4 = v2 / v3 (attn_hopper_pp.py: per-warpgroup consumer partitions, 1-warp TMA producer, optional ping-pong, 2 or 3
consumers) made persistent, with the causal diagonal tiles in a loop of their own:

  * Grid = min(#SMs, #work tiles) CTAs (the SM count is a host argument).  A work tile is (batch, head, query block
    of BLOCK_M = NUM_WG x 64 rows).  CTA p takes work tiles p, p + G, p + 2G, ... (G = grid size) in the order below;
    every partition (producer and consumers) walks the same sequence and computes the same (b, h, m, n_tiles).
  * Order (`_work_tile`): the B*H heads are cut into sections of `swizzle` heads (host: non-causal, as many heads as
    have their K and V in ~32 MB of L2, GQA groups counted once; causal, all heads in one section, because with
    static striding, sections make the per-CTA work uneven: 1.10-1.44x the mean in a host simulation against
    1.03-1.06x for one section); inside a section the query blocks go from the LAST (most key
    tiles when causal) to the first, heads fastest.  So causal work is longest-first within a section and the whole
    schedule ends on the shortest tiles (short tail), and the ~132 tiles in flight at a time share the K / V of at
    most `swizzle` heads (L2 reuse; one head per section would be v2's order).
  * Key tiles of a work tile: [0, n_full) need no mask at all (below the diagonal, inside Sk): their loop is compiled
    with MASK=False (no iota / compare / select, no -inf guard); [max(n_full, 1), n_tiles) cut the diagonal or the
    end of K: the loop with MASK=True.  Tile 0 (the prologue) checks at run time.
  * Q is released as soon as the last S = Q K^T of the work tile has completed, so the producer loads the next work
    tile's Q while the consumer still does its last softmax, last P V and epilogue; K / V of the next work tile
    stream into the ring as its slots free up (the ring never drains between work tiles).
  * O leaves either through its own shared buffer and a TMA store that is waited for only before the NEXT work
    tile's epilogue writes that buffer (O_SMEM=True; head_dim 64, where shared memory is plentiful), or straight
    from the wgmma registers with masked global stores (O_SMEM=False; head_dim 128, where Q 32 KB + 3-deep K/V ring
    192 KB leave no room for an O buffer).  Either way the epilogue never blocks a TMA load.

Synchronization protocol (all mbarriers; "parity" = the argument of mbarrier.wait, which returns once the phase with
that parity has completed; a fresh barrier is in phase 0, so waiting on parity 1 returns at once).
Counters, identical in every partition of a CTA because they all walk the same work tiles:
  i   = index of the work tile within this CTA (0, 1, ...)
  c   = running K / V tile counter: key tile j of work tile i is c = c_i + j, c_i = sum of n_tiles of earlier
        work tiles of this CTA.  Ring slot c % ST, use number c // ST of that slot.
  u   = running issue-turn counter (v3 ping-pong): work tile i has n_tiles + 1 turns, numbered u_i + 0 .. u_i + n.

  barrier        count    arrivals (who, when)                          waits (who, parity)
  q_ready[w]     1 + tx   producer expect + TMA bytes of Q rows of w    consumer w, work tile i: i & 1
  q_empty[w]     1        consumer w once per work tile, after the      producer before loading Q of work tile i:
                          last S = Q K^T wgmma of that tile completed    (i & 1) ^ 1
  k_ready[s]     1 + tx   producer expect + TMA bytes of K_c            every consumer, K_c: (c // ST) & 1
  v_ready[s]     1 + tx   same for V_c                                  every consumer, V_c: (c // ST) & 1
  k_empty[s]     NUM_WG   every consumer after its S with K_c completed producer before loading K_c: ((c//ST)&1)^1
  v_empty[s]     NUM_WG   every consumer after its P V_c completed -    producer before loading V_c: ((c//ST)&1)^1
                          EVERY tile, the last of a work tile too (its
                          slot is reused by the next work tile)
  turn[w] (pp)   1        consumer w-1 (mod NUM_WG) at the end of each   consumer w before turn u:
                          of its issue turns                             (u & 1) ^ (w == 0)

  Why no barrier runs two phases ahead of a waiter (the only way a parity wait can go wrong):
  - q_ready[w]: the load for work tile i+1 needs q_empty[w] released for tile i, which consumer w does after its
    wait on q_ready[w] for tile i.  q_empty[w]: consumer w's release for tile i+1 comes after its wait on q_ready[w]
    for tile i+1, i.e. after the producer passed its q_empty[w] wait for tile i+1.
  - ring (across work tiles exactly as inside one, since c runs on): K_{c+ST} is loaded only after all NUM_WG
    consumers released K_c, each after its own wait on K_c; a consumer's release of K_{c+ST} follows its wait on
    K_{c+ST}, i.e. the completion of the phase of K_c, so no consumer's arrive lands in an earlier phase.
  - turns: the issue order is 0, 1, .., NUM_WG-1, 0, ... strictly, over the global u (all consumers make the
    same number of turns per work tile); consumer w-1 cannot end turn u+1 before consumer w began turn u (it needs
    the turns of w .. NUM_WG-1 and 0 .. w-2 in between).  The epilogue has no turn: a consumer may be in its
    epilogue while the next ones issue their last P V; the next work tile's turn 0 waits as any other.
  - Deadlock freedom: the producer waits only on releases; a consumer releases K_c / V_c / Q after waits on
    ready barriers of tiles <= c (and turns), which the producer issues in c order without waiting on anything
    later than c - ST; with ST >= 2 the chain K_c <- release(K_{c-ST}) <- S_{c-ST} is acyclic.  Q of work tile i+1
    waits on the Q release of tile i only, which needs no load of tile i+1.
  Before each arrive that hands something over (a ring slot, Q, the turn), gl.thread_barrier() (a 128-thread
  named barrier of the partition) makes all 4 warps of the warpgroup reach that point; mbarrier.arrive is
  issued by one thread of the warpgroup (tid % 128 == 0 in the PTX).

Host side: attention_hopper_v4(q, k, v, ..., num_sms=132, wg64=2|3, pingpong=..., o_smem=...); the driver
attn_hopper.py names it v4 (2 consumers, no ping-pong: v2's loop) and v4_pp3 (3 consumers + ping-pong, head_dim 64).
Compile locally (no GPU):  PYTHONPATH=. /tmp/v36/bin/python benchmarks/hopper/compile_check.py --only-v4
"""

import math
import os
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn_hopper import LN2, LOG2E, _GL_DTYPE, _key_range, _tile2d, _tma_ready, make_desc  # noqa: E402
from attn_hopper_pp import (  # noqa: E402
    PRODUCER_REGS, WG0, WG1, WG2, WG_M, _release, _turn_begin, _turn_end, consumer_regs_for, maxnreg_for, num_wg_for,
)

BLOCK_N = 128
L2_SECTION_BYTES = 32 * 1024 * 1024  # K + V of the heads of one section (H100 L2: 50 MB)


# ----------------------------------------------------------------------------------------------
# device helpers
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _work_tile(tile, n_m, bh_total, swizzle, num_heads, group_size, BLOCK_M: gl.constexpr):
    """Work tile index -> (off_b, off_h, off_hk, start_m).  Sections of `swizzle` heads; in a section the query
    blocks from the last to the first, heads fastest (see the module docstring)."""
    sec_tiles = swizzle * n_m
    sec = tile // sec_tiles
    r = tile - sec * sec_tiles
    g0 = sec * swizzle
    g = gl.minimum(swizzle, bh_total - g0)  # the last section may hold fewer heads
    blk = r // g
    bh = g0 + (r - blk * g)
    off_b = bh // num_heads
    off_h = bh - off_b * num_heads
    off_hk = off_h // group_size
    start_m = (n_m - 1 - blk) * BLOCK_M
    return off_b, off_h, off_hk, start_m


@gluon.jit
def _softmax_v4(s, m_i, l_i, start_n, rows, seqlen_k, diag, qk_scale,
                s_layout: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, MASK: gl.constexpr):
    """Fold the raw score tile s = Q K^T into (m_i, l_i); returns (p, alpha, m, l).  `rows` = per row the index of
    the last key it may see (min(row + diag, Sk - 1) causal, Sk - 1 otherwise).  MASK=False: a tile with every
    key visible to every row (no mask arithmetic; m is finite for every row, see the caller)."""
    if MASK:
        # One compare per score: column c of this tile is kept iff c <= lim - start_n, lim = each row's last
        # visible key (`rows` holds it, see the caller), so no per-tile column vector is built.
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = gl.expand_dims(cols, 0) <= gl.expand_dims(rows - start_n, 1)
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if MASK and CAUSAL:  # a row may have seen no key yet (Sq > Sk): use 0 so exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _wait_slot(bufs, bars, c):
    STAGES: gl.constexpr = bufs.type.shape[0]
    slot = c % STAGES
    mbarrier.wait(bars.index(slot), (c // STAGES) & 1)
    return bufs.index(slot)


@gluon.jit
def _v4_step(q, p_op, acc, m_i, l_i, k_bufs, v_bufs, k_ready, v_ready, k_empty, v_empty, turn_bars,
             c, u, start_n, rows, seqlen_k, diag, qk_scale, zero_s,
             W: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
             MASK: gl.constexpr, PINGPONG: gl.constexpr):
    """One main-loop iteration: S_c = Q K_c^T and O += P_{c-1} V_{c-1} (async), softmax of tile c while P V runs."""
    s_layout: gl.constexpr = zero_s.type.layout
    o_layout: gl.constexpr = acc.type.layout
    p_layout: gl.constexpr = p_op.type.layout
    k = _tile2d(_wait_slot(k_bufs, k_ready, c), BLOCK_N, HEAD_DIM)
    v = _tile2d(_wait_slot(v_bufs, v_ready, c - 1), BLOCK_N, HEAD_DIM)
    _turn_begin(turn_bars, u, W, PINGPONG)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    _turn_end(turn_bars, W, PINGPONG)
    s, _, _ = warpgroup_mma_wait(1, deps=(s_tok, q, k))
    _release(k_empty, c)
    p, alpha, m_i, l_i = _softmax_v4(s, m_i, l_i, start_n, rows, seqlen_k, diag, qk_scale,
                                     s_layout, BLOCK_N, CAUSAL, MASK)
    acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))
    _release(v_empty, c - 1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    return p_op, acc, m_i, l_i


# ----------------------------------------------------------------------------------------------
# partitions
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _v4_producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready, k_empty, v_empty,
                 pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size, seqlen_q, seqlen_k,
                 BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    NUM_WG: gl.constexpr = q_bufs.type.shape[0]
    WGM: gl.constexpr = q_desc.block_type.shape[2]
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    c = 0
    i = 0
    for tile in range(pid, n_work, nprog):
        off_b, off_h, off_hk, start_m = _work_tile(tile, n_m, bh_total, swizzle, num_heads, group_size, BLOCK_M)
        n_tiles, full_end, diag = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
        for w in gl.static_range(NUM_WG):
            mbarrier.wait(q_empty.index(w), (i & 1) ^ 1)
            mbarrier.expect(q_ready.index(w), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m + w * WGM, 0], q_ready.index(w),
                                            q_bufs.index(w))
        for t in range(n_tiles):
            slot = c % STAGES
            phase = (c // STAGES) & 1
            mbarrier.wait(k_empty.index(slot), phase ^ 1)
            mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(k_desc, [off_b, off_hk, t * BLOCK_N, 0], k_ready.index(slot),
                                            k_bufs.index(slot))
            mbarrier.wait(v_empty.index(slot), phase ^ 1)
            mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [off_b, off_hk, t * BLOCK_N, 0], v_ready.index(slot),
                                            v_bufs.index(slot))
            c += 1
        i += 1


@gluon.jit
def _v4_consumer(q_desc, k_desc, v_desc, o_desc, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready,
                 k_empty, v_empty, turn_bars, O, stride_ob, stride_oh, stride_os, Lse, stride_lb, stride_lh,
                 pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size, seqlen_q, seqlen_k, qk_scale,
                 W: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr, PINGPONG: gl.constexpr, O_SMEM: gl.constexpr):
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
    ocol_l: gl.constexpr = gl.SliceLayout(0, o_layout)

    q = _tile2d(q_bufs.index(W), WGM, HEAD_DIM)
    zero_s = gl.zeros([WGM, BLOCK_N], gl.float32, s_layout)
    c = 0  # running K / V tile counter (ring slot c % STAGES)
    u = 0  # running issue-turn counter (ping-pong)
    i = 0  # work tiles done by this CTA
    for tile in range(pid, n_work, nprog):
        off_b, off_h, off_hk, start_m = _work_tile(tile, n_m, bh_total, swizzle, num_heads, group_size, BLOCK_M)
        n_tiles, full_end, diag = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
        n_full = full_end // BLOCK_N  # key tiles [0, n_full) are visible to every row of the block
        row0 = start_m + W * WGM
        if CAUSAL:
            lim = gl.minimum(row0 + gl.arange(0, WGM, layout=srow_l) + diag, seqlen_k - 1)
        else:
            lim = gl.full([WGM], seqlen_k - 1, gl.int32, srow_l)
        m_i = gl.full([WGM], float("-inf"), gl.float32, srow_l)
        l_i = gl.zeros([WGM], gl.float32, srow_l)
        acc = gl.zeros([WGM, HEAD_DIM], gl.float32, o_layout)

        # Turn u: S of key tile 0 (masked or not, decided at run time: once per work tile).
        mbarrier.wait(q_ready.index(W), i & 1)
        k = _tile2d(_wait_slot(k_bufs, k_ready, c), BLOCK_N, HEAD_DIM)
        _turn_begin(turn_bars, u, W, PINGPONG)
        s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        _turn_end(turn_bars, W, PINGPONG)
        s, _, _ = warpgroup_mma_wait(0, deps=(s_tok, q, k))
        _release(k_empty, c)
        if n_full > 0:
            p, alpha, m_i, l_i = _softmax_v4(s, m_i, l_i, 0, lim, seqlen_k, diag, qk_scale,
                                             s_layout, BLOCK_N, CAUSAL, False)
        else:
            p, alpha, m_i, l_i = _softmax_v4(s, m_i, l_i, 0, lim, seqlen_k, diag, qk_scale,
                                             s_layout, BLOCK_N, CAUSAL, True)
        p_op = gl.convert_layout(p.to(dtype), p_layout)

        # Key tiles 1 .. n_full-1: no mask (tile 0 was unmasked too, so every row's max is finite here).
        for j in range(1, n_full):
            p_op, acc, m_i, l_i = _v4_step(q, p_op, acc, m_i, l_i, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                                           v_empty, turn_bars, c + j, u + j, j * BLOCK_N, lim, seqlen_k, diag,
                                           qk_scale, zero_s, W, HEAD_DIM, BLOCK_N, CAUSAL, False, PINGPONG)
        # Key tiles that cut the causal diagonal or the end of K.
        for j in range(gl.maximum(n_full, 1), n_tiles):
            p_op, acc, m_i, l_i = _v4_step(q, p_op, acc, m_i, l_i, k_bufs, v_bufs, k_ready, v_ready, k_empty,
                                           v_empty, turn_bars, c + j, u + j, j * BLOCK_N, lim, seqlen_k, diag,
                                           qk_scale, zero_s, W, HEAD_DIM, BLOCK_N, CAUSAL, True, PINGPONG)
        # Every S of this work tile has completed: Q's buffer may take the next work tile's Q.
        _release(q_empty, W)

        # Turn u + n_tiles: the last P V; its V slot is released too (the ring runs on into the next work tile).
        v = _tile2d(_wait_slot(v_bufs, v_ready, c + n_tiles - 1), BLOCK_N, HEAD_DIM)
        _turn_begin(turn_bars, u + n_tiles, W, PINGPONG)
        o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        _turn_end(turn_bars, W, PINGPONG)
        acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))
        _release(v_empty, c + n_tiles - 1)

        # Epilogue.
        l_o = gl.convert_layout(l_i, orow_l)
        empty = l_o == 0.0
        l_safe = gl.where(empty, 1.0, l_o)
        out = (acc * gl.expand_dims(1.0 / l_safe, 1)).to(dtype)
        if RETURN_LSE:
            m_o = gl.convert_layout(m_i, orow_l)
            lse = gl.where(empty, float("-inf"), (m_o + gl.log2(l_safe)) * LN2)
            # (row0 kept out of the row vector: without seqlen_q's % 16 hint this spares v4_pp3 a 12 B spill)
            lrows = gl.arange(0, WGM, layout=orow_l)
            gl.store(Lse + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh + row0 + lrows, lse,
                     mask=lrows < seqlen_q - row0)
        if O_SMEM:
            o_smem = o_bufs.index(W)
            tma.store_wait(0)   # the previous work tile's O store has read this buffer
            gl.thread_barrier()
            _tile2d(o_smem, WGM, HEAD_DIM).store(out)
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(o_desc, [off_b, off_h, row0, 0], o_smem)  # waited for next time
        else:
            orows = row0 + gl.arange(0, WGM, layout=orow_l)
            cols = gl.arange(0, HEAD_DIM, layout=ocol_l)
            base = O + off_b.to(gl.int64) * stride_ob + off_h.to(gl.int64) * stride_oh
            ptrs = base + gl.expand_dims(orows.to(gl.int64) * stride_os, 1) + gl.expand_dims(cols, 0)
            omask = gl.expand_dims(orows < seqlen_q, 1) & gl.expand_dims(cols < HEAD_DIM, 0)
            gl.store(ptrs, out, mask=omask)

        c += n_tiles
        u += n_tiles + 1
        i += 1
    if O_SMEM:
        tma.store_wait(0)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
# Integer arguments that vary with the problem are not specialized: otherwise Triton compiles one kernel per
# combination of "== 1" (becomes a constant) and "% 16 == 0" (alignment hint) over them: 56 compiles (191 s at
# sm_90 on a 2-core CPU machine) for the driver's 72 check cases, 8 (one per dtype x head_dim x causal, 26 s) now,
# the timing shapes included (spec_count.py).
# None of them feeds an address that needs the hint: Q / K / V / O move by TMA (the descriptors carry their own
# shapes and strides); the Lse strides address per-row fp32 stores (one row per register in the wgmma layout, no
# vector store to lose); the O strides (multiples of 16 for contiguous O; O_SMEM=False's vector stores) stay
# specialized.
V4_DO_NOT_SPECIALIZE = ["stride_lb", "stride_lh", "seqlen_q", "seqlen_k", "num_heads", "group_size", "n_m",
                        "bh_total", "n_work", "swizzle"]


@gluon.jit(do_not_specialize=V4_DO_NOT_SPECIALIZE)
def _attn_fwd_v4_kernel(q_desc, k_desc, v_desc, o_desc, O, stride_ob, stride_oh, stride_os, Lse, stride_lb, stride_lh,
                        seqlen_q, seqlen_k, num_heads, group_size, qk_scale, n_m, bh_total, n_work, swizzle,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr,
                        NUM_WG: gl.constexpr, PINGPONG: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                        O_SMEM: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    WGM: gl.constexpr = q_desc.block_type.shape[2]
    gl.static_assert(WGM * NUM_WG == BLOCK_M, "BLOCK_M = NUM_WG x (rows of the Q / O descriptor block)")
    gl.static_assert(gl.num_warps() == 4, "launch with num_warps=4 (the default partition is consumer 0)")
    gl.static_assert(STAGES >= 2, "the ring needs 2 slots (see the protocol)")
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)

    q_bufs = gl.allocate_shared_memory(dtype, [NUM_WG] + q_desc.block_type.shape, q_desc.layout)
    if O_SMEM:
        o_bufs = gl.allocate_shared_memory(dtype, [NUM_WG] + o_desc.block_type.shape, o_desc.layout)
    else:
        o_bufs = q_bufs  # unused
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
    turn_bars = gl.allocate_shared_memory(gl.int64, [NUM_WG, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for w in gl.static_range(NUM_WG):
        mbarrier.init(q_ready.index(w), count=1)
        mbarrier.init(q_empty.index(w), count=1)
        mbarrier.init(turn_bars.index(w), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(s), count=1)
        mbarrier.init(v_ready.index(s), count=1)
        mbarrier.init(k_empty.index(s), count=NUM_WG)
        mbarrier.init(v_empty.index(s), count=NUM_WG)
    fence_async_shared()  # barrier inits visible to the async proxy (TMA) before any partition starts

    # (Argument tuples spelled out: see API.md, a tuple of constexprs alone does not flatten for a worker.)
    if NUM_WG == 2:
        gl.warp_specialize([
            (_v4_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                            v_ready, k_empty, v_empty, turn_bars, O, stride_ob, stride_oh, stride_os, Lse, stride_lb,
                            stride_lh, pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size, seqlen_q,
                            seqlen_k, qk_scale, WG0, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, PINGPONG,
                            O_SMEM)),
            (_v4_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                            v_ready, k_empty, v_empty, turn_bars, O, stride_ob, stride_oh, stride_os, Lse, stride_lb,
                            stride_lh, pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size, seqlen_q,
                            seqlen_k, qk_scale, WG1, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, PINGPONG,
                            O_SMEM)),
            (_v4_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready,
                            k_empty, v_empty, pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size,
                            seqlen_q, seqlen_k, BLOCK_M, CAUSAL)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.static_assert(NUM_WG == 3, "NUM_WG in {2, 3}")
        gl.warp_specialize([
            (_v4_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                            v_ready, k_empty, v_empty, turn_bars, O, stride_ob, stride_oh, stride_os, Lse, stride_lb,
                            stride_lh, pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size, seqlen_q,
                            seqlen_k, qk_scale, WG0, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, PINGPONG,
                            O_SMEM)),
            (_v4_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                            v_ready, k_empty, v_empty, turn_bars, O, stride_ob, stride_oh, stride_os, Lse, stride_lb,
                            stride_lh, pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size, seqlen_q,
                            seqlen_k, qk_scale, WG1, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, PINGPONG,
                            O_SMEM)),
            (_v4_consumer, (q_desc, k_desc, v_desc, o_desc, q_bufs, o_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready,
                            v_ready, k_empty, v_empty, turn_bars, O, stride_ob, stride_oh, stride_os, Lse, stride_lb,
                            stride_lh, pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size, seqlen_q,
                            seqlen_k, qk_scale, WG2, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE, PINGPONG,
                            O_SMEM)),
            (_v4_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, v_ready,
                            k_empty, v_empty, pid, nprog, n_work, n_m, bh_total, swizzle, num_heads, group_size,
                            seqlen_q, seqlen_k, BLOCK_M, CAUSAL)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
def v4_config(head_dim, wg64=2, o_smem=None, stages=None):
    """(NUM_WG, STAGES, O_SMEM).  Shared memory (2-byte elements): Q NUM_WG x 64 x D, O the same when O_SMEM,
    K/V STAGES x 2 x 128 x D.  D=64: 2 WG 16 + 16 + 4 x 32 = 160 KB, 3 WG 24 + 24 + 128 = 176 KB;
    D=128: 32 + 3 x 64 = 224 KB without an O buffer (with one: 2 stages, 192 KB)."""
    nwg = num_wg_for(head_dim, wg64)
    o_smem = (head_dim == 64) if o_smem is None else o_smem
    if stages is None:
        stages = 4 if head_dim == 64 else (2 if o_smem else 3)
    return nwg, stages, o_smem


def swizzle_for(bh_total, group_size, seqlen_k, head_dim, elsize=2):
    """Query heads per L2 section: as many as have their K and V (GQA: shared by `group_size` heads) in
    L2_SECTION_BYTES."""
    kv_head = 2 * seqlen_k * head_dim * elsize
    return max(1, min(bh_total, (L2_SECTION_BYTES // max(kv_head, 1)) * group_size))


def attention_hopper_v4(q, k, v, causal=False, scale=None, return_lse=False, num_sms=132, wg64=2, pingpong=False,
                        o_smem=None, stages=None, swizzle=None):
    """As attn_hopper.attention_hopper (q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D], fp16/bf16, D in {64, 128}, causal
    bottom-right), with the persistent kernel: min(num_sms, #work tiles) CTAs."""
    B, H, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    assert q.dtype in _GL_DTYPE and k.dtype == q.dtype and v.dtype == q.dtype
    assert D in (64, 128) and k.shape[-1] == D and v.shape == k.shape and H % Hk == 0
    q, k, v = [t if _tma_ready(t) else t.contiguous() for t in (q, k, v)]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, H, Sq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32) if return_lse else out
    nwg, stages, o_smem = v4_config(D, wg64, o_smem, stages)
    block_m = nwg * WG_M
    n_m = -(-Sq // block_m)
    bh_total = B * H
    n_work = n_m * bh_total
    if swizzle is None:  # causal: one section (global longest-first; static striding then balances the CTAs
        # to 1.03-1.06x the mean in a host simulation, against 1.10-1.44x with L2-sized sections)
        swizzle = bh_total if causal else swizzle_for(bh_total, H // Hk, Sk, D, q.element_size())
    grid = (max(1, min(num_sms, n_work)),)
    _attn_fwd_v4_kernel[grid](
        make_desc(q, WG_M), make_desc(k, BLOCK_N), make_desc(v, BLOCK_N), make_desc(out, WG_M),
        out, out.stride(0), out.stride(1), out.stride(2),
        lse, lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        Sq, Sk, H, H // Hk, scale * LOG2E, n_m, bh_total, n_work, swizzle,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=BLOCK_N, STAGES=stages, CAUSAL=causal, RETURN_LSE=return_lse,
        NUM_WG=nwg, PINGPONG=pingpong, CONSUMER_REGS=consumer_regs_for(D, wg64), O_SMEM=o_smem,
        num_warps=4, maxnreg=maxnreg_for(D, wg64))
    return (out, lse) if return_lse else out


# Driver entries (attn_hopper.py --only v4,v4_pp3): `host` replaces attention_hopper's own launch; `dims` limits
# the head dims checked / timed.
OPTS_V4 = dict(host=attention_hopper_v4, extra=dict(wg64=2, pingpong=False))
OPTS_V4_PP3 = dict(host=attention_hopper_v4, extra=dict(wg64=3, pingpong=True), dims=(64,))
