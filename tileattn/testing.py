"""Test helpers: random inputs in awkward layouts, and the comparison against the float64 oracle.

Tolerance rule (FlashAttention's): a backend's max error against the float64 result may be at most
twice the max error of PyTorch's own naive attention computed in the input's precision, plus a small
absolute term: one unit of rounding of that precision at the output's magnitude
(``finfo(dtype).eps * max(1, max|ref|)``) for fp16/bf16, eight for fp32. In fp32 the naive baseline is
~1 ulp, while the kernels fold the softmax scale into the ``exp2`` argument (FlashAttention's trick):
rounding that argument costs ``eps * |logit|`` relative, a few ulps at logits ~10. Real defects (a
wrong mask, a skipped block) are orders of magnitude larger. LSE is checked absolutely: it is computed in fp32
from the same rounded inputs, so precision of the inputs does not enter it.

Gradients follow flash-attn's rule for dq/dk/dv: at most 3x the error of PyTorch's own gradients in the same
precision, plus a few ulps (:func:`assert_gradients_match_oracle`).
"""

from __future__ import annotations

import math

import torch

from .reference import lse_dtype, naive_attention

LAYOUTS = ("contiguous", "bshd", "strided", "dmajor")


def random_tensor(b, h, s, d, *, dtype, device, layout="contiguous", generator=None):
    """A fresh N(0, 1) ``[b, h, s, d]`` tensor, as a view with the memory layout ``layout``:

    ``contiguous``; ``bshd`` (a ``[B, S, H, D]`` buffer seen through ``transpose(1, 2)``);
    ``strided`` (every other head and the first ``d`` of ``d + 8`` columns of a larger buffer);
    ``dmajor`` (head_dim is the slow axis: stride of the last dim != 1).
    """
    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float32).to(dtype=dtype, device=device)

    if layout == "contiguous":
        return randn(b, h, s, d)
    if layout == "bshd":
        return randn(b, s, h, d).transpose(1, 2)
    if layout == "strided":
        return randn(b, 2 * h, s, d + 8)[:, ::2, :, :d]
    if layout == "dmajor":
        return randn(b, h, d, s).transpose(2, 3)
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def random_qkv(b, hq, hkv, sq, sk, d, *, dtype, device="cpu", layout="contiguous", seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    q = random_tensor(b, hq, sq, d, dtype=dtype, device=device, layout=layout, generator=gen)
    k = random_tensor(b, hkv, sk, d, dtype=dtype, device=device, layout=layout, generator=gen)
    v = random_tensor(b, hkv, sk, d, dtype=dtype, device=device, layout=layout, generator=gen)
    return q, k, v


def oracle(q, k, v, **options):
    """float64 ``(out, lse)`` of the naive reference on upcast inputs (mask kept as given)."""
    return naive_attention(q.double(), k.double(), v.double(), return_lse=True, **options)


def assert_matches_oracle(out, q, k, v, lse=None, **options):
    """Check ``out`` (and ``lse``) of ``attention(q, k, v, **options)`` against the float64 oracle."""
    ref, ref_lse = oracle(q, k, v, **options)
    assert out.shape == (*q.shape[:-1], v.shape[-1]) and out.dtype == q.dtype and out.device == q.device
    assert torch.isfinite(out).all(), "output has NaN/Inf (unwritten or masked rows leaking)"
    if out.numel() == 0:
        return
    err = (out.double() - ref).abs().max().item()
    if q.dtype == torch.float64:
        bound, rule = 1e-10, "float64"
    else:
        low_precision = naive_attention(q, k, v, **options)
        base = (low_precision.double() - ref).abs().max().item()
        # fp32: the naive path's own error is often lucky-small; a blocked online softmax adds a rounding per key
        # block and rescale, so its floor grows with log2 of the keys (fp16/bf16 keep 1 ulp: their naive error
        # dominates)
        keys = k.shape[-2]
        ulps = 8 * max(1, math.ceil(math.log2(max(keys, 2)))) if q.dtype == torch.float32 else 1
        bound = 2 * base + ulps * torch.finfo(q.dtype).eps * max(1.0, ref.abs().max().item())
        rule = f"2x naive {q.dtype} error + {ulps} ulp of |out|"
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} ({rule})"
    empty_rows = ref_lse == float("-inf")
    assert (out[empty_rows] == 0).all(), "rows that see no key must be exactly 0"
    if lse is not None:
        assert lse.shape == q.shape[:3] and lse.dtype == lse_dtype(q.dtype)
        assert torch.equal(lse == float("-inf"), empty_rows), "lse must be -inf exactly on rows that see no key"
        lse_err = (lse.double() - ref_lse)[~empty_rows].abs()
        assert lse_err.numel() == 0 or lse_err.max().item() <= 1e-4, f"lse error {lse_err.max().item():.3g}"


def attention_gradients(fn, inputs, grad_out, grad_lse):
    """The gradients with respect to ``inputs`` of ``sum(out * grad_out) + sum(lse * grad_lse)``, where
    ``fn(*inputs)`` gives ``(out, lse)``: over the rows whose lse is finite (a row that sees no key has lse
    ``-inf`` and passes nothing back through it). ``inputs`` are taken as detached leaves that require grad."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    out, lse = fn(*inputs)
    seen = torch.isfinite(lse)
    loss = (out * grad_out.to(out.dtype)).sum() + (torch.where(seen, lse, 0) * grad_lse.to(lse.dtype)).sum()
    return torch.autograd.grad(loss, inputs)


def assert_gradients_match_oracle(fn, inputs, *, oracle, names, keys):
    """The gradients of ``fn`` (``fn(*inputs) -> (out, lse)``) against those of ``oracle`` (the same function in
    plain PyTorch, differentiated in float64 and in the inputs' precision), under fresh random output and lse
    gradients, by flash-attn's rule for dq/dk/dv: at most 3x the error of PyTorch's own gradients in the same
    precision, plus a few ulps (more in fp32, where the blocked online softmax rounds once per key block: they grow
    with log2 of the ``keys``). ``names`` name the inputs' gradients in failure messages."""
    with torch.no_grad():
        out, lse = oracle(*inputs)
    grad_out = torch.randn(out.shape, device=out.device)
    grad_lse = torch.randn(lse.shape, device=lse.device)
    got = attention_gradients(fn, inputs, grad_out, grad_lse)
    exact = attention_gradients(oracle, [t.double() for t in inputs], grad_out.double(), grad_lse.double())
    same_precision = attention_gradients(oracle, inputs, grad_out, grad_lse)
    dtype = inputs[0].dtype
    ulps = 16 * max(1, math.ceil(math.log2(max(keys, 2)))) if dtype == torch.float32 else 2
    for name, g, ref, base in zip(names, got, exact, same_precision, strict=True):
        assert g.shape == ref.shape and g.dtype == dtype, f"{name}: {g.dtype} {tuple(g.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(g).all(), f"{name} has NaN/Inf"
        err = (g.double() - ref).abs().max().item()
        base_err = (base.double() - ref).abs().max().item()
        bound = 3 * base_err + ulps * torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} (3x naive {dtype} error + {ulps} ulp)"


def capture_graph(fn):
    """``(graph, out)``: ``fn`` captured in a CUDA graph after a warm-up call on a side stream (the first call of a
    kernel compiles and allocates, which capture forbids); ``out`` is the captured call's result, rewritten by
    every ``graph.replay()``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out
