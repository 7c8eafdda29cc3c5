"""FA3-style attention forward for Hopper (sm_90) in Triton 3.6 Gluon.  Prototype (version 1 of the Hopper prefill kernel; see benchmarks/NOTES.md).

Layout of the work (one CTA = one (batch, head, 128-query block)):
  * 8 warps = two consumer warpgroups.  The wgmma accumulator layout is
    NVMMADistributedLayout(v3, warps_per_cta=[8, 1]), so warpgroup 0 owns query rows 0..63
    and warpgroup 1 rows 64..127 of the tile (each issues m64 wgmmas).  One warpgroup doing
    2 x m64 would need 2 x (S 64 + O 64 + P 32) = 320 regs/thread -> spills; 64 rows per
    warpgroup keeps S (64 regs), O (64 regs for D=128) and P (32 regs) in ~200 registers.
  * Q, K, V, O are addressed by rank-4 TMA descriptors over the [B, H, S, D] tensors
    themselves (block [1, 1, rows, D]): any batch/head/token strides work (16-byte aligned,
    unit stride in D), TMA zero-fills reads past S and clips the O store at S, so no row of a
    neighbouring head is ever read into Q or overwritten in O.  The smem tiles are
    reinterpreted as plain [rows, D] NVMMA tiles for wgmma (same bytes, same swizzle).
  * K and V have separate STAGES-deep rings with their own "ready" mbarriers.
  * Schedule (FA3 intra-warpgroup overlap): iteration j issues S_j = Q K_j^T and then
    O += P_{j-1} V_{j-1} (both async wgmma), waits for S_j only (wgmma_wait(1)), does the
    softmax of tile j while P_{j-1} V_{j-1} runs on the tensor cores, then waits for O,
    rescales it, and refills the two ring slots it has just freed (K_j's and V_{j-1}'s) with
    K_{j+STAGES} / V_{j-1+STAGES}.  A CTA barrier precedes each refill because the slot was read
    by both warpgroups' wgmmas.
  * Softmax in log2 units: scores * (scale * log2 e), exp2, fp32 running max / sum,
    final O / l and lse = (m + log2 l) * ln 2.
  * Causal is bottom-right aligned (query i sees key j <= i + Sk - Sq), the convention of
    tileattn and flash-attn; equal to SDPA's is_causal when Sq == Sk.  Tiles above the
    diagonal are never loaded; only tiles that cut the diagonal or the end of K are masked.

A warp-specialized variant (1-warp TMA producer partition) is in attn_hopper_ws.py.
Run on an H100:  python3 benchmarks/hopper/attn_hopper.py   [--quick] [--only gluon,gluon_ws,ws_deep,v2,pp,pp3,v4,v4_pp3]
                 [--no-bench] [--skip-check] [--no-ws] [--no-pp] [--no-v4] [--sms N] [-v]
(-v: each correctness case is printed, flushed, before it runs and again with its result and seconds, so that a
run cut short by `timeout` names the case it was in; run with python3 -u.)
(v2 / pp: versions 2 and 3, per-warpgroup partitions and ping-pong, in attn_hopper_pp.py; v4 / v4_pp3: version 4,
persistent over min(N, #work tiles) CTAs, N = --sms or the GPU's SM count, in attn_hopper_v4.py; v4_pp3 = 3
consumers + ping-pong, head_dim 64 only, its head_dim-128 columns print nan.)
Measured (H100 80GB HBM3, torch 2.11, Triton 3.6.0): all 48 checks pass for the three variants; bf16
TFLOP/s non-causal S=8192: D=128 495 (ws 500, ws_deep 511) vs cuDNN 668 / flash(FA2) 329; D=64 352 vs
cuDNN 494 / flash 292.
"""

import math
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = 1.4426950408889634
LN2 = gl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# device helpers (shared with attn_hopper_ws.py)
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _tile2d(buf, ROWS: gl.constexpr, D: gl.constexpr):
    """A [1, 1, ROWS, D] TMA tile in shared memory seen as the [ROWS, D] operand wgmma wants."""
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=buf.type.layout.swizzle_byte_width,
                                                element_bitwidth=buf.type.layout.element_bitwidth, rank=2)
    return buf._reinterpret(buf.dtype, [ROWS, D], layout)


@gluon.jit
def _load_tile(desc, bufs, bars, tile, off_b, off_h, pred):
    """TMA-load rows [tile * ROWS, +ROWS) of head (off_b, off_h) into ring slot tile % STAGES."""
    STAGES: gl.constexpr = bufs.type.shape[0]
    ROWS: gl.constexpr = desc.block_type.shape[2]
    slot = tile % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [off_b, off_h, tile * ROWS, 0], bar, bufs.index(slot), pred=pred)


@gluon.jit
def _wait_tile(bufs, bars, tile):
    STAGES: gl.constexpr = bufs.type.shape[0]
    slot = tile % STAGES
    mbarrier.wait(bars.index(slot), (tile // STAGES) & 1)
    return bufs.index(slot)


@gluon.jit
def _softmax_tile(s, m_i, l_i, start_n, full_end, rows, seqlen_k, diag, qk_scale,
                  s_layout: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Fold the raw score tile s = Q K^T (fp32, [M, N]) into (m_i, l_i).  Returns (p, alpha, m, l)
    with p = exp2(s * qk_scale - m) unnormalized and alpha the rescale of earlier output.
    Tiles starting at or past `full_end` are masked (causal diagonal, end of K)."""
    if start_n >= full_end:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        keep = gl.expand_dims(cols < seqlen_k, 0)
        if CAUSAL:
            keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows + diag, 1))
        s = gl.where(keep, s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    if CAUSAL:  # a row may have seen no key yet (Sq > Sk): use 0 so exp2 gives 0, not NaN
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_use, 1))
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               CAUSAL: gl.constexpr):
    """(n_tiles, full_end): key tiles [0, n_tiles) are visited (at least 1, so every row gets its
    l = 0 treatment); tiles whose start >= full_end need elementwise masking."""
    diag = seqlen_k - seqlen_q
    if CAUSAL:
        row_hi = gl.minimum(start_m + BLOCK_M, seqlen_q) - 1
        hi = gl.minimum(gl.maximum(row_hi + diag + 1, 0), seqlen_k)
        full = gl.minimum(gl.maximum(start_m + diag + 1, 0), seqlen_k)
    else:
        hi = seqlen_k
        full = seqlen_k
    n_tiles = gl.maximum(gl.cdiv(hi, BLOCK_N), 1)
    full_end = (full // BLOCK_N) * BLOCK_N
    return n_tiles, full_end, diag


@gluon.jit
def _epilogue(acc, m_i, l_i, q_smem, o_desc, Lse, off_b, off_h, start_m, seqlen_q, stride_lb, stride_lh,
              o_layout: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, RETURN_LSE: gl.constexpr):
    row_l: gl.constexpr = gl.SliceLayout(1, o_layout)
    l_o = gl.convert_layout(l_i, row_l)
    empty = l_o == 0.0
    l_safe = gl.where(empty, 1.0, l_o)
    out = acc * gl.expand_dims(1.0 / l_safe, 1)
    if RETURN_LSE:
        m_o = gl.convert_layout(m_i, row_l)
        lse = gl.where(empty, float("-inf"), (m_o + gl.log2(l_safe)) * LN2)
        rows = start_m + gl.arange(0, BLOCK_M, layout=row_l)
        gl.store(Lse + off_b.to(gl.int64) * stride_lb + off_h.to(gl.int64) * stride_lh + rows, lse,
                 mask=rows < seqlen_q)
    # Q's buffer is free (every wgmma reading it has completed): stage O there for the TMA store.
    gl.thread_barrier()
    _tile2d(q_smem, BLOCK_M, HEAD_DIM).store(out.to(o_desc.dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(o_desc, [off_b, off_h, start_m, 0], q_smem)
    tma.store_wait(0)


# ----------------------------------------------------------------------------------------------
# kernel
# ----------------------------------------------------------------------------------------------
@gluon.jit
def _attn_fwd_kernel(q_desc, k_desc, v_desc, o_desc, Lse, stride_lb, stride_lh,
                     seqlen_q, seqlen_k, num_heads, group_size, qk_scale,
                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     STAGES: gl.constexpr, CAUSAL: gl.constexpr, RETURN_LSE: gl.constexpr):
    NUM_WARPS: gl.constexpr = gl.num_warps()
    dtype: gl.constexpr = q_desc.dtype
    # wgmma accumulators: 8 warps stacked along M -> each warpgroup owns 64 rows.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    srow_l: gl.constexpr = gl.SliceLayout(1, s_layout)
    orow_l: gl.constexpr = gl.SliceLayout(1, o_layout)

    # Heaviest (causal) query blocks first.
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = pid_bh // num_heads
    off_h = pid_bh % num_heads
    off_hk = off_h // group_size
    start_m = pid_m * BLOCK_M
    n_tiles, full_end, diag = _key_range(start_m, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, CAUSAL)
    rows = start_m + gl.arange(0, BLOCK_M, layout=srow_l)

    # Shared memory: Q (reused for O), K and V rings, barriers.
    q_smem = gl.allocate_shared_memory(dtype, q_desc.block_type.shape, q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_bufs = gl.allocate_shared_memory(dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()  # barrier inits visible to the async proxy before TMA uses them

    # Prologue: Q and the first STAGES K/V tiles.
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m, 0], q_bar, q_smem)
    for t in gl.static_range(STAGES):
        _load_tile(k_desc, k_bufs, k_bars, t, off_b, off_hk, t < n_tiles)
        _load_tile(v_desc, v_bufs, v_bars, t, off_b, off_hk, t < n_tiles)

    q = _tile2d(q_smem, BLOCK_M, HEAD_DIM)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, srow_l)
    l_i = gl.zeros([BLOCK_M], gl.float32, srow_l)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)

    # Tile 0: S_0 and its softmax (no P V to overlap with yet).
    mbarrier.wait(q_bar, 0)
    k = _tile2d(_wait_tile(k_bufs, k_bars, 0), BLOCK_N, HEAD_DIM)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
    s, _, _ = warpgroup_mma_wait(0, deps=(s_tok, q, k))
    p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, 0, full_end, rows, seqlen_k, diag, qk_scale,
                                       s_layout, BLOCK_N, CAUSAL)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    gl.thread_barrier()  # both warpgroups are done with K_0
    _load_tile(k_desc, k_bufs, k_bars, STAGES, off_b, off_hk, STAGES < n_tiles)

    for j in range(1, n_tiles):
        # S_j = Q K_j^T, then O += P_{j-1} V_{j-1}; both async.
        k = _tile2d(_wait_tile(k_bufs, k_bars, j), BLOCK_N, HEAD_DIM)
        s_tok = warpgroup_mma(q, k.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        v = _tile2d(_wait_tile(v_bufs, v_bars, j - 1), BLOCK_N, HEAD_DIM)
        o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
        # Softmax of tile j while P_{j-1} V_{j-1} runs.
        s, _, _ = warpgroup_mma_wait(1, deps=(s_tok, q, k))
        p, alpha, m_i, l_i = _softmax_tile(s, m_i, l_i, j * BLOCK_N, full_end, rows, seqlen_k, diag, qk_scale,
                                           s_layout, BLOCK_N, CAUSAL)
        acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, orow_l), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        # Refill the slots K_j and V_{j-1} occupied once both warpgroups have finished with them.
        gl.thread_barrier()
        _load_tile(k_desc, k_bufs, k_bars, j + STAGES, off_b, off_hk, j + STAGES < n_tiles)
        _load_tile(v_desc, v_bufs, v_bars, j - 1 + STAGES, off_b, off_hk, j - 1 + STAGES < n_tiles)

    # Last P V.
    v = _tile2d(_wait_tile(v_bufs, v_bars, n_tiles - 1), BLOCK_N, HEAD_DIM)
    o_tok = warpgroup_mma(p_op, v, acc, is_async=True)
    acc, _ = warpgroup_mma_wait(0, deps=(o_tok, v))

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    _epilogue(acc, m_i, l_i, q_smem, o_desc, Lse, off_b, off_h, start_m, seqlen_q, stride_lb, stride_lh,
              o_layout, BLOCK_M, HEAD_DIM, RETURN_LSE)


# ----------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------
_GL_DTYPE = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16}
BLOCK_M = 128
NUM_WARPS = 8


def config_for(head_dim):
    """(BLOCK_N, STAGES) per head dim.  smem: Q tile + STAGES x (K + V) tiles, 2-byte elements.
    D=64: 16K + 3 x 32K = 112 KB;  D=128: 32K + 2 x 64K = 160 KB (3 stages = 224 KB, too close
    to the 227 KB limit once layout-conversion scratch is added)."""
    return {64: (128, 3), 128: (128, 2)}[head_dim]


def _tma_ready(t):
    """A view TMA can address directly: unit stride in D, other strides 16-byte multiples, 16B-aligned base."""
    es = t.element_size()
    return (t.stride(-1) == 1 and all((s * es) % 16 == 0 for s in t.stride()[:-1])
            and t.data_ptr() % 16 == 0)


def make_desc(t, rows):
    layout = gl.NVMMASharedLayout.get_default_for([1, 1, rows, t.shape[-1]], _GL_DTYPE[t.dtype])
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, t.shape[-1]], layout)


def attention_hopper(q, k, v, causal=False, scale=None, return_lse=False, kernel=None, maxnreg=None, stages=None,
                     block_m=BLOCK_M, qo_rows=None, num_warps=NUM_WARPS, extra=None, host=None):
    """q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D] (fp16/bf16, Hq % Hkv == 0, D in {64, 128}) -> out [B, Hq, Sq, D]
    (and lse fp32 [B, Hq, Sq], natural log, when return_lse).  Causal is bottom-right aligned.
    Launch options for other kernels (attn_hopper_pp): block_m (query rows per CTA), qo_rows (rows of the Q / O
    TMA block, default block_m), num_warps, extra (more constexpr kwargs); maxnreg, stages, block_m, qo_rows,
    num_warps and extra may also be functions of head_dim.  host: another launcher (attn_hopper_v4), called as
    host(q, k, v, causal=, scale=, return_lse=, **extra) instead of this one's launch."""
    if host is not None:
        return host(q, k, v, causal=causal, scale=scale, return_lse=return_lse, **(extra or {}))
    B, H, Sq, D = q.shape
    Hk, Sk = k.shape[1], k.shape[2]
    assert q.dtype in _GL_DTYPE and k.dtype == q.dtype and v.dtype == q.dtype
    assert D in (64, 128) and k.shape[-1] == D and v.shape == k.shape and H % Hk == 0
    q, k, v = [t if _tma_ready(t) else t.contiguous() for t in (q, k, v)]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = torch.empty(B, H, Sq, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32) if return_lse else out
    block_n, default_stages = config_for(D)
    per_d = lambda x: x(D) if callable(x) else x  # noqa: E731
    stages = default_stages if stages is None else per_d(stages)
    block_m, maxnreg, num_warps, extra = per_d(block_m), per_d(maxnreg), per_d(num_warps), per_d(extra) or {}
    qo_rows = block_m if qo_rows is None else per_d(qo_rows)
    grid = (triton.cdiv(Sq, block_m), B * H)
    (kernel or _attn_fwd_kernel)[grid](
        make_desc(q, qo_rows), make_desc(k, block_n), make_desc(v, block_n), make_desc(out, qo_rows),
        lse, lse.stride(0) if return_lse else 0, lse.stride(1) if return_lse else 0,
        Sq, Sk, H, H // Hk, scale * LOG2E,
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CAUSAL=causal, RETURN_LSE=return_lse,
        num_warps=num_warps, **({} if maxnreg is None else dict(maxnreg=maxnreg)), **extra)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# GPU self-test and benchmark
# ----------------------------------------------------------------------------------------------
def _reference(q, k, v, causal, scale):
    """fp32 SDPA reference with a bottom-right causal mask; also the natural-log lse."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        kf, vf = kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        sq, sk = q.shape[2], k.shape[2]
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vf), lse


def check_cases(dims=(64, 128)):
    """The correctness cases of _check: (dtype, D, causal, B, H, Hk, Sq, Sk), head dims limited to `dims`.
    (Also read by spec_count.py, which counts the Triton specializations these cases compile.)"""
    cases = []
    for dtype in (torch.float16, torch.bfloat16):
        for D in (64, 128):
            for causal in (False, True):
                # the last three (session 7, for the persistent v4): many work tiles per CTA (4 x 32 heads x 5-8
                # query blocks >> 132 CTAs, GQA 4), and Sq != Sk both ways with several tiles per CTA
                for (B, H, Hk, Sq, Sk) in ((2, 4, 4, 128, 128), (1, 3, 3, 200, 200), (2, 2, 1, 1000, 1000),
                                           (1, 2, 2, 4096, 4096), (1, 2, 2, 300, 517), (1, 2, 2, 517, 300),
                                           (4, 32, 8, 1000, 1000), (2, 8, 2, 700, 1500), (2, 8, 8, 1500, 700)):
                    cases.append((dtype, D, causal, B, H, Hk, Sq, Sk))
    return [c for c in cases if c[1] in dims]


def _check(fn, name, opts):
    """-v: each case is printed (flushed) BEFORE it runs, then its result with the seconds it took (the first
    case of each (dtype, D, causal) includes the kernel's compile), so a run cut short by `timeout` names the
    case it stopped in."""
    import time
    verbose = "-v" in sys.argv
    torch.manual_seed(0)
    cases = check_cases(opts.get("dims", (64, 128)))
    opts = {n: o for n, o in opts.items() if n != "dims"}
    bad = 0
    t_all = time.perf_counter()
    for i, (dtype, D, causal, B, H, Hk, Sq, Sk) in enumerate(cases):
        desc = (f"{str(dtype)[6:]:8s} D={D:3d} causal={causal!s:5s} B={B} H={H}/{Hk} Sq={Sq} Sk={Sk}")
        if verbose:
            print(f"[{name}] case {i + 1}/{len(cases)} {desc} ...", flush=True)
        t0 = time.perf_counter()
        q = torch.randn(B, H, Sq, D, device="cuda", dtype=dtype)
        k = torch.randn(B, Hk, Sk, D, device="cuda", dtype=dtype)
        v = torch.randn(B, Hk, Sk, D, device="cuda", dtype=dtype)
        scale = D ** -0.5
        out, lse = attention_hopper(q, k, v, causal=causal, return_lse=True, kernel=fn, **opts)
        torch.cuda.synchronize()  # the kernel itself has finished (a hang stops here, after the line above)
        t_kernel = time.perf_counter() - t0
        ref, ref_lse = _reference(q, k, v, causal, scale)
        err = (out.float() - ref).abs().max().item()
        fin = torch.isfinite(ref_lse)
        lerr = (lse[fin] - ref_lse[fin]).abs().max().item() if fin.any() else 0.0
        lse_ok = bool(torch.equal(torch.isinf(lse), ~fin))
        ok = err < (2e-2 if dtype == torch.bfloat16 else 4e-3) and lerr < 1e-3 and lse_ok
        if Sq == Sk and Hk == H:  # also against SDPA itself (top-left causal == bottom-right here)
            sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            ok = ok and (out.float() - sdpa.float()).abs().max().item() < (2e-2 if dtype == torch.bfloat16 else 4e-3)
        bad += not ok
        if not ok or verbose:
            print(f"[{name}] {'ok ' if ok else 'BAD'} {desc}: max|err|={err:.2e} lse err={lerr:.2e} "
                  f"lse_inf_ok={lse_ok}  ({t_kernel:.1f} s kernel incl. any compile, "
                  f"{time.perf_counter() - t0:.1f} s case)", flush=True)
    print(f"[{name}] {len(cases) - bad}/{len(cases)} correctness cases pass ({time.perf_counter() - t_all:.0f} s)",
          flush=True)
    return bad == 0


def _time(fn, iters=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _bench(kernels):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    sdpa = torch.nn.functional.scaled_dot_product_attention
    print(f"{'dtype':5s} {'D':>3s} {'causal':>6s} {'S':>5s} {'BxH':>5s} | "
          + " ".join(f"{n:>9s}" for n in list(kernels) + ["cudnn", "flash"]) + "   (TFLOP/s)")
    quick = "--quick" in sys.argv
    for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)):
        for D in (64, 128):
            for causal in (False, True):
                for S in ((1024, 8192) if quick else (512, 1024, 2048, 4096, 8192)):
                    BH = max(16, (16 * 16384) // S)
                    B, H = BH // 16, 16
                    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype) for _ in range(3))
                    flops = 4 * B * H * S * S * D / (2 if causal else 1)
                    res = []
                    for fn, opts in kernels.values():
                        if D not in opts.get("dims", (64, 128)):
                            res.append(float("nan"))
                            continue
                        opts = {n: o for n, o in opts.items() if n != "dims"}
                        ms = _time(lambda: attention_hopper(q, k, v, causal=causal, return_lse=True, kernel=fn, **opts))
                        res.append(flops / ms / 1e9)
                    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                        try:
                            with sdpa_kernel([backend]):
                                ms = _time(lambda: sdpa(q, k, v, is_causal=causal))
                            res.append(flops / ms / 1e9)
                        except RuntimeError:
                            res.append(float("nan"))
                    print(f"{str(dtype)[6:]:5s} {D:3d} {causal!s:>6s} {S:5d} {BH:5d} | "
                          + " ".join(f"{r:9.1f}" for r in res))


if __name__ == "__main__":
    kernels = {"gluon": (_attn_fwd_kernel, {})}
    if "--no-ws" not in sys.argv:
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import attn_hopper_ws as W
        kernels["gluon_ws"] = (W._attn_fwd_ws_kernel, dict(maxnreg=W.MAXNREG))
        # deeper K/V rings: D=128 -> 3 stages (224 KB smem), D=64 -> 4 stages (144 KB)
        kernels["ws_deep"] = (W._attn_fwd_ws_kernel, dict(maxnreg=W.MAXNREG, stages=W.deep_stages))
    if "--no-pp" not in sys.argv:  # versions 2 (per-warpgroup partitions) and 3 (+ ping-pong): attn_hopper_pp.py
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import attn_hopper_pp as P
        kernels["v2"] = (P._attn_fwd_pp_kernel, P.OPTS_V2)
        kernels["pp"] = (P._attn_fwd_pp_kernel, P.OPTS_V3)
        kernels["pp3"] = (P._attn_fwd_pp_kernel, P.OPTS_V3_WG3)  # 3 consumers at D=64 (same as pp at D=128)
    if "--no-v4" not in sys.argv:  # version 4, persistent: attn_hopper_v4.py
        import os
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import attn_hopper_v4 as V4
        sms = (int(sys.argv[sys.argv.index("--sms") + 1]) if "--sms" in sys.argv
               else torch.cuda.get_device_properties(0).multi_processor_count)
        kernels["v4"] = (None, dict(V4.OPTS_V4, extra=dict(V4.OPTS_V4["extra"], num_sms=sms)))
        kernels["v4_pp3"] = (None, dict(V4.OPTS_V4_PP3, extra=dict(V4.OPTS_V4_PP3["extra"], num_sms=sms)))  # D=64 only
    if "--only" in sys.argv:
        only = sys.argv[sys.argv.index("--only") + 1].split(",")
        kernels = {n: kv for n, kv in kernels.items() if n in only}
    ok = {}
    for name, (fn, opts) in kernels.items():
        if "--skip-check" in sys.argv:
            ok[name] = True
            continue
        try:
            ok[name] = _check(fn, name, opts)
        except Exception as e:  # noqa: BLE001  (keep going: report the other kernel)
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[-2000:]}")
            ok[name] = False
    good = {n: kv for n, kv in kernels.items() if ok[n]}
    if good and "--no-bench" not in sys.argv:
        _bench(good)
