"""Head dims past the usual: v's head dim D_v other than q/k's D (DeepSeek MLA prefill 192/128, MLA decode 576/512)
and equal head dims from 257 to 512, on every entry point and every backend that runs them (auto, triton: chunked
past 256 columns, torch, naive), against a float64 expectation built from the definition alone
(tests/definitions.py); the kernels with small tiles and key splits in every kernel dtype; gradients (the Triton
backward takes equal head dims up to 256: such calls are differentiated on the tiled path); the clear errors of
SDPA's backends, which cannot run them, and explain()'s reasons."""

import pytest
import torch

import tileattn
import tileattn.flash_attn_compat as fa
from tileattn.integrations.transformers import tileattn_attention_forward
from tileattn.kernels.decode import decode_attention
from tileattn.kernels.prefill import prefill_attention

from conftest import DEVICE, KERNEL_DTYPES
from definitions import expected

# (D, D_v): unequal pairs, then equal head dims past the Triton kernels' 256.
HEAD_DIMS = [(192, 128), (64, 32), (40, 24), (576, 512), (257, 257), (320, 320), (384, 384), (512, 512)]
BACKENDS = ("auto", "triton", "torch", "naive")


def ids(dims):
    return f"{dims[0]}-{dims[1]}"


def close(out, lse, ref, ref_lse, tol=2e-5):
    assert out.shape == ref.shape, f"out {tuple(out.shape)} != expected {tuple(ref.shape)}"
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


def randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def qkv(b, hq, hkv, sq, sk, dims):
    d, d_v = dims
    return randn(b, hq, sq, d), randn(b, hkv, sk, d), randn(b, hkv, sk, d_v)


def cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


# ---- tileattn.attention -------------------------------------------------------------------------------------

# Option sets, Sq = 9 and Sk = 13 unless given: "causal_sq>sk" (Sq 13, Sk 6) leaves its first rows without keys.
OPTIONS = {
    "plain": {}, "causal": dict(causal=True), "causal_sq>sk": dict(causal=True, sq=13, sk=6),
    "window_scale": dict(window=(4, 1), scale=0.3), "mask": dict(mask=True), "softcap": dict(softcap=3.0, causal=True),
    "sinks": dict(sinks=True), "alibi": dict(alibi=True, causal=True),
}


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=ids)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", OPTIONS)
def test_attention(dims, backend, option):
    """GQA 4/2, Sq != Sk both ways."""
    options = dict(OPTIONS[option])
    b, hq, hkv, sq, sk = 2, 4, 2, options.pop("sq", 9), options.pop("sk", 13)
    q, k, v = qkv(b, hq, hkv, sq, sk, dims)
    if options.pop("mask", False):
        mask = torch.rand(b, 1, sq, sk, device=DEVICE) > 0.3
        mask[:, :, 2] = False  # a row that sees no key: zeros of width D_v, lse -inf
        options["mask"] = mask
    if options.pop("sinks", False):
        options["sinks"] = randn(hq)
    if options.pop("alibi", False):
        options["alibi_slopes"] = torch.rand(hq, device=DEVICE)
    out, lse = tileattn.attention(q, k, v, return_lse=True, backend=backend, **options)
    slopes = options.pop("alibi_slopes", None)
    close(out, lse, *expected(q, k, v, slopes=slopes, **options))


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=ids)
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_views(dims, backend):
    """Non-contiguous q/k/v: [B, S, H, D] buffers seen through transpose(1, 2), v cut from a wider buffer, and
    for D_v <= D also v as the first D_v columns of k itself (MLA's latent cache)."""
    (d, d_v), b, hq, hkv, sq, sk = dims, 2, 4, 1, 7, 11
    q = randn(b, sq, hq, d).transpose(1, 2)
    k = randn(b, sk, hkv, d).transpose(1, 2)
    for v in (randn(b, sk, 2 * hkv, d_v + 8)[:, :, ::2, :d_v].transpose(1, 2), k[..., :d_v]):  # every D_v <= D here
        out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        close(out, lse, *expected(q, k, v, causal=True))


@pytest.mark.parametrize("dims", [(192, 128), (512, 512)], ids=ids)
@pytest.mark.parametrize("backend", ["torch", "naive"])
def test_float64(dims, backend):
    q, k, v = (t.double() for t in qkv(1, 2, 2, 5, 8, dims))
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
    assert out.dtype == torch.float64
    close(out, lse, *expected(q, k, v, causal=True), tol=1e-12)


@pytest.mark.parametrize("dims", [(192, 128), (320, 320)], ids=ids)
@pytest.mark.parametrize("backend", ["auto", "triton", "torch"])
def test_gradients_on_the_torch_path(dims, backend):
    """Head dims the Triton backward does not take: calls that ask for gradients run on the tiled path (explain()
    says so), under auto and backend='triton' alike, as for a mask that requires grad."""
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 1, 4, 6, dims))
    if backend == "triton" or (backend == "auto" and DEVICE == "cuda"):  # where it would run on Triton otherwise
        with torch.no_grad():
            assert tileattn.explain(q, k, v, causal=True, backend=backend).backend == "triton"
        decision = tileattn.explain(q, k, v, causal=True, backend=backend)
        assert decision.backend == "torch" and "the Triton backward" in decision.reason
    tileattn.attention(q, k, v, causal=True, backend=backend).square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    expected(q, k, v, causal=True)[0].square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got.double(), t.grad.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dims", [(192, 128), (576, 512)], ids=ids)
@pytest.mark.parametrize("sinks", [False, True])
def test_no_keys(dims, sinks):
    """Calls that launch nothing (no key at all) give zeros of width D_v, lse -inf or the sink."""
    q, k, v = qkv(2, 4, 2, 3, 0, dims)
    sink = randn(4) if sinks else None
    out, lse = tileattn.attention(q, k, v, sinks=sink, return_lse=True)
    assert out.shape == (2, 4, 3, dims[1]) and (out == 0).all()
    assert torch.equal(lse, torch.full_like(lse, float("-inf")) if sink is None else sink[None, :, None].expand_as(lse))


def test_decision_cache_tells_v_head_dims_apart():
    """q and k of one shape with v's head dim equal, then smaller: two decisions (on CPU SDPA's fused kernel for
    the plain equal-dims call, then the tiled path; on CUDA the second one on Triton, never SDPA); the decision
    cache must not hand the first to the second."""
    q, k, v = qkv(1, 2, 2, 16, 16, (64, 64))
    equal = tileattn.explain(q, k, v)
    unequal = tileattn.explain(q, k, v[..., :32])
    assert unequal.backend == ("triton" if DEVICE == "cuda" else "torch") and "v head_dim 32" in unequal.reason
    if DEVICE == "cpu":
        assert equal.backend == "sdpa_flash"
    out = tileattn.attention(q, k, v[..., :32])
    torch.testing.assert_close(out.double(), expected(q, k, v[..., :32])[0], atol=2e-5, rtol=2e-5)


# ---- varlen and KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", HEAD_DIMS, ids=ids)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["causal", "window", "sinks", "alibi"])
def test_varlen(dims, backend, kind):
    """Three packed sequences, one with no keys (its rows: zeros of width D_v, lse -inf or the sink)."""
    (d, d_v), lengths_q, lengths_k, hq, hkv = dims, [5, 3, 8], [9, 0, 6], 4, 2
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q, k, v = randn(sum(lengths_q), hq, d), randn(sum(lengths_k), hkv, d), randn(sum(lengths_k), hkv, d_v)
    options = dict(causal=kind != "window", window=(3, 2) if kind == "window" else None,
                   sinks=randn(hq) if kind == "sinks" else None,
                   alibi_slopes=torch.rand(len(lengths_q), hq, device=DEVICE) if kind == "alibi" else None)
    out, lse = tileattn.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), return_lse=True,
                                         backend=backend, **options)
    assert out.shape == (sum(lengths_q), hq, d_v)
    slopes = options.pop("alibi_slopes")
    for i in range(len(lengths_q)):
        (q0, q1), (k0, k1) = cu_q[i:i + 2].tolist(), cu_k[i:i + 2].tolist()
        seq = [t[a:z][None].transpose(1, 2) for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
        ref, ref_lse = expected(*seq, slopes=None if slopes is None else slopes[i:i + 1], **options)
        close(out[q0:q1].transpose(0, 1)[None], lse[:, q0:q1][None], ref, ref_lse)


def caches(dims, b, hkv, paged):
    """k and v caches with their own head dims, and the block table (None when contiguous). Paged caches are
    stored [num_pages, page_size, Hkv, D] and passed as transpose(1, 2) views, as serving code keeps them."""
    d, d_v = dims
    if not paged:
        return randn(b, hkv, 16, d), randn(b, hkv, 16, d_v), None
    k_pool, v_pool = randn(6, 8, hkv, d).transpose(1, 2), randn(6, 8, hkv, d_v).transpose(1, 2)
    return k_pool, v_pool, torch.tensor([[4, 1], [0, 5]], dtype=torch.int32, device=DEVICE)


def cached_tokens(cache, i, n, table):
    """The first ``n`` tokens of sequence ``i`` as ``[1, Hkv, n, D]``."""
    if table is None:
        return cache[i:i + 1, :, :n]
    return cache[table[i].long()].transpose(0, 1).reshape(1, cache.shape[1], -1, cache.shape[3])[:, :, :n]


@pytest.mark.parametrize("dims", HEAD_DIMS, ids=ids)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("kind", ["append", "sinks", "window", "alibi"])
def test_kvcache(dims, backend, paged, kind):
    """Two sequences with 7 and 0 cached tokens; ``append``: 2 new tokens written before attending (into each
    cache at its own head dim); otherwise sequence 1 sees no key."""
    b, hq, hkv, sq = 2, 4, 2, 2
    k_cache, v_cache, table = caches(dims, b, hkv, paged)
    before = k_cache.clone(), v_cache.clone()
    q = randn(b, hq, sq, dims[0])
    new = dict(k_new=randn(b, hkv, sq, dims[0]), v_new=randn(b, hkv, sq, dims[1])) if kind == "append" else {}
    options = dict(sinks=randn(hq) if kind == "sinks" else None, window=(4, 0) if kind == "window" else None,
                   alibi_slopes=torch.rand(hq, device=DEVICE) if kind == "alibi" else None)
    seqlens = torch.tensor([7, 0], dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, return_lse=True,
                                               backend=backend, **new, **options)
    assert out.shape == (b, hq, sq, dims[1])
    slopes = options.pop("alibi_slopes")
    for i, n in enumerate(seqlens.tolist()):
        keys, values = (cached_tokens(c, i, n, table) for c in before)
        if new:
            keys, values = (torch.cat([old, t[i:i + 1]], dim=2) for old, t in zip((keys, values), new.values()))
            for cache, t in zip((k_cache, v_cache), new.values()):  # the caches now hold the new tokens
                torch.testing.assert_close(cached_tokens(cache, i, n + sq, table)[:, :, n:], t[i:i + 1])
        close(out[i:i + 1], lse[i:i + 1], *expected(q[i:i + 1], keys, values, causal=True, slopes=slopes, **options))


# ---- errors and explain() -----------------------------------------------------------------------------------

SDPA_REFUSES = [((192, 128), "v head_dim 128 != q/k head_dim 192"), ((320, 320), "head_dim 320 > 256")]


@pytest.mark.parametrize("dims,reason", SDPA_REFUSES, ids=["unequal", "over_256"])
@pytest.mark.parametrize("backend", ["sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient"])
def test_sdpa_backends_say_they_cannot_run_it(dims, reason, backend):
    q, k, v = qkv(1, 2, 2, 8, 8, dims)
    message = rf"backend='{backend}' cannot run this call.*{reason}"
    for call in (tileattn.attention, tileattn.explain):
        with pytest.raises(ValueError, match=message):
            call(q, k, v, backend=backend)


def test_shape_errors_name_the_argument():
    q, k, v = qkv(1, 2, 2, 3, 8, (192, 128))
    with pytest.raises(ValueError, match="k head_dim 128 != q head_dim 192"):
        tileattn.attention(q, v, v)
    with pytest.raises(ValueError, match="k and v must have the same heads and length"):
        tileattn.attention(q, k, v[:, :, :5])
    seqlens = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match=r"v_new must be \[B, Hkv, Sq, D_v\] = \[1, 2, 3, 128\]"):
        tileattn.attention_with_kvcache(q, k, v, seqlens, k_new=randn(1, 2, 3, 192), v_new=randn(1, 2, 3, 192))


@pytest.mark.parametrize("dims", [(192, 128), (512, 512)], ids=ids)
def test_explain(dims):
    """auto: the Triton kernels on CUDA, the tiled path on CPU, never SDPA or the calibration (which measure equal
    head dims up to 256 only)."""
    q, k, v = qkv(1, 4, 4, 16, 16, dims)
    decision = tileattn.explain(q, k, v)
    assert decision.backend == ("triton" if DEVICE == "cuda" else "torch")
    assert "SDPA is used for equal head dims up to 256 only" in decision.reason
    assert (f"head_dim {dims[0]}" if dims[0] == dims[1] else f"with v head_dim {dims[1]}") in decision.reason
    biased = tileattn.explain(q, k, v, sinks=randn(4))
    assert biased.backend == ("triton" if DEVICE == "cuda" else "torch")


# ---- the kernels: small tiles, key splits, every kernel dtype -------------------------------------------------

KERNEL_DIMS = [(192, 128), (40, 24), (24, 40), (576, 512), (320, 320), (257, 257)]
TOLERANCE = {torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float32: 2e-5}


@pytest.mark.parametrize("dims", KERNEL_DIMS, ids=ids)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kernels_with_small_tiles(dims, dtype, causal):
    """The prefill kernel with 16 x 32 tiles (block edges in every part of the key range, several column blocks of
    v past 256) and the decode kernel with 3 key splits, with one or several column blocks, against float64."""
    (d, d_v), tol = dims, TOLERANCE[dtype]
    q, k, v = (t.to(dtype) for t in qkv(1, 2, 1, 37, 45, dims))
    window = (-1, 0 if causal else -1)
    out, lse = prefill_attention(q, k, v, window=window, scale=d ** -0.5, return_lse=True, config=(16, 32, 4, 1))
    ref, ref_lse = expected(q, k, v, causal=causal)
    assert out.shape == (1, 2, 37, d_v) and out.dtype == dtype
    close(out, lse, ref, ref_lse, tol)
    # 2 queries per head (a 16-row tile holding all of v's columns), then 20 (40 rows: a 64-row tile whose output
    # is split in 256-column blocks past 256, each program merging its own splits).
    for queries in (2, 20):
        q1 = q[:, :, -queries:]
        out, lse = decode_attention(q1, k, v, None, new_tokens=45, window=window, scale=d ** -0.5, return_lse=True,
                                    num_splits=3, config=(16, 4, 1), reuse_workspace=False)
        ref, ref_lse = expected(q1, k, v, causal=causal)
        close(out, lse, ref, ref_lse, tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="the tiles fitted to the GPU's shared memory")
@pytest.mark.parametrize("heads", [16, 128])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mla_decode_serving_shapes(heads, paged, dtype):
    """MLA decode as DeepSeek-V3 serves it, with the tiles the plan fits to this GPU: one latent KV head of 576
    whose value is its first 512 columns (v a view of the k cache), 16 or 128 query heads, pages of 64 tokens."""
    b, d, d_v, page = 3, 576, 512, 64
    lengths = [300, 1, 129]
    q = randn(b, heads, 1, d, dtype=dtype)
    if paged:
        k_cache = randn(b * 5, page, 1, d, dtype=dtype).transpose(1, 2)
        table = torch.randperm(b * 5, device=DEVICE).view(b, 5).to(torch.int32)
    else:
        k_cache, table = randn(b, 1, 320, d, dtype=dtype), None
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, k_cache[..., :d_v], seqlens, block_table=table,
                                               return_lse=True)
    for i, n in enumerate(lengths):
        keys = cached_tokens(k_cache, i, n, table)
        close(out[i:i + 1], lse[i:i + 1], *expected(q[i:i + 1], keys, keys[..., :d_v], causal=True),
              TOLERANCE[dtype])


# ---- integrations -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [(192, 128), (576, 512), (320, 320)], ids=ids)
def test_flash_attn_func(dims):
    (d, d_v), b, hq, hkv, sq, sk = dims, 2, 4, 2, 5, 9
    q, k, v = randn(b, sq, hq, d), randn(b, sk, hkv, d), randn(b, sk, hkv, d_v)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=True, window_size=(6, -1), return_attn_probs=True)
    assert out.shape == (b, sq, hq, d_v)
    ref, ref_lse = expected(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, window=(6, sk))
    close(out.transpose(1, 2), lse, ref, ref_lse)


@pytest.mark.parametrize("dims", [(192, 128), (576, 512)], ids=ids)
@pytest.mark.parametrize("paged", [False, True], ids=["packed", "paged"])
def test_flash_attn_varlen_func(dims, paged):
    (d, d_v), lengths_q, lengths_k, hq, hkv, page = dims, [4, 1, 6], [7, 3, 6], 4, 2, 4
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    q, k, v = randn(sum(lengths_q), hq, d), randn(sum(lengths_k), hkv, d), randn(sum(lengths_k), hkv, d_v)
    table = None
    keys, values = k, v
    if paged:  # sequence i's keys in pages 2i and 2i + 1 of the pools
        table = torch.arange(6, dtype=torch.int32, device=DEVICE).view(3, 2)
        keys, values = randn(6, page, hkv, d), randn(6, page, hkv, d_v)
        for i, (start, n) in enumerate(zip(cu_k.tolist(), lengths_k)):
            for j in range(n):
                keys[table[i, j // page], j % page], values[table[i, j // page], j % page] = k[start + j], v[start + j]
    out, lse, _ = fa.flash_attn_varlen_func(q, keys, values, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True,
                                            return_attn_probs=True, block_table=table)
    assert out.shape == (sum(lengths_q), hq, d_v)
    for i in range(3):
        (q0, q1), (k0, k1) = cu_q[i:i + 2].tolist(), cu_k[i:i + 2].tolist()
        ref, ref_lse = expected(q[q0:q1][None].transpose(1, 2), k[k0:k1][None].transpose(1, 2),
                                v[k0:k1][None].transpose(1, 2), causal=True)
        close(out[q0:q1].transpose(0, 1)[None], lse[:, q0:q1][None], ref, ref_lse)


@pytest.mark.parametrize("dims", [(192, 128), (576, 512)], ids=ids)
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("new", [2, 3], ids=["fused_append", "separate_append"])
def test_flash_attn_with_kvcache(dims, paged, new):
    """flash-attn 3 takes a v cache of its own head dim; new keys equal in number to the queries are appended by
    the attention call itself, other numbers written first."""
    (d, d_v), b, hq, hkv, sq = dims, 2, 4, 2, 2
    k_cache, v_cache, table = caches(dims, b, hkv, paged)
    k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)  # flash-attn's [.., S, Hkv, D] order
    before = k_cache.transpose(1, 2).clone(), v_cache.transpose(1, 2).clone()
    q, k_new, v_new = randn(b, sq, hq, d), randn(b, new, hkv, d), randn(b, new, hkv, d_v)
    seqlens = torch.tensor([5, 0], dtype=torch.int32, device=DEVICE)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                          causal=True, return_softmax_lse=True)
    assert out.shape == (b, sq, hq, d_v)
    for i, n in enumerate(seqlens.tolist()):
        keys, values = (torch.cat([cached_tokens(c, i, n, table), t[i:i + 1].transpose(1, 2)], dim=2)
                        for c, t in zip(before, (k_new, v_new)))
        ref, ref_lse = expected(q[i:i + 1].transpose(1, 2), keys, values, causal=True)
        close(out[i:i + 1].transpose(1, 2), lse[i:i + 1], ref, ref_lse)


@pytest.mark.parametrize("dims", [(192, 128), (512, 512)], ids=ids)
def test_transformers_attention_function(dims):
    """DeepSeek-V3's MLA calls the attention function with value's head dim 128 under query/key's 192: passed
    through unpadded, out [B, Sq, Hq, D_v]; a padded batch's 2-D mask included."""
    module = torch.nn.Module()
    module.is_causal, module.training = True, False
    q, k, v = qkv(2, 4, 2, 6, 6, dims)
    keep = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    keep[0, :2] = False  # left padding
    out, weights = tileattn_attention_forward(module, q, k, v, keep, scaling=0.1)
    assert weights is None and out.shape == (2, 6, 4, dims[1])
    ref, _ = expected(q, k, v, causal=True, mask=keep[:, None, None, :], scale=0.1)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-5, rtol=2e-5)
