"""The reference implementations: the oracle itself is checked against PyTorch SDPA with masks built
independently (by loops), and the tiled algorithm against the oracle for many block sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from tileattn.reference import naive_attention, tiled_attention
from tileattn.testing import assert_matches_oracle, oracle, random_qkv


def loop_mask(sq, sk, causal, window):
    """Visibility built one pair at a time from the documented rule (independent of the code under test)."""
    left, right = ((-1 if w is None else w) for w in (window or (None, None)))
    allowed = torch.zeros(sq, sk, dtype=torch.bool)
    for i in range(sq):
        for j in range(sk):
            rel = j - (i + sk - sq)
            ok = (left < 0 or rel >= -left) and (right < 0 or rel <= right)
            allowed[i, j] = ok and (not causal or rel <= 0)
    return allowed


@pytest.mark.parametrize("sq,sk", [(1, 1), (7, 7), (5, 12), (12, 5), (16, 33)])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (3, 2)), (True, (4, None)),
                                           (False, (0, 0)), (False, (None, 1))])
def test_oracle_matches_sdpa_with_explicit_mask(sq, sk, causal, window):
    q, k, v = random_qkv(2, 4, 2, sq, sk, 8, dtype=torch.float64)
    out, lse = oracle(q, k, v, causal=causal, window=window)
    allowed = loop_mask(sq, sk, causal, window)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=allowed)
    rows = allowed.any(-1)  # SDPA returns NaN on rows with nothing allowed; we return 0 there
    torch.testing.assert_close(out[:, :, rows], expected[:, :, rows])
    assert (out[:, :, ~rows] == 0).all() and (lse[:, :, ~rows] == float("-inf")).all()
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(8)
    expected_lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), -1)
    torch.testing.assert_close(lse[:, :, rows].double(), expected_lse[:, :, rows], rtol=1e-6, atol=1e-6)


def test_oracle_causal_square_equals_sdpa_is_causal():
    q, k, v = random_qkv(1, 3, 3, 9, 9, 16, dtype=torch.float64)
    torch.testing.assert_close(naive_attention(q, k, v, causal=True),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_oracle_softcap_scale_and_masks_follow_the_formula():
    q, k, v = random_qkv(1, 2, 1, 6, 10, 8, dtype=torch.float64)
    bias = torch.randn(1, 1, 6, 10, dtype=torch.float64)
    keep = torch.rand(6, 10) > 0.3
    scores = (q @ k.transpose(-1, -2)) * 0.7
    scores = 5.0 * torch.tanh(scores / 5.0) + bias
    expected = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v
    out = naive_attention(q, k, v, scale=0.7, softcap=5.0, mask=bias)
    torch.testing.assert_close(out, torch.softmax(scores, -1) @ v)
    # A bool mask on top of the bias: the oracle applies both the same way.
    out2 = naive_attention(q, k, v, scale=0.7, softcap=5.0, mask=torch.where(keep, bias, float("-inf")))
    torch.testing.assert_close(out2[:, :, keep.any(-1)], expected[:, :, keep.any(-1)])


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (3, 5), (16, 7), (256, 512)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_tiled_matches_oracle(block_q, block_k, dtype):
    q, k, v = random_qkv(2, 4, 2, 19, 37, 24, dtype=dtype, layout="bshd")
    mask = torch.rand(2, 1, 19, 37) > 0.2
    mask[0, 0, 3] = False  # a fully masked row
    for options in (dict(), dict(causal=True), dict(window=(5, 3), softcap=2.0), dict(mask=mask, causal=True)):
        out, lse = tiled_attention(q, k, v, return_lse=True, block_q=block_q, block_k=block_k, **options)
        assert_matches_oracle(out, q, k, v, lse=lse, **options)


def test_tiled_extra_memory_is_independent_of_key_length():
    """The tiled path allocates per block, never Sq x Sk: its largest temporary does not grow with Sk."""
    sizes = []
    for sk in (512, 4096):
        q, k, v = random_qkv(1, 2, 2, 64, sk, 16, dtype=torch.float32)
        with torch.profiler.profile(profile_memory=True) as prof:
            tiled_attention(q, k, v, block_q=64, block_k=256)
        sizes.append(max(e.cpu_memory_usage for e in prof.events()))
        del prof
    assert sizes[1] <= sizes[0], f"largest allocation grew with Sk: {sizes}"
