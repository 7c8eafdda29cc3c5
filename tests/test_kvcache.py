"""``attention_with_kvcache`` (split-KV decode over contiguous and paged caches), ``attention_varlen``,
``merge_attention`` and ``PagedKVCache``, against the float64 oracle."""

import pytest
import torch

import tileattn
from tileattn.cache import PagedKVCache
from tileattn.reference import gather_cache
from tileattn.testing import assert_matches_oracle, oracle, random_qkv

from conftest import DEVICE, KERNEL_DTYPES

BACKENDS = ["triton", "torch"]


def make_cache(b, hkv, d, lengths, *, page_size, dtype, capacity=None):
    """A cache holding random tokens: contiguous ``[B, Hkv, S_max, D]`` (page_size None) or paged with a
    shuffled block table and token-major page storage seen through ``transpose(1, 2)``."""
    capacity = capacity or max(lengths) + 16
    if page_size is None:
        k = torch.randn(b, capacity, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)  # strided [B, Hkv, S, D]
        v = torch.randn(b, capacity, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
        return k, v, None
    pages_per_seq = -(-capacity // page_size)
    num_pages = b * pages_per_seq + 3
    k = torch.randn(num_pages, page_size, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
    v = torch.randn(num_pages, page_size, hkv, d, device=DEVICE).to(dtype).transpose(1, 2)
    table = torch.randperm(num_pages, device=DEVICE)[: b * pages_per_seq].view(b, pages_per_seq).to(torch.int32)
    return k, v, table


def check_against_oracle(out, lse, q, k_cache, v_cache, lengths, table, **options):
    """Each sequence's rows against the oracle over its first ``lengths[b]`` cached tokens."""
    for b, length in enumerate(lengths):
        k = gather_cache(k_cache, b, length, table)[None]
        v = gather_cache(v_cache, b, length, table)[None]
        assert_matches_oracle(out[b:b + 1], q[b:b + 1], k, v, lse=lse[b:b + 1], **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("page_size", [None, 16, 32, 64, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("sq", [1, 2, 7])
def test_decode_matches_oracle(backend, dtype, page_size, group, sq):
    b, hkv, d = 3, 2, 64
    lengths = [0, 1, 300] if sq == 1 else [5, 77, 300]  # an empty cache decodes to 0 (seen through causal)
    k_cache, v_cache, table = make_cache(b, hkv, d, lengths, page_size=page_size, dtype=dtype)
    q = torch.randn(b, sq, hkv * group, d, device=DEVICE).to(dtype).transpose(1, 2)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, return_lse=True,
                                               backend=backend)
    check_against_oracle(out, lse, q, k_cache, v_cache, lengths, table, causal=True)


@pytest.mark.parametrize("page_size", [None, 16])
@pytest.mark.parametrize("options", [dict(window=(40, None)), dict(softcap=4.0), dict(causal=False),
                                     dict(window=(10, 3), causal=False)], ids=str)
def test_decode_options(page_size, options):
    lengths = [129, 64]
    k_cache, v_cache, table = make_cache(2, 2, 80, lengths, page_size=page_size, dtype=torch.float16)
    q = torch.randn(2, 8, 3, 80, device=DEVICE, dtype=torch.float16)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, return_lse=True,
                                               backend="triton", **options)
    check_against_oracle(out, lse, q, k_cache, v_cache, lengths, table, **{"causal": True, **options})


@pytest.mark.parametrize("page_size", [None, 32])
def test_num_splits_all_agree(page_size):
    lengths = [700, 33, 257]
    k_cache, v_cache, table = make_cache(3, 2, 64, lengths, page_size=page_size, dtype=torch.float32)
    q = torch.randn(3, 8, 1, 64, device=DEVICE)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    results = [tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, block_table=table, return_lse=True,
                                               num_splits=n, backend="triton") for n in range(1, 17)]
    check_against_oracle(*results[0], q, k_cache, v_cache, lengths, table, causal=True)
    for n, (out, lse) in enumerate(results[1:], start=2):
        torch.testing.assert_close(out, results[0][0], rtol=1e-5, atol=1e-5, msg=f"num_splits={n}")
        torch.testing.assert_close(lse, results[0][1], rtol=1e-5, atol=1e-5, msg=f"num_splits={n}")


def test_more_splits_than_one_merge_load():
    """The last split merges the others' partials 64 LSEs per load: 70 splits take two loads. A capacity of 70 x 128
    keys gives 70 splits of 128 keys whatever the key block (32 to 128: a split is a whole number of blocks)."""
    length = 70 * 128 - 5
    k_cache, v_cache, table = make_cache(1, 1, 16, [length], page_size=None, dtype=torch.float32, capacity=70 * 128)
    q = torch.randn(1, 2, 1, 16, device=DEVICE)
    seqlens = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, return_lse=True, num_splits=70,
                                               backend="triton")
    check_against_oracle(out, lse, q, k_cache, v_cache, [length], table, causal=True)


@pytest.mark.parametrize("kind", ["bool", "additive"])
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_kernel_mask(kind, num_splits):
    """The split kernel's mask (what ``tileattn.attention`` hands it for decode-shaped calls): a left-padding
    mask read as a stride-0 view over heads and queries, or a per-head additive one; a fully masked sequence;
    rows past the last query head of a tile (G * Sq = 12 of 16)."""
    from tileattn.kernels.decode import decode_attention

    b, hkv, group, sq, sk, d = 3, 2, 4, 3, 400, 64
    q, k, v = random_qkv(b, hkv * group, hkv, sq, sk, d, dtype=torch.float16, device=DEVICE)
    pad = torch.tensor([0, 137, sk], device=DEVICE)  # left padding per sequence; the last one sees nothing
    keep = torch.arange(sk, device=DEVICE)[None, :] >= pad[:, None]
    if kind == "bool":
        mask = keep[:, None, None, :].expand(b, hkv * group, sq, sk)
    else:
        bias = torch.randn(1, hkv * group, sq, sk, device=DEVICE)
        mask = torch.where(keep[:, None, None, :], bias, float("-inf")).expand(b, -1, -1, -1)
    lengths = torch.full((b,), sk, dtype=torch.int32, device=DEVICE)
    out, lse = decode_attention(q, k, v, lengths, new_tokens=0, window=(-1, 0), scale=d ** -0.5, mask=mask,
                                return_lse=True, num_splits=num_splits)
    assert_matches_oracle(out, q, k, v, lse=lse, causal=True, mask=mask)
    assert (out[2] == 0).all() and (lse[2] == float("-inf")).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 16, 64])
@pytest.mark.parametrize("sq", [1, 7])
def test_append_then_attend(backend, page_size, sq):
    """k_new/v_new are written at cache_seqlens (crossing page boundaries), then attended with the cache."""
    lengths = [15, 60, 0]
    k_cache, v_cache, table = make_cache(3, 2, 32, lengths, page_size=page_size, dtype=torch.float16, capacity=80)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q, k_new, v_new = random_qkv(3, 4, 2, sq, sq, 32, dtype=torch.float16, device=DEVICE)
    seqlens = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               block_table=table, return_lse=True, backend=backend)
    for b, length in enumerate(lengths):
        k = gather_cache(k_cache, b, length + sq, table)
        assert torch.equal(k[:, length:], k_new[b]) and torch.equal(gather_cache(v_cache, b, length + sq, table)[:, length:], v_new[b])
        assert torch.equal(k[:, :length], gather_cache(before_k, b, length, table))  # older tokens untouched
    check_against_oracle(out, lse, q, k_cache, v_cache, [n + sq for n in lengths], table, causal=True)
    assert torch.equal(seqlens.cpu(), torch.tensor(lengths, dtype=torch.int32))  # not advanced by the call
    del before_v


def test_kvcache_validation():
    k_cache, v_cache, table = make_cache(2, 2, 16, [4, 4], page_size=16, dtype=torch.float32, capacity=32)
    q = torch.randn(2, 4, 1, 16, device=DEVICE)
    ok = torch.tensor([4, 4], dtype=torch.int32, device=DEVICE)
    call = tileattn.attention_with_kvcache
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        call(q, k_cache, v_cache, ok.long(), block_table=table)
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        call(q, k_cache, v_cache, torch.tensor([4, 40], dtype=torch.int32, device=DEVICE), block_table=table)
    bad_table = table.clone()
    bad_table[1, 0] = 10_000
    with pytest.raises(ValueError, match="page ids outside"):
        call(q, k_cache, v_cache, ok, block_table=bad_table)
    with pytest.raises(ValueError, match="k_new and v_new must be given together"):
        call(q, k_cache, v_cache, ok, block_table=table, k_new=torch.randn(2, 2, 1, 16, device=DEVICE))
    with pytest.raises(ValueError, match="k_new must be"):
        call(q, k_cache, v_cache, ok, block_table=table, k_new=torch.randn(2, 2, 3, 16, device=DEVICE),
             v_new=torch.randn(2, 2, 3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="num_splits must be"):
        call(q, k_cache, v_cache, ok, block_table=table, num_splits=-1)
    with pytest.raises(ValueError, match="block_table must be"):
        call(q, k_cache, v_cache, ok, block_table=table[:1])


# ---- varlen ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("num_seqs", [1, 5, 64])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_attention(backend, dtype, num_seqs, causal):
    hq, hkv, d = 4, 2, 48
    longest = 150 if num_seqs < 64 else 40
    len_q = torch.randint(0, longest, (num_seqs,))
    len_q[0] = 1
    len_k = len_q + torch.randint(0, 20, (num_seqs,)) if causal else torch.randint(0, longest, (num_seqs,))
    cu_q = torch.cat([torch.zeros(1, dtype=torch.long), len_q.cumsum(0)]).to(torch.int32).to(DEVICE)
    cu_k = torch.cat([torch.zeros(1, dtype=torch.long), len_k.cumsum(0)]).to(torch.int32).to(DEVICE)
    q = torch.randn(int(len_q.sum()), hq, d, device=DEVICE).to(dtype)
    kv = torch.randn(int(len_k.sum()), 2, hkv, d, device=DEVICE).to(dtype)  # packed kv: strided views
    k, v = kv[:, 0], kv[:, 1]
    out, lse = tileattn.attention_varlen(q, k, v, cu_q, cu_k, int(len_q.max()), int(len_k.max()), causal=causal,
                                         return_lse=True, backend=backend)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])
    for b in range(num_seqs):
        (q0, q1), (k0, k1) = cu_q[b:b + 2].tolist(), cu_k[b:b + 2].tolist()
        seq = [t[None].transpose(1, 2) for t in (q[q0:q1], k[k0:k1], v[k0:k1])]
        assert_matches_oracle(out[q0:q1][None].transpose(1, 2), *seq, lse=lse[:, q0:q1][None], causal=causal)


def test_varlen_validation():
    q, k, v = torch.randn(10, 2, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(ValueError, match="must start at 0, never decrease and end at 10"):
        tileattn.attention_varlen(q, k, v, torch.tensor([0, 4, 9], dtype=torch.int32), cu_k, 6, 7)
    with pytest.raises(ValueError, match="exceeds the max_seqlen"):
        tileattn.attention_varlen(q, k, v, cu, cu_k, 5, 7)
    with pytest.raises(TypeError, match="cu_seqlens_k must be int32"):
        tileattn.attention_varlen(q, k, v, cu, cu_k.long(), 6, 7)
    with pytest.raises(ValueError, match="q must have 3 dims"):
        tileattn.attention_varlen(q[None], k, v, cu, cu_k, 6, 7)


# ---- merge ---------------------------------------------------------------------------------------

def test_merge_identity():
    """Attention over keys A and over keys B, merged, equals attention over A + B; empty sides are neutral."""
    q, k, v = random_qkv(2, 4, 2, 9, 50, 32, dtype=torch.float64)
    out_a, lse_a = oracle(q, k[:, :, :20], v[:, :, :20])
    out_b, lse_b = oracle(q, k[:, :, 20:], v[:, :, 20:])
    out, lse = tileattn.merge_attention(out_a, lse_a, out_b, lse_b)
    ref, ref_lse = oracle(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)  # fp64 in, fp64 merge
    empty_out, empty_lse = torch.zeros_like(out_a), torch.full_like(lse_a, float("-inf"))
    same, same_lse = tileattn.merge_attention(out_a, lse_a, empty_out, empty_lse)
    torch.testing.assert_close(same, out_a)
    torch.testing.assert_close(same_lse, lse_a)
    none, none_lse = tileattn.merge_attention(empty_out, empty_lse, empty_out, empty_lse)
    assert (none == 0).all() and (none_lse == float("-inf")).all()
    with pytest.raises(ValueError, match="expected out_a, out_b of one shape"):
        tileattn.merge_attention(out_a, lse_a, out_b[..., :4], lse_b)


# ---- PagedKVCache ----------------------------------------------------------------------------------

def test_paged_cache_serving_loop():
    """Prefill two sequences, decode token by token across page boundaries (the kernel writing each new
    token through the block table), free one, reuse its pages."""
    cache = PagedKVCache(num_pages=12, page_size=16, kv_heads=2, head_dim=32, max_seqs=4, max_pages_per_seq=5,
                         dtype=torch.float16, device=DEVICE)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    history = {}
    for seq, n in zip(seqs, (30, 7)):
        k, v = (torch.randn(2, n, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
        cache.append(seq, k, v)
        history[seq] = k
    for _ in range(5):
        q = torch.randn(2, 4, 1, 32, device=DEVICE, dtype=torch.float16)
        k_new, v_new = (torch.randn(2, 2, 1, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
        for seq in seqs:
            cache.reserve(seq, 1)
        args = cache.kernel_args(seqs)
        out, lse = tileattn.attention_with_kvcache(q, **args, k_new=k_new, v_new=v_new, return_lse=True,
                                                   backend="triton")
        lengths = [cache.length(s) + 1 for s in seqs]
        check_against_oracle(out, lse, q, args["k_cache"], args["v_cache"], lengths, args["block_table"], causal=True)
        for i, seq in enumerate(seqs):
            cache.advance(seq, 1)
            history[seq] = torch.cat([history[seq], k_new[i]], 1)
    for seq in seqs:
        stored = gather_cache(cache.k_pool.transpose(1, 2), 0, cache.length(seq), cache.block_table[seq:seq + 1])
        assert torch.equal(stored, history[seq])
    free_before = cache.num_free_pages
    cache.free_sequence(seqs[0])
    assert cache.num_free_pages == free_before + 3  # 35 tokens in 16-token pages
    assert cache.add_sequence() == seqs[0]


def test_paged_cache_misuse_changes_nothing():
    cache = PagedKVCache(num_pages=4, page_size=8, kv_heads=1, head_dim=16, max_seqs=2, max_pages_per_seq=3)
    seq = cache.add_sequence()
    k = torch.randn(1, 20, 16, dtype=torch.float16)
    cache.append(seq, k, k)
    state = (cache.num_free_pages, cache.length(seq), cache.block_table.clone(), cache.k_pool.clone())
    with pytest.raises(ValueError, match="more than max_pages_per_seq=3"):
        cache.append(seq, torch.randn(1, 5, 16, dtype=torch.float16), torch.randn(1, 5, 16, dtype=torch.float16))
    other = cache.add_sequence()
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.append(other, torch.randn(1, 17, 16, dtype=torch.float16), torch.randn(1, 17, 16, dtype=torch.float16))
    with pytest.raises(TypeError, match="must be torch.float16"):
        cache.append(seq, k.float(), k.float())
    with pytest.raises(ValueError, match="kv_heads=1"):
        cache.append(seq, torch.randn(2, 1, 16, dtype=torch.float16), torch.randn(2, 1, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="not an active sequence"):
        cache.append(7, k, k)
    with pytest.raises(ValueError, match="room for"):
        cache.advance(seq, 5)
    assert cache.num_free_pages == state[0] and cache.length(seq) == state[1]
    assert torch.equal(cache.block_table[seq], state[2][seq]) and torch.equal(cache.k_pool, state[3])


@pytest.mark.parametrize("paged", [False, True])
def test_split_policy_invariants(paged):
    from tileattn.kernels.decode import MAX_SPLITS, choose_num_splits

    for batch, kv_heads, keys in [(1, 8, 16384), (1, 32, 128), (100, 8, 2048), (512, 32, 4096), (1, 1, 10**6)]:
        splits = choose_num_splits(batch, kv_heads, 1, keys, 132, 128, paged)
        assert 1 <= splits <= MAX_SPLITS
        assert splits == 1 or keys // splits >= 4 * 128  # never fewer than 4 key blocks per split
    # A batch that fills the GPU: no split when contiguous; paged keeps two (block-table latency hiding).
    assert choose_num_splits(512, 32, 1, 4096, 132, 128, paged) == (2 if paged else 1)
    assert choose_num_splits(512, 32, 1, 256, 132, 128, paged) == 1  # too few keys to split


def test_small_grids_get_the_half_tile():
    from tileattn.kernels.decode import _DECODE_CONFIG, _SMALL_GRID_CONFIG, choose_config, choose_num_splits

    assert choose_config(1, 8, 1, 132) == _SMALL_GRID_CONFIG
    assert choose_config(1, 8, 1, 132, page_size=64) == _SMALL_GRID_CONFIG
    assert choose_config(1, 8, 1, 132, page_size=16)[0] == _DECODE_CONFIG[0]  # full-width tile, gathered by key
    assert choose_config(64, 32, 1, 132) == _DECODE_CONFIG
    # two half-tile programs fit an SM: about one program per SM in all
    assert choose_num_splits(1, 8, 1, 16384, 132, _SMALL_GRID_CONFIG[0], paged=False) == 16


def test_fp8_caches_get_two_programs_per_sm():
    """An fp8 tile holds half a bf16 one's bytes: contiguous fp8 caches are split to about two programs per SM
    (as paged caches are), but a grid already that large is not split."""
    from tileattn.kernels.decode import _SMALL_GRID_CONFIG, choose_num_splits

    assert choose_num_splits(8, 8, 1, 16384, 132, _SMALL_GRID_CONFIG[0], paged=False, fp8=True) == 4
    assert choose_num_splits(8, 8, 1, 16384, 132, _SMALL_GRID_CONFIG[0], paged=False) == 2
    assert choose_num_splits(1, 8, 1, 16384, 132, _SMALL_GRID_CONFIG[0], paged=False, fp8=True) == 33
    assert choose_num_splits(32, 8, 1, 16384, 132, 128, paged=False, fp8=True) == 1


def test_fit_config():
    from tileattn.kernels.decode import _DECODE_CONFIG, fit_config

    h100 = 232448  # bytes of shared memory a block may use
    assert fit_config(_DECODE_CONFIG, 16, 128, 2, False, h100) == _DECODE_CONFIG  # the tuned tile, untouched
    assert fit_config(_DECODE_CONFIG, 64, 128, 2, False, h100) == _DECODE_CONFIG
    assert fit_config(_DECODE_CONFIG, 16, 128, 2, True, h100) == _DECODE_CONFIG
    assert fit_config(_DECODE_CONFIG, 64, 128, 2, True, h100) == (64, 4, 3)  # masked wide tiles spill
    assert fit_config(_DECODE_CONFIG, 16, 256, 2, False, h100) == (64, 4, 3)
    assert fit_config(_DECODE_CONFIG, 16, 256, 4, False, h100) == (32, 4, 3)
    assert fit_config(_DECODE_CONFIG, 64, 128, 4, True, h100) == (32, 4, 3)
    assert fit_config(_DECODE_CONFIG, 64, 256, 4, True, 100 * 1024) == (16, 4, 1)  # a small GPU: stages go last


def test_paged_append_names_the_layout():
    cache = PagedKVCache(num_pages=4, page_size=4, kv_heads=2, head_dim=32, max_seqs=1, max_pages_per_seq=4)
    seq = cache.add_sequence()
    with pytest.raises(ValueError, match=r"k must be \[kv_heads=2, n, head_dim=32\].*transpose\(0, 1\).*\(40, 2, 32\)"):
        cache.append(seq, torch.randn(40, 2, 32, dtype=torch.float16), torch.randn(40, 2, 32, dtype=torch.float16))
    assert cache.length(seq) == 0 and cache.num_free_pages == 4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["in order", "reversed"])  # consecutive slots (sliced views) or a gather
def test_paged_cache_attention_step(backend, order):
    """``PagedKVCache.attention``: reserve, write and attend in one call (decode and chunked prefill), then count
    the tokens; the same as doing it by hand, and all or nothing when pages run out."""
    cache = PagedKVCache(num_pages=9, page_size=8, kv_heads=2, head_dim=32, max_seqs=3, max_pages_per_seq=4,
                         dtype=torch.float16, device=DEVICE)
    seqs = [cache.add_sequence() for _ in range(3)]
    for seq, n in zip(seqs, (9, 1, 15)):
        cache.append(seq, *(torch.randn(2, n, 32, device=DEVICE, dtype=torch.float16) for _ in range(2)))
    seqs = seqs if order == "in order" else seqs[::-1]
    for sq in (1, 3, 1):
        q = torch.randn(3, 4, sq, 32, device=DEVICE, dtype=torch.float16)
        k_new, v_new = (torch.randn(3, 2, sq, 32, device=DEVICE, dtype=torch.float16) for _ in range(2))
        before = [cache.length(s) for s in seqs]
        out, lse = cache.attention(seqs, q, k_new=k_new, v_new=v_new, return_lse=True, backend=backend)
        assert [cache.length(s) for s in seqs] == [n + sq for n in before]
        args = cache.kernel_args(seqs)
        assert args["cache_seqlens"].tolist() == [n + sq for n in before]
        check_against_oracle(out, lse, q, args["k_cache"], args["v_cache"], [n + sq for n in before],
                             args["block_table"], causal=True)
    free, lengths = cache.num_free_pages, [cache.length(s) for s in seqs]
    q, k_new = torch.zeros(3, 4, 12, 32, device=DEVICE, dtype=torch.float16), torch.zeros(3, 2, 12, 32, device=DEVICE,
                                                                                          dtype=torch.float16)
    with pytest.raises(RuntimeError, match="out of pages"):  # 5 more pages needed, 3 free
        cache.attention(seqs, q, k_new=k_new, v_new=k_new)
    with pytest.raises(ValueError, match="k_new must be"):  # refused by attention_with_kvcache after reserving
        cache.attention(seqs, q[:, :, :2], k_new=k_new[:, :, :1], v_new=k_new[:, :, :1])
    assert cache.num_free_pages == free and [cache.length(s) for s in seqs] == lengths


def test_unchecked_lengths_stay_inside_the_cache():
    """check_bounds=False with a length past the cache: clamped to the capacity (no read or write outside)."""
    q, k_new, v_new = random_qkv(2, 4, 2, 1, 1, 32, dtype=torch.float32, device=DEVICE)
    store = torch.zeros(3, 2, 16, 32, device=DEVICE)  # row 2 is a guard that must not change
    k_cache, v_cache = store[:2], torch.randn(2, 2, 16, 32, device=DEVICE)
    lengths = torch.tensor([16, 40], dtype=torch.int32, device=DEVICE)
    out = tileattn.attention_with_kvcache(q, k_cache, v_cache, lengths, k_new=k_new, v_new=v_new, check_bounds=False,
                                          backend="triton")
    assert (store[2] == 0).all() and torch.isfinite(out).all()
    assert_matches_oracle(out, q, k_cache, v_cache, causal=True)


def test_strided_lengths_and_page_table():
    """cache_seqlens and block_table taken as strided views (columns of bigger tensors) read like contiguous ones."""
    page_size, pages = 16, 6
    k_pool, v_pool = (torch.randn(pages, 2, page_size, 32, device=DEVICE) for _ in range(2))
    table = torch.stack([torch.randperm(pages, device=DEVICE)[:3].to(torch.int32) for _ in range(2)])
    wide_table = torch.zeros(2, 6, dtype=torch.int32, device=DEVICE)
    wide_table[:, ::2] = table
    wide_lengths = torch.tensor([[40, 0], [17, 0]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(2, 4, 1, 32, device=DEVICE)
    expected = tileattn.attention_with_kvcache(q, k_pool, v_pool, wide_lengths[:, 0].contiguous(), block_table=table,
                                               backend="torch")
    for backend in BACKENDS:
        out = tileattn.attention_with_kvcache(q, k_pool, v_pool, wide_lengths[:, 0], block_table=wide_table[:, ::2],
                                              backend=backend)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flash_attn_kvcache_lengths_past_the_cache_on_the_torch_path():
    from tileattn import flash_attn_compat

    q = torch.randn(2, 1, 4, 32)
    k_cache, v_cache = torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32)
    with pytest.raises(ValueError, match="exceeds the cache capacity"):
        flash_attn_compat.flash_attn_with_kvcache(q, k_cache, v_cache, torch.randn(2, 1, 2, 32),
                                                  torch.randn(2, 1, 2, 32),
                                                  cache_seqlens=torch.tensor([16, 3], dtype=torch.int32))
