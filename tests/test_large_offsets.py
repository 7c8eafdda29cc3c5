"""Offsets past 2^31 elements (GPU only: the tensors take several GB). Every kernel computes such offsets in 64 bits;
each case is compared with a reference computed chunk by chunk from contiguous slices and merged by LSE."""

import pytest
import torch

import tileattn
from tileattn.reference import merge_attention, naive_attention

pytestmark = [pytest.mark.gpu, pytest.mark.large_memory]

HQ, HKV, D = 32, 8, 128


def chunked_reference(q, k, v, *, causal=False, mask=None, chunk=32768):
    """fp32 attention of ``q [B, Hq, Sq, D]`` over ``k, v [B, Hkv, Sk, D]`` (any views), computed on contiguous key
    chunks and merged by LSE, so no single tensor or offset is large."""
    sk, sq = k.shape[2], q.shape[2]
    out = lse = None
    for start in range(0, sk, chunk):
        stop = min(start + chunk, sk)
        kc, vc = k[:, :, start:stop].contiguous().float(), v[:, :, start:stop].contiguous().float()
        visible = None
        if causal:  # bottom-right: query i sees key j iff j <= i + Sk - Sq
            rows = torch.arange(sq, device=q.device)[:, None] + sk - sq
            visible = torch.arange(start, stop, device=q.device)[None, :] <= rows
        if mask is not None:
            part = mask[..., start:stop].contiguous()
            visible = part if visible is None else visible & part
        o, l = naive_attention(q.float(), kc, vc, mask=visible, return_lse=True)
        out, lse = (o, l) if out is None else merge_attention(out, lse, o, l)
    return out, lse


def assert_close(out, lse, ref_out, ref_lse):
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    if lse is not None:
        torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


@pytest.fixture  # per test, under the large-memory lock (conftest)
def packed_kv():
    """K and V of 400,000 tokens of 32 heads packed per token ([1, S, 2, H, D], as a fused KV projection writes
    them): the token stride is 8192 elements, so keys from 262,144 on sit past 2^31 elements (the issue's case)."""
    kv = torch.randn(1, 400_000, 2, HQ, D, device="cuda", dtype=torch.bfloat16)
    return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [1, H, S, D] views


def test_packed_kv_prefill_past_2_31(packed_kv):
    k, v = packed_kv
    assert k.stride(2) * (k.shape[2] - 1) >= 2**31
    q = torch.randn(1, HQ, 128, D, device="cuda", dtype=torch.bfloat16)
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    assert_close(out, lse, *chunked_reference(q, k, v, causal=True))


def test_packed_kv_decode_past_2_31(packed_kv):
    k, v = packed_kv
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    out, lse = tileattn.attention(q, k, v, return_lse=True, backend="triton")  # decode-shaped: split-KV kernel
    assert_close(out, lse, *chunked_reference(q, k, v))
    lengths = torch.tensor([k.shape[2] - 5], dtype=torch.int32, device="cuda")
    k_new, v_new = torch.randn(2, 1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    out, lse = tileattn.attention_with_kvcache(q, k, v, lengths, k_new=k_new, v_new=v_new, return_lse=True)
    n = k.shape[2] - 4
    assert torch.equal(k[:, :, n - 1], k_new[:, :, 0]) and torch.equal(v[:, :, n - 1], v_new[:, :, 0])
    assert_close(out, lse, *chunked_reference(q, k[:, :, :n], v[:, :, :n]))


def test_paged_pool_past_2_31():
    page_size = 64
    num_pages = (2**31) // (page_size * HKV * D) + 600  # the pool holds more than 2^31 elements
    pool_k = torch.randn(num_pages, page_size, HKV, D, device="cuda", dtype=torch.bfloat16)
    pool_v = torch.randn_like(pool_k)
    # Distinct pages, each sequence's last ones (where its new token goes) the farthest in the pool.
    pages = torch.randperm(num_pages - 20, device="cuda")[:1000]
    table = pages.to(torch.int32).view(2, 500)
    table[0, 490:] = torch.arange(num_pages - 10, num_pages, device="cuda", dtype=torch.int32)
    table[1, 291:301] = torch.arange(num_pages - 20, num_pages - 10, device="cuda", dtype=torch.int32)
    lengths = torch.tensor([500 * page_size - 7, 300 * page_size + 3], dtype=torch.int32, device="cuda")
    q = torch.randn(2, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k_new, v_new = torch.randn(2, 2, HKV, 1, D, device="cuda", dtype=torch.bfloat16)
    out, lse = tileattn.attention_with_kvcache(q, pool_k.transpose(1, 2), pool_v.transpose(1, 2), lengths,
                                               k_new=k_new, v_new=v_new, block_table=table, return_lse=True)
    for b in range(2):
        n = int(lengths[b]) + 1
        used = table[b, : -(-n // page_size)].long()
        k = pool_k[used].reshape(-1, HKV, D)[:n].transpose(0, 1)[None]
        v = pool_v[used].reshape(-1, HKV, D)[:n].transpose(0, 1)[None]
        assert torch.equal(k[0, :, -1], k_new[b, :, 0])
        assert_close(out[b:b + 1], lse[b:b + 1], *chunked_reference(q[b:b + 1], k, v))


def test_mask_row_stride_past_2_31():
    sq, sk, row_stride = 4096, 256, 2**20  # row 4095 of the mask starts at 4095 * 2^20 > 2^31
    storage = torch.rand(sq, row_stride, device="cuda") > 0.3
    mask = storage[:, :sk][None, None]  # [1, 1, Sq, Sk] with row stride 2^20
    q = torch.randn(1, 4, sq, 64, device="cuda", dtype=torch.float16)
    k, v = torch.randn(2, 1, 4, sk, 64, device="cuda", dtype=torch.float16)
    out, lse = tileattn.attention(q, k, v, mask=mask, return_lse=True, backend="triton")
    ref_out, ref_lse = chunked_reference(q, k, v, mask=mask)
    seen = ref_lse > float("-inf")
    assert_close(out, None, ref_out, None)
    torch.testing.assert_close(lse[seen], ref_lse[seen], atol=1e-3, rtol=1e-3)


def test_varlen_long_packed_total():
    lengths = [1000] * 600  # 600,000 tokens x 32 heads x 128 = 2.46e9 elements per tensor
    total = sum(lengths)
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = torch.randn(3, total, HQ, D, device="cuda", dtype=torch.bfloat16)
    out, lse = tileattn.attention_varlen(q, k, v, cu, cu, 1000, 1000, causal=True, return_lse=True)
    for b in (0, 300, 599):  # the first, a middle and the last sequence (offsets past 2^31)
        s0, s1 = int(cu[b]), int(cu[b + 1])
        seq = [t[s0:s1].transpose(0, 1)[None] for t in (q, k, v)]
        ref_out, ref_lse = chunked_reference(*seq, causal=True)
        assert_close(out[s0:s1].transpose(0, 1)[None], lse[:, s0:s1][None], ref_out, ref_lse)


def test_backward_past_2_31(packed_kv):
    """dq, dk, dv of a causal call over the packed 400k-token K/V (key offsets past 2^31 elements), against gradients
    derived chunk by chunk in fp32: ``P = exp(s - lse)``, ``dV = P^T dO``, ``dS = P (dO V^T - rowsum(dO O))``."""
    k, v = (t.detach().requires_grad_() for t in packed_kv)
    q = torch.randn(1, HQ, 128, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(1, HQ, 128, D, device="cuda", dtype=torch.bfloat16)
    out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    scale, sq, sk = D**-0.5, q.shape[2], k.shape[2]
    qf, gf = q.detach().float(), grad_out.float()
    ref_out, ref_lse = chunked_reference(qf, k.detach(), v.detach(), causal=True)
    delta = (gf * ref_out).sum(-1, keepdim=True)
    ref_dq = torch.zeros_like(qf)
    rows = torch.arange(sq, device="cuda")[:, None] + sk - sq
    for start in range(0, sk, 32768):
        stop = min(start + 32768, sk)
        kc, vc = (t.detach()[:, :, start:stop].float() for t in (k, v))
        p = torch.exp(qf @ kc.transpose(-1, -2) * scale - ref_lse[..., None])
        p = p.masked_fill(torch.arange(start, stop, device="cuda")[None, :] > rows, 0)
        ds = p * (gf @ vc.transpose(-1, -2) - delta)
        ref_dq += ds @ kc * scale
        assert_relatively_close(dk[:, :, start:stop], (ds.transpose(-1, -2) @ qf) * scale)
        assert_relatively_close(dv[:, :, start:stop], p.transpose(-1, -2) @ gf)
    assert_relatively_close(dq, ref_dq)


def assert_relatively_close(got, ref):
    """Within 2% of the reference's largest magnitude (the gradients over 400k keys are small: an absolute tolerance
    would pass anything)."""
    assert torch.isfinite(got).all()
    err, size = (got.float() - ref).abs().max().item(), ref.abs().max().item()
    assert size > 0 and err <= 2e-2 * size, f"max error {err:.3g} against max |ref| {size:.3g}"
