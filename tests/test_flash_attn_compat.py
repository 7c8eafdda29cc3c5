"""tileattn.flash_attn_compat: flash-attn 2's argument names, layout and semantics, against the oracle."""

import sys

import pytest
import torch

import tileattn.flash_attn_compat as fa
from tileattn import api, dispatch
from tileattn.reference import naive_attention
from tileattn.testing import assert_gradients_match_oracle, assert_matches_oracle

from conftest import DEVICE


def bshd(b, s, h, d, dtype=torch.float16):
    return torch.randn(b, s, h, d, device=DEVICE).to(dtype)


@pytest.mark.parametrize("causal,window_size,softcap", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                                        (False, (8, 2), 0.0), (True, (5, -1), 3.0)])
def test_flash_attn_func(causal, window_size, softcap):
    q, k, v = bshd(2, 37, 4, 64), bshd(2, 53, 2, 64), bshd(2, 53, 2, 64)
    out, lse, probs = fa.flash_attn_func(q, k, v, causal=causal, window_size=window_size, softcap=softcap,
                                         return_attn_probs=True)
    assert out.shape == q.shape and probs is None
    window = None if window_size == (-1, -1) else window_size
    assert_matches_oracle(out.transpose(1, 2), q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), lse=lse,
                          causal=causal, window=window, softcap=softcap or None)


def test_qkvpacked():
    qkv = torch.randn(2, 40, 3, 4, 32, device=DEVICE).half()
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True, softmax_scale=0.2)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert_matches_oracle(out.transpose(1, 2), q, k, v, causal=True, scale=0.2)


def test_varlen():
    lengths = [5, 31, 1, 17]
    cu = torch.tensor([0, 5, 36, 37, 54], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(54, h, 32, device=DEVICE).half() for h in (4, 2, 2))
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                            return_attn_probs=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        seq = [t[a:b][None].transpose(1, 2) for t in (q, k, v)]
        assert_matches_oracle(out[a:b][None].transpose(1, 2), *seq, lse=lse[:, a:b][None], causal=True)


@pytest.fixture(params=["auto", "triton"])
def kvcache_backend(request, monkeypatch):
    """``auto``'s own choice, or the Triton kernel forced (on CPU through the interpreter), which takes
    ``[B, S, H, D]`` tensors as they are."""
    if request.param == "triton":
        monkeypatch.setattr(dispatch, "choose_backend", lambda q, v, requested, k=None: "triton")
        api._prepared.clear()
        yield "triton"
        api._prepared.clear()
    else:
        yield "auto"


@pytest.mark.parametrize("paged", [False, True])
def test_with_kvcache_appends_and_attends(paged, kvcache_backend):
    b, hkv, d, cached = 2, 2, 32, [9, 20]
    if paged:
        k_cache, v_cache = bshd(8, 16, hkv, d), bshd(8, 16, hkv, d)  # [num_blocks, block_size, Hkv, D]
        table = torch.tensor([[3, 0], [5, 6]], dtype=torch.int32, device=DEVICE)
    else:
        k_cache, v_cache, table = bshd(b, 32, hkv, d), bshd(b, 32, hkv, d), None
    q, k_new, v_new = bshd(b, 2, 4, d), bshd(b, 2, hkv, d), bshd(b, 2, hkv, d)
    seqlens = torch.tensor(cached, dtype=torch.int32, device=DEVICE)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                         block_table=table, causal=True, return_softmax_lse=True)
    # Again with the same signature (the validated call is reused): the same tokens written, the same result.
    again, again_lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=v_new, cache_seqlens=seqlens,
                                                  block_table=table, causal=True, return_softmax_lse=True)
    assert out.shape == q.shape and lse.shape == (b, 4, 2)
    assert torch.equal(again, out) and torch.equal(again_lse, lse)
    for i, n in enumerate(cached):
        if paged:
            keys = k_cache[table[i].long()].reshape(-1, hkv, d)[: n + 2]
            values = v_cache[table[i].long()].reshape(-1, hkv, d)[: n + 2]
        else:
            keys, values = k_cache[i, : n + 2], v_cache[i, : n + 2]
        assert torch.equal(keys[n:], k_new[i])
        assert_matches_oracle(out[i:i + 1].transpose(1, 2), q[i:i + 1].transpose(1, 2), keys[None].transpose(1, 2),
                              values[None].transpose(1, 2), lse=lse[i:i + 1], causal=True)


def test_int_cache_seqlens_and_full_cache_default():
    k_cache, v_cache, q = bshd(2, 24, 2, 16), bshd(2, 24, 2, 16), bshd(2, 1, 2, 16)
    full = fa.flash_attn_with_kvcache(q, k_cache, v_cache)
    assert torch.equal(full, fa.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=24))
    assert_matches_oracle(full.transpose(1, 2), q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2))


def test_unsupported_arguments_are_clear_errors():
    q = bshd(1, 4, 2, 16)
    with pytest.raises(TypeError, match="alibi_slopes"):
        fa.flash_attn_func(q, q, q, alibi_slopes=torch.ones(2, device=DEVICE, dtype=torch.float64))
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        fa.flash_attn_func(q, q, q, dropout_p=0.1)
    with pytest.raises(ValueError, match="cache_leftpad"):
        fa.flash_attn_with_kvcache(q, q, q, cache_leftpad=torch.zeros(1, dtype=torch.int32, device=DEVICE),
                                   block_table=torch.zeros(1, 1, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="rotary_cos"):
        fa.flash_attn_with_kvcache(q, q, q, rotary_cos=torch.ones(4, 8, device=DEVICE))


def test_alias_as_flash_attn_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fa)
    from flash_attn import flash_attn_func  # noqa: PLC0415

    assert flash_attn_func is fa.flash_attn_func


def flash_attn_alibi_reference(q, k, v, slopes, causal):
    """flash-attn's ALiBi as its own test reference states it (bshd, float64): ``slope * j`` under causal masking,
    ``-slope * |i + Sk - Sq - j|`` otherwise; returns ``(out [B, Sq, Hq, D], lse [B, Hq, Sq])``."""
    sq, sk = q.shape[1], k.shape[1]
    rows, cols = torch.arange(sq, device=DEVICE)[:, None], torch.arange(sk, device=DEVICE)[None, :]
    slopes = (slopes if slopes.dim() == 2 else slopes[None]).double()[:, :, None, None]
    bias = slopes * cols if causal else -slopes * (rows + sk - sq - cols).abs()
    if causal:
        bias = bias.masked_fill(cols > rows + sk - sq, float("-inf"))
    qh, kh, vh = (t.double().transpose(1, 2) for t in (q, k, v))
    group = qh.shape[1] // kh.shape[1]
    logits = qh @ kh.repeat_interleave(group, 1).transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    out = logits.softmax(-1) @ vh.repeat_interleave(group, 1)
    return out.transpose(1, 2), logits.logsumexp(-1)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_as_flash_attn_defines_it(causal, per_batch):
    q, k, v = bshd(2, 13, 4, 32, torch.float32), bshd(2, 21, 2, 32, torch.float32), bshd(2, 21, 2, 32, torch.float32)
    slopes = torch.rand(2, 4, device=DEVICE) if per_batch else torch.rand(4, device=DEVICE)
    out, lse, _ = fa.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, return_attn_probs=True)
    ref, ref_lse = flash_attn_alibi_reference(q, k, v, slopes, causal)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)
    # varlen: the two sequences packed
    cu_q = torch.tensor([0, 13, 26], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 21, 42], dtype=torch.int32, device=DEVICE)
    out, lse, _ = fa.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 13, 21,
                                            causal=causal, alibi_slopes=slopes, return_attn_probs=True)
    torch.testing.assert_close(out.view(2, 13, 4, 32).double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.view(4, 2, 13).transpose(0, 1).double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_alibi_in_kvcache_decode():
    k_cache, v_cache = bshd(2, 24, 2, 16, torch.float32), bshd(2, 24, 2, 16, torch.float32)
    q, k_new, v_new = bshd(2, 2, 4, 16, torch.float32), bshd(2, 2, 2, 16, torch.float32), bshd(2, 2, 2, 16, torch.float32)
    lengths = [9, 20]
    slopes = torch.rand(4, device=DEVICE)
    out, lse = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                         cache_seqlens=torch.tensor(lengths, dtype=torch.int32, device=DEVICE),
                                         causal=True, alibi_slopes=slopes, return_softmax_lse=True)
    for b, n in enumerate(lengths):
        ref, ref_lse = flash_attn_alibi_reference(q[b:b + 1], k_cache[b:b + 1, : n + 2], v_cache[b:b + 1, : n + 2],
                                                  slopes, causal=True)
        torch.testing.assert_close(out[b:b + 1].double(), ref, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(lse[b:b + 1].double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_packed_forms_and_tensor_window_sizes():
    """kvpacked, varlen kvpacked / qkvpacked give the unpacked functions' results; window_size may hold 0-d
    tensors, as flash-attn accepts."""
    q, k, v = bshd(2, 11, 4, 32), bshd(2, 17, 2, 32), bshd(2, 17, 2, 32)
    window = (torch.tensor(5), torch.tensor(1))
    expected = fa.flash_attn_func(q, k, v, window_size=(5, 1))
    torch.testing.assert_close(fa.flash_attn_func(q, k, v, window_size=window), expected)
    torch.testing.assert_close(fa.flash_attn_kvpacked_func(q, torch.stack([k, v], dim=2), window_size=window), expected)
    cu_q = torch.tensor([0, 11, 22], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 17, 34], dtype=torch.int32, device=DEVICE)
    packed = fa.flash_attn_varlen_kvpacked_func(q.flatten(0, 1), torch.stack([k, v], dim=2).flatten(0, 1), cu_q, cu_k,
                                                11, 17, window_size=window)
    torch.testing.assert_close(packed.view(2, 11, 4, 32), expected)
    qkv = bshd(2, 13, 12, 32).view(2, 13, 3, 4, 32)
    self_attention = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    cu = torch.tensor([0, 13, 26], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(fa.flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, 13, causal=True).view(2, 13, 4, 32),
                               self_attention)
    assert_matches_oracle(self_attention.transpose(1, 2), *(qkv[:, :, i].transpose(1, 2) for i in range(3)), causal=True)


def test_out_of_bounds_block_table_is_the_error_flash_attn_users_catch():
    """A page id outside the pool: flash-attn raises RuntimeError naming block_table; ours is also a ValueError.
    (Checked where the lengths are read on the host anyway: the PyTorch path, and check_bounds=True.)"""
    k_cache, v_cache = bshd(4, 8, 2, 16), bshd(4, 8, 2, 16)
    q = bshd(1, 1, 4, 16)
    table = torch.tensor([[0, 9]], dtype=torch.int32, device=DEVICE)
    seqlens = torch.tensor([12], dtype=torch.int32, device=DEVICE)
    from tileattn.api import attention_with_kvcache
    with pytest.raises(RuntimeError, match="block_table") as caught:
        attention_with_kvcache(q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), seqlens,
                               block_table=table)
    assert isinstance(caught.value, ValueError)


def rotate_reference(x, cos, sin, positions, interleaved):
    """Rotary embedding written out per pair of dims: x ``[B, S, H, D]``, positions ``[B, S]``."""
    out = x.double().clone()
    half = cos.shape[1]
    for i in range(half):
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
        c, s = cos[positions, i].double()[:, :, None], sin[positions, i].double()[:, :, None]
        out[..., a] = x[..., a].double() * c - x[..., b].double() * s
        out[..., b] = x[..., b].double() * c + x[..., a].double() * s
    return out.to(x.dtype)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary_and_cache_batch_idx_in_kvcache(interleaved, causal, kvcache_backend):
    """Rotary at the cache positions (q at them when causal, else all at cache_seqlens), new keys rotated before the
    append; cache_batch_idx picks each sequence's cache row: equal to rotating by hand and indexing the rows."""
    b, hq, hkv, d, rotary_dim, new = 2, 4, 2, 32, 16, 3
    k_cache, v_cache = bshd(3, 40, hkv, d, torch.float32), bshd(3, 40, hkv, d, torch.float32)
    q, k, v = bshd(b, new, hq, d, torch.float32), bshd(b, new, hkv, d, torch.float32), bshd(b, new, hkv, d, torch.float32)
    angles = torch.rand(64, rotary_dim // 2, device=DEVICE) * 6
    cos, sin = angles.cos(), angles.sin()
    lengths = torch.tensor([5, 20], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([2, 0], dtype=torch.int32, device=DEVICE)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lengths,
                                     cache_batch_idx=rows, causal=causal, rotary_interleaved=interleaved)
    positions = lengths.long()[:, None] + torch.arange(new, device=DEVICE)[None]
    k_rot = rotate_reference(k, cos, sin, positions, interleaved)
    q_rot = rotate_reference(q, cos, sin, positions if causal else lengths.long()[:, None].expand(b, new), interleaved)
    for i in range(b):
        row, n = int(rows[i]), int(lengths[i])
        expected_k[row, n:n + new], expected_v[row, n:n + new] = k_rot[i], v[i]
    torch.testing.assert_close(k_cache, expected_k)
    torch.testing.assert_close(v_cache, expected_v)
    for i in range(b):
        row, n = int(rows[i]), int(lengths[i])
        keys, values = expected_k[row:row + 1, : n + new], expected_v[row:row + 1, : n + new]
        assert_matches_oracle(out[i:i + 1].transpose(1, 2), q_rot[i:i + 1].transpose(1, 2), keys.transpose(1, 2),
                              values.transpose(1, 2), causal=causal)


@pytest.mark.parametrize("with_batch_idx", [False, True])
def test_cache_leftpad(with_batch_idx, kvcache_backend):
    """Sequence b's tokens occupy slots leftpad[b] .. cache_seqlens[b] of its row; the new tokens go at cache_seqlens[b]
    and rotary positions are positions in the row (flash-attn's convention: its test rotates at cache_seqlens)."""
    b, hq, hkv, d, new = 2, 4, 2, 32, 2
    k_cache, v_cache = bshd(3, 30, hkv, d, torch.float32), bshd(3, 30, hkv, d, torch.float32)
    q, k, v = bshd(b, new, hq, d, torch.float32), bshd(b, new, hkv, d, torch.float32), bshd(b, new, hkv, d, torch.float32)
    angles = torch.rand(64, 8, device=DEVICE) * 6
    leftpad = torch.tensor([4, 0], dtype=torch.int32, device=DEVICE)
    ends = torch.tensor([10, 17], dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([1, 2], dtype=torch.int32, device=DEVICE) if with_batch_idx else None
    before = k_cache.clone(), v_cache.clone()
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=angles.cos(), rotary_sin=angles.sin(),
                                     cache_seqlens=ends, cache_leftpad=leftpad, cache_batch_idx=rows, causal=True)
    for i in range(b):
        row = i if rows is None else int(rows[i])
        start, end = int(leftpad[i]), int(ends[i])
        positions = torch.arange(end, end + new, device=DEVICE)[None]
        k_rot = rotate_reference(k[i:i + 1], angles.cos(), angles.sin(), positions, True)
        q_rot = rotate_reference(q[i:i + 1], angles.cos(), angles.sin(), positions, True)
        torch.testing.assert_close(k_cache[row, end:end + new], k_rot[0])
        torch.testing.assert_close(k_cache[row, :end], before[0][row, :end])  # nothing else written
        keys, values = k_cache[row:row + 1, start:end + new], v_cache[row:row + 1, start:end + new]
        assert_matches_oracle(out[i:i + 1].transpose(1, 2), q_rot.transpose(1, 2), keys.transpose(1, 2),
                              values.transpose(1, 2), causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_paged_varlen_prefill(causal, kvcache_backend):
    """flash_attn_varlen_func with block_table: keys from a page pool equal the packed call over the same keys."""
    lengths_q, lengths_k, page, hkv, d = [5, 12, 1], [9, 12, 30], 8, 2, 32
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), 4, d, device=DEVICE).half()
    k, v = (torch.randn(sum(lengths_k), hkv, d, device=DEVICE).half() for _ in range(2))
    expected, expected_lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 30, causal=causal,
                                                          return_attn_probs=True)
    pages_per_seq = 4
    order = torch.randperm(len(lengths_k) * pages_per_seq + 2, device=DEVICE)
    table = order[: len(lengths_k) * pages_per_seq].view(len(lengths_k), pages_per_seq).to(torch.int32)
    k_pool, v_pool = (torch.randn(len(order), page, hkv, d, device=DEVICE).half() for _ in range(2))
    for b, (start, n) in enumerate(zip(cu_k.tolist(), lengths_k)):
        for j in range(n):
            k_pool[table[b, j // page], j % page] = k[start + j]
            v_pool[table[b, j // page], j % page] = v[start + j]
    out, lse, _ = fa.flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, 12, 30, causal=causal,
                                            return_attn_probs=True, block_table=table)
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse, expected_lse, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("new", [1, 5])
def test_new_keys_need_not_match_the_queries(new, paged, kvcache_backend):
    """flash-attn appends any number of new keys (its tests draw seqlen_new at random); the queries stay the last Sq
    positions of the cache_seqlens + seqlen_new keys."""
    b, hq, hkv, d, sq, cached = 2, 4, 2, 32, 3, [6, 11]
    if paged:
        k_cache, v_cache = bshd(6, 8, hkv, d), bshd(6, 8, hkv, d)
        table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32, device=DEVICE)
    else:
        k_cache, v_cache, table = bshd(b, 20, hkv, d), bshd(b, 20, hkv, d), None
    q, k_new, v_new = bshd(b, sq, hq, d), bshd(b, new, hkv, d), bshd(b, new, hkv, d)
    seqlens = torch.tensor(cached, dtype=torch.int32, device=DEVICE)
    out = fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                     causal=True)
    for i, n in enumerate(cached):
        rows = (k_cache[table[i].long()].reshape(-1, hkv, d), v_cache[table[i].long()].reshape(-1, hkv, d)) if paged \
            else (k_cache[i], v_cache[i])
        keys, values = (t[: n + new] for t in rows)
        assert torch.equal(keys[n:], k_new[i]) and torch.equal(values[n:], v_new[i])
        assert_matches_oracle(out[i:i + 1].transpose(1, 2), q[i:i + 1].transpose(1, 2), keys[None].transpose(1, 2),
                              values[None].transpose(1, 2), causal=True)
    with pytest.raises(ValueError, match="k and v"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new[:, :, :1], cache_seqlens=seqlens,
                                   block_table=table)


@pytest.mark.parametrize("append", [False, True])
def test_paged_lengths_past_the_block_table_raise_as_in_flash_attn(append):
    """flash-attn's guard (its test_flash_attn_kvcache_paged_block_table_bounds): a length past what block_table
    addresses is a RuntimeError naming block_table, on every device, before anything is written."""
    k_cache, v_cache = bshd(4, 16, 1, 16), bshd(4, 16, 1, 16)
    table = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    q = bshd(1, 1, 1, 16)
    k_new = bshd(1, 1, 1, 16) if append else None
    seqlens = torch.full((1,), 16 if append else 17, dtype=torch.int32, device=DEVICE)
    before = k_cache.clone()
    with pytest.raises(RuntimeError, match="block_table"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k=k_new, v=k_new, cache_seqlens=seqlens, block_table=table)
    assert torch.equal(k_cache, before)


def test_leftpad_overflow_is_an_error_on_the_checked_paths():
    """cache_seqlens counts from the row's start: a row whose tokens plus the new ones pass its end must raise (the
    one-token page table would otherwise clamp every write into the last slot)."""
    if DEVICE == "cuda":
        pytest.skip("on CUDA the lengths are trusted, as in flash-attn (no host read)")
    k_cache, v_cache = bshd(1, 8, 1, 16), bshd(1, 8, 1, 16)
    q, k, v = bshd(1, 2, 1, 16), bshd(1, 2, 1, 16), bshd(1, 2, 1, 16)
    with pytest.raises(RuntimeError, match="past the row"):
        fa.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=torch.tensor([7], dtype=torch.int32),
                                   cache_leftpad=torch.tensor([2], dtype=torch.int32))


def test_rotary_window_as_wide_as_the_cache_counts_as_unbounded():
    """flash-attn resets a window side >= the cache's capacity to unbounded, so q is rotated as for a non-local call."""
    k_cache, v_cache = bshd(1, 32, 1, 16, torch.float32), bshd(1, 32, 1, 16, torch.float32)
    q, k, v = (bshd(1, 3, h, 16, torch.float32) for h in (2, 1, 1))
    angles = torch.rand(64, 8, device=DEVICE) * 6
    seqlens = torch.tensor([10], dtype=torch.int32, device=DEVICE)
    outs = []
    for window in ((-1, -1), (32, 32), (1000, 1000)):
        caches = k_cache.clone(), v_cache.clone()
        outs.append(fa.flash_attn_with_kvcache(q, *caches, k, v, rotary_cos=angles.cos(), rotary_sin=angles.sin(),
                                               cache_seqlens=seqlens, window_size=window))
    torch.testing.assert_close(outs[1], outs[0])
    torch.testing.assert_close(outs[2], outs[0])


# ---- gradients: flash-attn's rule (3x PyTorch's own error in the same precision) against the float64 oracle -----

@pytest.fixture(params=["auto", "triton"])
def grad_backend(request, monkeypatch):
    """``auto``'s own choice, or the Triton kernels that ``auto`` picks on CUDA forced (on CPU through the
    interpreter): then calls that require grad run the Triton FlashAttention backward, varlen sequence by
    sequence."""
    if request.param == "triton":
        monkeypatch.setattr(dispatch, "decide", lambda *args, **kwargs: dispatch.Decision("triton", "the test's"))
        monkeypatch.setattr(dispatch, "choose_backend", lambda q, v, requested, k=None: "triton")
        api._prepared.clear()
        yield "triton"
        api._prepared.clear()
    else:
        yield "auto"


def as_tileattn_options(causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, softmax_scale=None):
    """flash-attn's arguments as the reference's (``naive_attention``'s): the semantics the compat module promises."""
    window = None if tuple(window_size) == (-1, -1) else tuple(window_size)
    return dict(causal=causal, window=window, softcap=softcap or None, alibi_slopes=alibi_slopes, scale=softmax_scale)


def bshd_oracle(q, k, v, **flash_attn_options):
    """``(out [B, Sq, Hq, D_v], lse [B, Hq, Sq])`` of the materialized reference on ``[B, S, H, D]`` tensors. Under
    causal ALiBi flash-attn's lse is this one shifted by a constant per row, which has the same gradients."""
    out, lse = naive_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), return_lse=True,
                               **as_tileattn_options(**flash_attn_options))
    return out.transpose(1, 2), lse


def varlen_oracle(q, k, v, cu_q, cu_k, **flash_attn_options):
    """The packed form of :func:`bshd_oracle`, one sequence at a time: ``(out [total_q, Hq, D_v], lse [Hq, total_q])``."""
    outs, lses = [], []
    for q0, q1, k0, k1 in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        out, lse = bshd_oracle(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], **flash_attn_options)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def cumulative(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


GRAD_OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window_size=(6, 2)),
    "causal_softcap_scale": dict(causal=True, softcap=2.0, softmax_scale=0.3),
    "alibi": dict(alibi_slopes="random"),
    "causal_alibi": dict(causal=True, alibi_slopes="random"),
}


def grad_options(name, heads):
    options = dict(GRAD_OPTIONS[name])
    if "alibi_slopes" in options:  # fp32 [Hq], as flash-attn takes them; they get no gradient there either
        options["alibi_slopes"] = torch.rand(heads, device=DEVICE)
    return options


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("option", GRAD_OPTIONS)
def test_flash_attn_func_gradients(option, dtype, grad_backend):
    """dq, dk, dv (GQA, Sq != Sk) through out and the returned lse, against the oracle's autograd."""
    options = grad_options(option, 4)
    q, k, v = bshd(2, 11, 4, 32, dtype), bshd(2, 19, 2, 32, dtype), bshd(2, 19, 2, 32, dtype)

    def ours(q, k, v):
        out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True, **options)
        return out, lse

    assert_gradients_match_oracle(ours, (q, k, v), oracle=lambda *qkv: bshd_oracle(*qkv, **options),
                                  names=("dq", "dk", "dv"), keys=19)


def test_deterministic_is_accepted_and_reruns_give_the_same_gradients(grad_backend):
    """flash-attn's ``deterministic=True`` asks for a backward without atomics, which ours always is."""
    q, k, v = bshd(1, 21, 4, 16), bshd(1, 21, 2, 16), bshd(1, 21, 2, 16)
    grad_out = torch.randn(1, 21, 4, 16, device=DEVICE)

    def gradients():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fa.flash_attn_func(*inputs, causal=True, deterministic=True)
        return torch.autograd.grad(out, inputs, grad_out.to(out.dtype))

    first, again = gradients(), gradients()
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_packed_gradients_reach_the_packed_tensors(dtype, grad_backend):
    """qkvpacked and kvpacked (plain and varlen): the gradient of the packed tensor is the oracle's for each slice."""
    qkv = torch.randn(2, 13, 3, 2, 32, device=DEVICE).to(dtype)
    q, kv = bshd(2, 9, 4, 32, dtype), torch.randn(2, 13, 2, 2, 32, device=DEVICE).to(dtype)
    cu, cu_q = cumulative([13, 13]), cumulative([9, 9])

    def unpacked_oracle(qkv):
        return bshd_oracle(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)

    cases = {
        "qkvpacked": ((qkv,), lambda qkv: fa.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)[:2],
                      unpacked_oracle),
        "kvpacked": ((q, kv), lambda q, kv: fa.flash_attn_kvpacked_func(q, kv, window_size=(4, 1),
                                                                        return_attn_probs=True)[:2],
                     lambda q, kv: bshd_oracle(q, kv[:, :, 0], kv[:, :, 1], window_size=(4, 1))),
        "varlen_qkvpacked": ((qkv.flatten(0, 1),),
                             lambda qkv: fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 13, causal=True,
                                                                             return_attn_probs=True)[:2],
                             lambda qkv: varlen_oracle(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, causal=True)),
        "varlen_kvpacked": ((q.flatten(0, 1), kv.flatten(0, 1)),
                            lambda q, kv: fa.flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu, 9, 13, causal=True,
                                                                             return_attn_probs=True)[:2],
                            lambda q, kv: varlen_oracle(q, kv[:, 0], kv[:, 1], cu_q, cu, causal=True)),
    }
    for name, (inputs, ours, oracle) in cases.items():
        names = tuple(f"{name}: d{i}" for i in range(len(inputs)))
        assert_gradients_match_oracle(ours, inputs, oracle=oracle, names=names, keys=13)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("option", ["causal", "window", "causal_alibi"])
def test_varlen_gradients(option, dtype, grad_backend):
    """flash_attn_varlen_func: packed sequences of awkward lengths (one query, more keys than queries) give each
    sequence's own gradients."""
    options = grad_options(option, 4)
    lengths_q, lengths_k = [5, 1, 12], [9, 7, 12]
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    q = torch.randn(sum(lengths_q), 4, 32, device=DEVICE).to(dtype)
    k, v = (torch.randn(sum(lengths_k), 2, 32, device=DEVICE).to(dtype) for _ in range(2))

    def ours(q, k, v):
        out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 12, return_attn_probs=True, **options)
        return out, lse

    assert_gradients_match_oracle(ours, (q, k, v), oracle=lambda q, k, v: varlen_oracle(q, k, v, cu_q, cu_k, **options),
                                  names=("dq", "dk", "dv"), keys=12)


def test_paged_varlen_gradients_reach_the_page_pools(kvcache_backend):
    """flash_attn_varlen_func with block_table: q and the page pools get the gradients of the packed call over the
    keys the pages hold (the rest of the pools get 0)."""
    lengths_q, lengths_k, page, hkv, d = [3, 6], [7, 10], 4, 2, 16
    cu_q, cu_k = cumulative(lengths_q), cumulative(lengths_k)
    table = torch.tensor([[5, 1, 2], [0, 3, 4]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(sum(lengths_q), 4, d, device=DEVICE)
    k_pool, v_pool = (torch.randn(6, page, hkv, d, device=DEVICE) for _ in range(2))

    def gathered(pool):  # the packed keys the pages hold, in order
        return torch.cat([pool[table[b].long()].flatten(0, 1)[:n] for b, n in enumerate(lengths_k)])

    def ours(q, k_pool, v_pool):
        out, lse, _ = fa.flash_attn_varlen_func(q, k_pool, v_pool, cu_q, cu_k, 6, 10, causal=True,
                                                return_attn_probs=True, block_table=table)
        return out, lse

    def oracle(q, k_pool, v_pool):
        return varlen_oracle(q, gathered(k_pool), gathered(v_pool), cu_q, cu_k, causal=True)

    assert_gradients_match_oracle(ours, (q, k_pool, v_pool), oracle=oracle, names=("dq", "dk_pool", "dv_pool"),
                                  keys=10)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_gradients_reach_the_queries_and_new_tokens(paged, kvcache_backend):
    """flash_attn_with_kvcache has no backward in flash-attn; here q and the appended k/v get the oracle's gradients
    of attention over the cache's tokens and the new ones (the cache itself holds no gradient)."""
    b, hkv, d, cached, new = 2, 2, 16, [5, 9], 2
    if paged:
        k_cache, v_cache = bshd(6, 8, hkv, d, torch.float32), bshd(6, 8, hkv, d, torch.float32)
        table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32, device=DEVICE)
    else:
        k_cache, v_cache, table = bshd(b, 16, hkv, d, torch.float32), bshd(b, 16, hkv, d, torch.float32), None
    q, k_new, v_new = bshd(b, new, 4, d, torch.float32), bshd(b, new, hkv, d, torch.float32), \
        bshd(b, new, hkv, d, torch.float32)
    seqlens = torch.tensor(cached, dtype=torch.int32, device=DEVICE)

    def ours(q, k_new, v_new):  # on copies of the caches: each run appends the same tokens to the same state
        return fa.flash_attn_with_kvcache(q, k_cache.clone(), v_cache.clone(), k_new, v_new, cache_seqlens=seqlens,
                                          block_table=table, causal=True, return_softmax_lse=True)

    def cached_tokens(cache, i, n):
        return cache[table[i].long()].flatten(0, 1)[:n] if paged else cache[i, :n]

    def oracle(q, k_new, v_new):
        outs, lses = [], []
        for i, n in enumerate(cached):
            keys = torch.cat([cached_tokens(k_cache, i, n).to(k_new.dtype), k_new[i]])
            values = torch.cat([cached_tokens(v_cache, i, n).to(v_new.dtype), v_new[i]])
            out, lse = bshd_oracle(q[i:i + 1], keys[None], values[None], causal=True)
            outs.append(out)
            lses.append(lse)
        return torch.cat(outs), torch.cat(lses)

    assert_gradients_match_oracle(ours, (q, k_new, v_new), oracle=oracle, names=("dq", "dk_new", "dv_new"),
                                  keys=max(cached) + new)
