"""The FlashAttention backward (``tileattn.kernels.backward``, through ``tileattn.attention``'s autograd): dq, dk, dv
and the lse's gradient against the float64 oracle's autograd, over awkward shapes, GQA, Sq != Sk, causal, windows,
softcap, masks with fully-masked rows and non-contiguous layouts, under flash-attn's rule: at most a few times the
error of PyTorch's own attention in the same precision."""

import math

import pytest
import torch

import tileattn
from tileattn.reference import naive_attention
from tileattn.testing import random_qkv

from conftest import DEVICE, KERNEL_DTYPES

SHAPES = [  # b, hq, hkv, sq, sk, d
    (1, 1, 1, 1, 1, 16),
    (2, 4, 2, 17, 33, 32),
    (1, 4, 1, 40, 24, 40),
    (2, 2, 2, 64, 64, 64),
    (1, 6, 3, 3, 70, 24),
]
if DEVICE == "cuda":  # the GPU's tiles (64-128 rows and keys): interior blocks, several edge blocks, every head dim
    SHAPES += [(2, 4, 2, 300, 517, 128), (1, 2, 2, 1024, 1024, 64), (1, 4, 1, 200, 130, 256), (1, 2, 1, 513, 77, 96)]
OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(5, 2)),
    "causal_softcap": dict(causal=True, softcap=8.0),
    "additive_mask": dict(mask="additive"),
    "bool_mask": dict(mask="bool"),
    "alibi": dict(causal=True, alibi_slopes="per_sequence"),
    "sinks_window": dict(window=(6, 1), sinks=True),
    "alibi_sinks_softcap": dict(alibi_slopes="per_head", sinks=True, softcap=5.0),
}


def _mask(kind, b, hq, sq, sk, dtype):
    if kind == "additive":  # per key and query, shared by the heads: a broadcast view
        return torch.randn(b, 1, sq, sk, device=DEVICE).to(dtype)
    mask = torch.rand(b, hq, sq, sk, device=DEVICE) > 0.3
    mask[:, :, 0] = False  # a row that sees no key: its gradients are 0
    return mask


def _gradients(fn, q, k, v, grad_out, grad_lse, **options):
    """Gradients of a random linear function of ``(out, lse)``: of q, k, v, and of the sinks when given."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    inputs = (q, k, v)
    if options.get("sinks") is not None:
        options["sinks"] = options["sinks"].detach().requires_grad_()
        inputs += (options["sinks"],)
    out, lse = fn(q, k, v, return_lse=True, **options)
    seen = torch.isfinite(lse)  # rows that see no key have lse -inf: no gradient flows through theirs
    loss = (out * grad_out.to(out.dtype)).sum() + (torch.where(seen, lse, 0) * grad_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, inputs)


def _biases(options, b, hq, dtype):
    """ALiBi slopes (fp32, ``[Hq]`` or ``[B, Hq]``) and sinks (q's dtype, ``[Hq]``) for the options that ask."""
    kind = options.pop("alibi_slopes", None)
    if kind is not None:
        options["alibi_slopes"] = torch.rand(*((b, hq) if kind == "per_sequence" else (hq,)), device=DEVICE) * 0.5
    if options.pop("sinks", None):
        options["sinks"] = torch.randn(hq, device=DEVICE).to(dtype)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gradients_match_the_oracle(shape, option, dtype):
    b, hq, hkv, sq, sk, d = shape
    options = dict(OPTIONS[option])
    if "mask" in options:
        options["mask"] = _mask(options["mask"], b, hq, sq, sk, dtype)
    _biases(options, b, hq, dtype)
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, device=DEVICE, layout="bshd" if sq % 2 else "contiguous")
    grad_out = torch.randn(b, hq, sq, d, device=DEVICE)
    grad_lse = torch.randn(b, hq, sq, device=DEVICE)
    ours = _gradients(tileattn.attention, q, k, v, grad_out, grad_lse, backend="triton", **options)

    def oracle(q, k, v, **kw):
        mask = kw.pop("mask", None)
        mask = mask if mask is None or mask.dtype == torch.bool else mask.double()
        if kw.get("sinks") is not None:
            kw["sinks"] = kw["sinks"].double()
        return naive_attention(q, k, v, mask=mask, **kw)

    def low_precision(q, k, v, **kw):  # PyTorch's own attention in the inputs' precision
        return naive_attention(q, k, v, **kw)

    exact = _gradients(oracle, *(t.double() for t in (q, k, v)), grad_out.double(), grad_lse.double(), **options)
    same_precision = _gradients(low_precision, q, k, v, grad_out, grad_lse, **options)
    assert len(ours) == len(exact) == (4 if "sinks" in options else 3)
    for name, g, ref, base in zip(("dq", "dk", "dv", "dsinks"), ours, exact, same_precision):
        assert g.shape == ref.shape and g.dtype == dtype
        assert torch.isfinite(g).all(), f"{name} has NaN/Inf"
        err = (g.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        ulps = 16 * max(1, math.ceil(math.log2(max(sk, 2)))) if dtype == torch.float32 else 2
        bound = 3 * base_err + ulps * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (3x naive {dtype} error + {ulps} ulp)"


def test_backward_is_deterministic():
    q, k, v = random_qkv(2, 4, 2, 37, 45, 32, dtype=torch.float16, device=DEVICE)
    grad_out = torch.randn(2, 4, 37, 32, device=DEVICE)
    first = _gradients(tileattn.attention, q, k, v, grad_out, torch.zeros(2, 4, 37, device=DEVICE), causal=True,
                       backend="triton")
    again = _gradients(tileattn.attention, q, k, v, grad_out, torch.zeros(2, 4, 37, device=DEVICE), causal=True,
                       backend="triton")
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_mask_that_requires_grad_gets_its_gradient():
    """The Triton backward has no mask gradient: such a call runs on the differentiable tiled path instead."""
    q, k, v = random_qkv(1, 2, 2, 9, 11, 16, dtype=torch.float32, device=DEVICE)
    mask = torch.randn(1, 1, 9, 11, device=DEVICE, requires_grad=True)
    tileattn.attention(q, k, v, mask=mask, backend="triton").sum().backward()
    assert mask.grad is not None and mask.grad.abs().sum() > 0


def test_auto_gives_gradients_on_every_device():
    """Whatever ``auto`` picks (SDPA's kernels, the Triton kernels, the tiled path), the inputs get gradients, for
    plain calls and for those only the Triton kernels or the tiled path run (masks, windows, decode shapes)."""
    for options, sq in ((dict(causal=True), 24), (dict(window=(3, 0)), 24), (dict(), 1)):
        q, k, v = (t.requires_grad_() for t in random_qkv(1, 4, 2, sq, 24, 32, dtype=torch.float32, device=DEVICE))
        tileattn.attention(q, k, v, **options).square().sum().backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, k, v)), options
