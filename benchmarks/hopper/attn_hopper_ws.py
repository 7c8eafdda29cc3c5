"""Warp-specialized variant of attn_hopper.py (Triton 3.6 Gluon, sm_90).  Prototype (version 1 of the Hopper prefill kernel; see benchmarks/NOTES.md).

Same tiles, layouts, softmax and schedule as attn_hopper._attn_fwd_kernel, split in two partitions:
  * default partition (8 warps = the two consumer warpgroups): wgmma + softmax + epilogue.  It never
    issues TMA; after each tile it releases the ring slots it has finished with (K_j after S_j,
    V_{j-1} after P_{j-1} V_{j-1}) by arriving on "empty" mbarriers.  mbarrier.arrive lowers to a
    single arrive from the partition's thread 0, so a partition barrier (gl.thread_barrier) first
    makes sure both warpgroups' wgmmas are done with the slot.
  * worker partition (1 warp, 24 registers): the TMA producer.  Loads Q, then K_t / V_t into the
    rings, waiting on the "empty" barrier of the slot first (parity trick: the first pass over each
    slot waits on phase 1 of a fresh barrier, which returns at once).
Registers: 8 + 4 (the 1-warp worker is rounded up to a warpgroup) warps = 384 threads; maxnreg=168
gives 168 * 384 = 64512 registers; the worker gives back to 24, leaving (64512 - 24 * 128) / 256 = 240
for the consumers (setmaxnreg).
"""

import os
import sys

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attn_hopper import (  # noqa: E402
    BLOCK_M, _epilogue, _key_range, _softmax_tile, _tile2d, _wait_tile, attention_hopper as _attention_hopper,
    config_for as _config_v1,
)

NUM_WARPS = 8
MAXNREG = 168
PRODUCER_REGS = 24


def config_for(head_dim):
    return _config_v1(head_dim)


def deep_stages(head_dim):
    return {64: 4, 128: 3}[head_dim]


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
              off_b, off_h, off_hk, start_m, n_tiles):
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[2]
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m, 0], q_bar, q_smem)
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
def _consumer(q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, Lse,
              off_b, off_h, start_m, n_tiles, full_end, diag, seqlen_q, seqlen_k, qk_scale, stride_lb, stride_lh,
              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
              RETURN_LSE: gl.constexpr):
    STAGES: gl.constexpr = k_bufs.type.shape[0]
    NUM_WARPS: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = o_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    rows = start_m + gl.arange(0, BLOCK_M, layout=srow_l)

    q = _tile2d(q_smem, BLOCK_M, HEAD_DIM)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, srow_l)
    l_i = gl.zeros([BLOCK_M], gl.float32, srow_l)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    mbarrier.wait(q_bar, 0)
    k = _tile2d(_wait_tile(k_bufs, k_ready, 0), BLOCK_N, HEAD_DIM)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s, _, _ = warpgroup_mma_wait(0, deps=(s_tok, q, k))
    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, 0, full_end, rows, seqlen_k, diag, qk_scale,
                                       s_layout, BLOCK_N, CAUSAL)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    gl.thread_barrier()
    mbarrier.arrive(k_empty.index(0))

    for j in range(1, n_tiles):
        k = _tile2d(_wait_tile(k_bufs, k_ready, j), BLOCK_N, HEAD_DIM)
        s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        v = _tile2d(_wait_tile(v_bufs, v_ready, j - 1), BLOCK_N, HEAD_DIM)
        o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        s, _, _ = warpgroup_mma_wait(1, deps=(s_tok, q, k))
        p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, j * BLOCK_N, full_end, rows, seqlen_k, diag, qk_scale,
                                           s_layout, BLOCK_N, CAUSAL)
        acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        gl.thread_barrier()  # both consumer warpgroups are done with K_j and V_{j-1}
        mbarrier.arrive(k_empty.index(j % STAGES))
        mbarrier.arrive(v_empty.index((j - 1) % STAGES))

    v = _tile2d(_wait_tile(v_bufs, v_ready, n_tiles - 1), BLOCK_N, HEAD_DIM)
    o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))
    _epilogue(acc, m_i, l_i, q_smem, o_desc, Lse, off_b, off_h, start_m, seqlen_q, stride_lb, stride_lh,
              o_layout, BLOCK_M, HEAD_DIM, RETURN_LSE)


@gluon.jit
def _attn_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, Lse, stride_lb, stride_lh,
                        seqlen_q, seqlen_k, num_heads, group_size, qk_scale,
                        HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                        STAGES: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr):
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // group_size
    start_m = pid_m * BLOCK_M
    n_tiles, full_end, diag = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)

    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer, (q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty, o_desc, Lse,
                     off_b, off_h, start_m, n_tiles, full_end, diag, seqlen_q, seqlen_k, qk_scale, stride_lb,
                     stride_lh, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, RETURN_LSE)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, k_ready, v_ready, k_empty, v_empty,
                     off_b, off_h, off_hk, start_m, n_tiles)),
    ], [1], [PRODUCER_REGS_C])


PRODUCER_REGS_C = gl.constexpr(PRODUCER_REGS)


def attention_hopper_ws(q, k, v, causal=False, scale=None, return_lse=False):  # noqa: D103
    return _attention_hopper(q, k, v, causal=causal, scale=scale, return_lse=return_lse,
                             kernel=_attn_fwd_ws_kernel, maxnreg=MAXNREG)
