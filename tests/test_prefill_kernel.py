"""The Triton prefill kernel itself: tile sizes that put block edges everywhere, poisoned outputs."""

import pytest
import torch

from tileattn.kernels.prefill import prefill_attention
from tileattn.reference import window_bounds
from tileattn.testing import assert_matches_oracle, random_qkv

from conftest import DEVICE, KERNEL_DTYPES


def launch(q, k, v, causal=False, window=None, out=None, **kwargs):
    scale = kwargs.pop("scale", q.shape[-1] ** -0.5)
    return prefill_attention(q, k, v, window=window_bounds(causal, window), scale=scale, return_lse=True,
                             out=out, **kwargs)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (16, 64), (64, 16), (32, 16)])
@pytest.mark.parametrize("sq,sk", [(37, 100), (100, 37), (64, 64), (1, 50)])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (False, (9, 17)), (True, (30, None)),
                                           (False, (0, 0)), (False, (None, 3))])
def test_block_edges(block_m, block_n, sq, sk, causal, window):
    q, k, v = random_qkv(1, 2, 1, sq, sk, 32, dtype=torch.float32, device=DEVICE)
    out, lse = launch(q, k, v, causal, window, config=(block_m, block_n, 4, 1))
    assert_matches_oracle(out, q, k, v, lse=lse, causal=causal, window=window)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_poisoned_output_is_fully_written(dtype):
    q, k, v = random_qkv(2, 4, 2, 77, 91, 48, dtype=dtype, device=DEVICE)
    # A strided output buffer ([B, S, H, D] seen as [B, H, S, D]) full of NaN: every element must be overwritten.
    out = torch.full((2, 77, 4, 48), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
    result, lse = launch(q, k, v, causal=True, out=out)
    assert result is out
    assert_matches_oracle(out, q, k, v, lse=lse, causal=True)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_rows_that_see_nothing_overwrite_poison_with_zero(dtype):
    q, k, v = random_qkv(1, 2, 2, 40, 10, 16, dtype=dtype, device=DEVICE)  # causal, Sq > Sk: 30 empty rows
    out = torch.full_like(q, float("nan"))
    launch(q, k, v, causal=True, out=out)
    assert (out[:, :, :30] == 0).all()
    assert_matches_oracle(out, q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(2, 32, 8, 4096, 4096, 128), (1, 16, 16, 2048, 8192, 64),
                                   (4, 8, 8, 1000, 1000, 256), (1, 32, 4, 16384, 16384, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_large_shapes_gpu(dtype, shape, causal):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, device="cuda", layout="bshd")
    out, lse = launch(q, k, v, causal)
    # The float64 oracle of a 16k x 16k problem is large: check the last 256 query rows, which with
    # bottom-right alignment are the same problem with Sq = 256 (they see the most keys).
    rows = slice(sq - 256, sq)
    assert_matches_oracle(out[:, :, rows], q[:, :, rows], k, v, lse=lse[:, :, rows], causal=causal)


@pytest.mark.gpu  # the tuned tiles only run on a GPU
@pytest.mark.parametrize("d", [16, 40, 64, 80, 96, 128, 200, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_tuned_configs_every_head_dim_gpu(d, dtype):
    q, k, v = random_qkv(2, 4, 2, 300, 517, d, dtype=dtype, device="cuda", layout="bshd")
    for causal in (False, True):
        out, lse = launch(q, k, v, causal)
        assert_matches_oracle(out, q, k, v, lse=lse, causal=causal)
