"""tileattn.distributed: context-parallel attention on gloo groups of 2 and 4 CPU processes, against the float64
oracle on the gathered sequence (forward in fp32 under the repo's tolerance rule, gradients in fp64); the block
relation, the layouts and the group checks without processes; one rank on CUDA with NCCL on the GPU.

Spawning costs seconds per process (each imports torch), so each world size is spawned once and runs every case
(``_cases``) inside; a failing case names itself, its world size and its rank."""

import datetime
import random
import traceback
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tileattn
import tileattn.distributed as cp
from tileattn.reference import UNBOUNDED, naive_attention, visible_keys, window_bounds
from tileattn.testing import assert_matches_oracle, random_qkv

from conftest import SEED


# ---- helpers run inside the spawned ranks --------------------------------------------------------------------

def _gather(t):
    """Every rank's tensor, in rank order (shards differ in length: objects, not a tensor collective)."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, t.detach())
    return parts


def _qkv(b, hq, hkv, s, d, dtype, d_v=None, layout="contiguous"):
    q, k, v = random_qkv(b, hq, hkv, s, s, d, dtype=dtype, layout=layout)
    if d_v is not None:
        v = torch.randn(b, hkv, s, d_v, dtype=dtype)
    return q, k, v


def _grads_of(fn, tensors, grad_out, grad_lse):
    """Gradients of ``sum(out * grad_out) + sum(lse * grad_lse)`` for ``(out, lse) = fn(*leaves)``."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out, lse = fn(*leaves)
    ((out * grad_out).sum() + (lse * grad_lse).sum()).backward()
    return [t.grad for t in leaves]


def _assert_close_fp64(got, ref, name):
    err = (got - ref).abs().max().item()
    assert err <= 1e-9 * max(1.0, ref.abs().max().item()), f"{name}: max error {err:.3g} against the fp64 oracle"


def _dense_forward(world, rank, *, s, hq=2, hkv=2, d=16, d_v=None, layout="zigzag", variant="ring",
                   qkv_layout="contiguous", **options):
    q, k, v = _qkv(2, hq, hkv, s, d, torch.float32, d_v, qkv_layout)
    shard = [cp.shard_sequence(t, rank, world, layout) for t in (q, k, v)]
    out, lse = cp.ring_attention(*shard, return_lse=True, layout=layout, variant=variant, **options)
    assert out.shape == (2, hq, shard[0].shape[2], v.shape[-1]) and lse.shape == out.shape[:3]
    outs, lses = _gather(out), _gather(lse)
    if rank == 0:
        assert_matches_oracle(cp.unshard_sequence(outs, layout), q, k, v, cp.unshard_sequence(lses, layout),
                              **options)


def _dense_backward(world, rank, *, s, hq=4, hkv=2, d=8, layout="zigzag", variant="ring", **options):
    q, k, v = _qkv(1, hq, hkv, s, d, torch.float64)
    grad_out, grad_lse = torch.randn(1, hq, s, d, dtype=torch.float64), torch.randn(1, hq, s, dtype=torch.float64)
    shard = [cp.shard_sequence(t, rank, world, layout) for t in (q, k, v, grad_out, grad_lse)]

    def ring(q, k, v):
        return cp.ring_attention(q, k, v, return_lse=True, layout=layout, variant=variant, **options)

    grads = _grads_of(ring, shard[:3], *shard[3:])
    gathered = [cp.unshard_sequence(_gather(g), layout) for g in grads]
    if rank == 0:
        exact = _grads_of(lambda q, k, v: naive_attention(q, k, v, return_lse=True, **options), (q, k, v),
                          grad_out, grad_lse)
        for name, got, ref in zip(("dq", "dk", "dv"), gathered, exact):
            _assert_close_fp64(got, ref, name)


def _varlen(world, rank, *, lengths, dtype=torch.float32, hq=4, hkv=2, d=8, layout="zigzag", variant="ring",
            backward=False, **options):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    total = cu[-1]
    q, k, v = (torch.randn(total, h, d, dtype=dtype) for h in (hq, hkv, hkv))
    grad_out, grad_lse = torch.randn(total, hq, d, dtype=dtype), torch.randn(hq, total, dtype=dtype)
    shard = [cp.shard_varlen(t, torch.tensor(cu, dtype=torch.int32), rank, world, layout) for t in (q, k, v, grad_out)]
    lse_shard = cp.shard_varlen(grad_lse, cu, rank, world, layout, dim=1)

    def ring(q, k, v):
        return cp.ring_attention_varlen(q, k, v, torch.tensor(cu, dtype=torch.int32), return_lse=True,
                                        layout=layout, variant=variant, **options)

    if backward:
        grads = [cp.unshard_varlen(_gather(g), cu, layout) for g in _grads_of(ring, shard[:3], shard[3], lse_shard)]
    else:
        out, lse = ring(*shard[:3])
        out, lse = cp.unshard_varlen(_gather(out), cu, layout), cp.unshard_varlen(_gather(lse), cu, layout, dim=1)
    if rank != 0:
        return
    for b, (a, e) in enumerate(zip(cu, cu[1:])):
        seq = [t[a:e].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, S, D]
        if e == a:
            continue
        if backward:
            exact = _grads_of(lambda q, k, v: naive_attention(q, k, v, return_lse=True, **options), seq,
                              grad_out[a:e].transpose(0, 1)[None], grad_lse[None, :, a:e])
            for name, got, ref in zip(("dq", "dk", "dv"), grads, exact):
                _assert_close_fp64(got[a:e], ref[0].transpose(0, 1), f"sequence {b} {name}")
        else:
            assert_matches_oracle(out[a:e].transpose(0, 1)[None], *seq, lse[None, :, a:e], **options)


def _decode(world, rank, *, sq, causal=True, new=False):
    """A cache of three sequences split by position over the ranks (the last rank holding the newest Sq)."""
    b, hq, hkv, d, s_max = 3, 4, 2, 8, 24
    totals = [9, sq, 17]  # every sequence's tokens, the new ones included
    q = torch.randn(b, hq, sq, d)
    keys = [torch.randn(hkv, n, d) for n in totals]
    values = [torch.randn(hkv, n, d) for n in totals]
    rng = random.Random(zlib.crc32(f"{world}{sq}".encode()))
    cuts = []
    for n in totals:  # rank r holds tokens cut[r] .. cut[r + 1]; the last rank at least sq of them
        inner = sorted(rng.randrange(n - sq + 1) for _ in range(world - 1))
        cuts.append([0, *inner, n])
    k_cache, v_cache = torch.zeros(b, hkv, s_max, d), torch.zeros(b, hkv, s_max, d)
    lengths = torch.zeros(b, dtype=torch.int32)
    last = rank == world - 1
    for i, cut in enumerate(cuts):
        a, e = cut[rank], cut[rank + 1] - (sq if new and last else 0)
        k_cache[i, :, :e - a], v_cache[i, :, :e - a] = keys[i][:, a:e], values[i][:, a:e]
        lengths[i] = e - a
    extra = {}
    if new and last:
        extra = dict(k_new=torch.stack([t[:, -sq:] for t in keys]), v_new=torch.stack([t[:, -sq:] for t in values]))
    out, lse = cp.sharded_attention_with_kvcache(q, k_cache, v_cache, lengths, causal=causal, return_lse=True,
                                                 **extra)
    if rank == 0:
        for i in range(b):
            assert_matches_oracle(out[i:i + 1], q[i:i + 1], keys[i][None], values[i][None], lse[i:i + 1],
                                  causal=causal)


def _errors(world, rank):
    """Refused calls raise on every rank, and the group stays usable (no rank is left inside a collective)."""
    q, k, v = random_qkv(1, 2, 2, 4, 4, 8 if rank else 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="disagree on q/k head_dim"):
        cp.ring_attention(q, k, v)
    q, k, v = random_qkv(1, 2, 2, 4 + (rank == 1), 4 + (rank == 1), 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="shard_sequence"):
        cp.ring_attention(q, k, v)
    q, k, v = random_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="window left" if rank == 1 else r"rank\(s\) \[1\]"):
        cp.ring_attention(q, k, v, window=(-5, 0) if rank == 1 else None)
    with pytest.raises(ValueError, match="'gloo' cannot carry meta tensors"):
        cp.ring_attention(*(t.to("meta") for t in (q, k, v)))
    cache = torch.zeros(1, 2, 8, 8)
    with pytest.raises(ValueError, match="k_new/v_new: only the last rank" if rank == 0 else r"rank\(s\) \[0\]"):
        cp.sharded_attention_with_kvcache(q[:, :, :1], cache, cache, torch.zeros(1, dtype=torch.int32),
                                          k_new=k[:, :, :1] if rank == 0 else None,
                                          v_new=v[:, :, :1] if rank == 0 else None)
    q, k, v = random_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float32)  # after all that, a call still works
    cp.ring_attention(q, k, v, causal=True)


def _cases(world):
    uneven = 4 * world + 3  # not a multiple of 2W: chunks of two sizes
    return {
        "plain": (_dense_forward, dict(s=6 * world)),
        "causal_gqa_uneven": (_dense_forward, dict(s=uneven, hq=4, hkv=2, causal=True)),
        "causal_contiguous": (_dense_forward, dict(s=uneven, causal=True, layout="contiguous")),
        "window": (_dense_forward, dict(s=uneven, window=(5, 2), qkv_layout="bshd")),
        "causal_window_softcap": (_dense_forward, dict(s=uneven, causal=True, window=(6, None), softcap=3.0,
                                                       scale=0.4)),
        "window_contiguous": (_dense_forward, dict(s=uneven, window=(3, 4), layout="contiguous")),
        "head_dim_v": (_dense_forward, dict(s=uneven, d=16, d_v=8, causal=True)),
        "fewer_tokens_than_chunks": (_dense_forward, dict(s=world - 1 or 1, causal=True)),
        "allgather_causal": (_dense_forward, dict(s=uneven, hq=4, hkv=1, causal=True, variant="allgather")),
        "allgather_window": (_dense_forward, dict(s=uneven, window=(4, 0), layout="contiguous",
                                                  variant="allgather")),
        "auto_mqa": (_dense_forward, dict(s=uneven, hq=8, hkv=1, causal=True, variant="auto")),
        "backward_causal_gqa": (_dense_backward, dict(s=uneven, causal=True)),
        "backward_window_contiguous": (_dense_backward, dict(s=uneven, window=(4, 1), layout="contiguous")),
        "backward_softcap": (_dense_backward, dict(s=uneven, softcap=2.0)),
        "backward_allgather": (_dense_backward, dict(s=uneven, causal=True, variant="allgather")),
        "varlen_causal": (_varlen, dict(lengths=[5, 0, 2 * world + 1, 4 * world + 3, 1], causal=True)),
        "varlen_window_contiguous": (_varlen, dict(lengths=[7, 3 * world, 2], window=(3, 2), layout="contiguous")),
        "varlen_allgather": (_varlen, dict(lengths=[3 * world + 1, 4], causal=True, variant="allgather")),
        "varlen_backward": (_varlen, dict(lengths=[2 * world + 3, 0, 5], dtype=torch.float64, causal=True,
                                          backward=True)),
        "decode": (_decode, dict(sq=1)),
        "decode_appending": (_decode, dict(sq=3, new=True)),
        "decode_not_causal": (_decode, dict(sq=2, causal=False)),
        "errors": (_errors, dict()),
    }


def _worker(rank, world, folder, seed):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for name, (check, options) in _cases(world).items():
            torch.manual_seed(seed + zlib.crc32(name.encode()))  # the same inputs on every rank
            try:
                check(world, rank, **options)
            except Exception:
                # The first failure is the one to read: the other ranks then fail on the closed connection.
                with open(f"{folder}/rank{rank}.err", "w") as f:
                    f.write(f"world {world}, rank {rank}, case {name!r}:\n{traceback.format_exc()}")
                raise
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_the_oracle_on_the_gathered_sequence(world, tmp_path):
    try:
        mp.spawn(_worker, args=(world, str(tmp_path), SEED), nprocs=world, join=True)
        return
    except Exception as exc:  # spawn reports whichever rank it noticed first: report the first to fail instead
        failure = exc
    reports = sorted(tmp_path.glob("rank*.err"), key=lambda p: p.stat().st_mtime_ns)
    if not reports:
        raise failure
    pytest.fail("first failure:\n" + reports[0].read_text(), pytrace=False)


# ---- without processes -------------------------------------------------------------------------------------

def test_block_relation_is_the_global_window():
    """Each (query chunk, key chunk) pair becomes one attention call on a sub-block whose bottom-right aligned
    causal/window rule is exactly the global one, every kept row seeing at least one key."""
    rng = random.Random(SEED)
    for _ in range(3000):
        qs, ql, ks, kl = rng.randrange(40), rng.randrange(1, 12), rng.randrange(40), rng.randrange(1, 12)
        left, right = rng.choice([-1, 0, 1, 3, 7, 20]), rng.choice([-1, 0, 1, 2, 9])
        p, g = torch.arange(qs, qs + ql)[:, None], torch.arange(ks, ks + kl)[None, :]
        want = torch.ones(ql, kl, dtype=torch.bool)
        if left != UNBOUNDED:
            want &= g >= p - left
        if right != UNBOUNDED:
            want &= g <= p + right
        got = torch.zeros_like(want)
        block = cp._block(qs, ql, ks, kl, left, right)
        if block is not None:
            sq, sk = block.q1 - block.q0, block.k1 - block.k0
            visible = visible_keys(torch.arange(sq), torch.arange(sk), sk - sq, *window_bounds(block.causal,
                                                                                                block.window))
            got[block.q0:block.q1, block.k0:block.k1] = True if visible is None else visible
            assert got[block.q0:block.q1].any(1).all(), "a kept row sees no key"
        assert torch.equal(got, want), (qs, ql, ks, kl, left, right, block)


def test_zigzag_steps_join_full_pieces():
    """Zigzag with causal: every rank computes the same number of query-key pairs, and a step away from the
    diagonal is one attention call."""
    world, s = 4, 64
    table = cp._plan([s], world, "zigzag")
    work = []
    for rank in range(world):
        pairs = 0
        for step in range(world):
            pieces = cp._pieces(table[rank], table[(rank - step) % world], UNBOUNDED, 0)
            assert len(pieces) == (3 if step == 0 else 1)
            pairs += sum((p.q1 - p.q0) * (p.k1 - p.k0) - (p.causal and (p.q1 - p.q0) * (p.q1 - p.q0 - 1) // 2)
                         for p in pieces)
        work.append(pairs)
    assert len(set(work)) == 1 and sum(work) == s * (s + 1) // 2


@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_shard_and_unshard_are_inverse(layout):
    for world in (1, 2, 3, 5):
        for s in (0, 1, 4, 13):
            x = torch.arange(2 * s).reshape(1, 2, s, 1)
            shards = [cp.shard_sequence(x, r, world, layout) for r in range(world)]
            positions = torch.cat([torch.arange(r.start, r.stop) for rank in range(world)
                                   for r in cp.shard_ranges(s, rank, world, layout)])
            assert torch.equal(torch.sort(positions).values, torch.arange(s))
            assert max(t.shape[2] for t in shards) - min(t.shape[2] for t in shards) <= 2
            assert torch.equal(cp.unshard_sequence(shards, layout), x)
            cu = [0, s, s, s + 3]
            packed = torch.randn(s + 3, 2)
            parts = [cp.shard_varlen(packed, cu, r, world, layout) for r in range(world)]
            assert torch.equal(cp.unshard_varlen(parts, cu, layout), packed)
    assert cp.shard_ranges(10, 1, 2, "zigzag") == [range(3, 6), range(6, 8)]  # chunks 1 and 2 of 3, 3, 2, 2


def test_shards_of_wrong_lengths_are_refused():
    x = torch.zeros(1, 1, 8, 1)
    with pytest.raises(ValueError, match="rank 0 holds 5 tokens"):
        cp.unshard_sequence([x[:, :, :5], x[:, :, :3]], "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        cp.shard_sequence(x, 0, 2, "striped")
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        cp.shard_sequence(x, 2, 2)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        cp.shard_varlen(x[0, 0], [1, 8], 0, 2)


@pytest.mark.parametrize("backend,device,fits", [
    ("gloo", "cpu", True), ("gloo", "cuda", False), ("nccl", "cuda", True), ("nccl", "cpu", False),
    ("cpu:gloo,cuda:nccl", "cuda", True), ("cpu:gloo,cuda:nccl", "cpu", True), ("cuda:nccl", "cpu", False),
])
def test_a_group_must_carry_the_tensors_device(backend, device, fits):
    if fits:
        cp.check_backend_device(backend, torch.device(device))
    else:
        with pytest.raises(ValueError, match=f"group: its backend '{backend}' cannot carry {device} tensors"):
            cp.check_backend_device(backend, torch.device(device))


def test_variant_rule():
    assert cp.choose_variant(4, 32, 8) == "allgather"  # the gathered K/V is as large as the local q
    assert cp.choose_variant(8, 32, 8) == "ring"
    assert cp.choose_variant(2, 16, 16) == "ring"


def _single_rank_group(tmp_path, backend):
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def test_uninitialized_distributed_is_refused():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    q, k, v = random_qkv(1, 2, 2, 4, 4, 8, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="init_process_group"):
        cp.ring_attention(q, k, v)


def _single_rank_equals_attention(device, dtype):
    q, k, v = random_qkv(2, 4, 2, 77, 77, 64, dtype=dtype, device=device, layout="bshd")
    for options in (dict(), dict(causal=True), dict(window=(9, 3)), dict(causal=True, softcap=20.0)):
        for variant in ("ring", "allgather"):
            out, lse = cp.ring_attention(q, k, v, return_lse=True, variant=variant, **options)
            ref, ref_lse = tileattn.attention(q, k, v, return_lse=True, **options)
            assert_matches_oracle(out, q, k, v, lse=lse, **options)
            # The zigzag layout cuts even one rank's sequence in two chunks: a row's blocks come back in q's dtype
            # and merge in fp32, so in bf16 it may differ from one call by a rounding of each block.
            close = dict(atol=2 ** -7, rtol=1.6e-2) if dtype == torch.bfloat16 else {}
            torch.testing.assert_close(out, ref, **close, msg=lambda m, where=f"{options} {variant}": f"{where}: {m}")
            torch.testing.assert_close(lse, ref_lse, msg=lambda m, where=f"{options} {variant}": f"{where}: {m}")
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        cp.ring_attention(*leaves, **options).float().square().sum().backward()
        refs = [t.detach().requires_grad_() for t in (q, k, v)]
        tileattn.attention(*refs, **options).float().square().sum().backward()
        # In bf16 each zigzag piece's backward takes its share of dout rounded to bf16 and gives dK/dV in bf16, then
        # the pieces are summed: a few roundings of partials that may exceed the sum (seen on an H200: 0.031 at one
        # dK element of ~0.88, 8 bf16 ulps, against one call).
        for name, a, b in zip("qkv", leaves, refs):
            torch.testing.assert_close(a.grad, b.grad, atol=5e-2 if dtype != torch.float32 else 1e-4, rtol=1e-2,
                                       msg=lambda m, where=f"d{name} {options}": f"{where}: {m}")


def test_one_rank_equals_attention(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    _single_rank_group(tmp_path, "gloo")
    try:
        _single_rank_equals_attention("cpu", torch.float32)
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_one_rank_on_cuda_with_nccl_equals_attention_and_memory_is_linear(tmp_path):
    if not dist.is_nccl_available():
        pytest.skip("torch.distributed has no NCCL")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    _single_rank_group(tmp_path, "nccl")
    try:
        _single_rank_equals_attention("cuda", torch.bfloat16)
        peaks = []
        for s in (4096, 8192):
            q, k, v = random_qkv(1, 8, 2, s, s, 128, dtype=torch.bfloat16, device="cuda")
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            cp.ring_attention(q, k, v, causal=True, variant="ring")
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
        # linear: doubling S_local at most doubles the memory beyond the inputs (S^2 would quadruple it)
        assert peaks[1] <= 2.2 * peaks[0], f"peak memory beyond the inputs {peaks} for S_local 4096, 8192"
    finally:
        dist.destroy_process_group()

