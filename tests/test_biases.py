"""ALiBi slopes and attention sinks: every entry point and backend that takes them, against a float64 expectation
built from the definitions alone (tests/definitions.py: ALiBi as an explicit additive bias, a sink as an extra key
column of the softmax whose value is never read), independently of ``tileattn.reference``'s own implementation."""

import pytest
import torch

import tileattn
from tileattn.reference import naive_attention
from tileattn.testing import assert_matches_oracle, random_qkv

from conftest import DEVICE, KERNEL_DTYPES
from definitions import expected

# The interpreter's numpy warns on the NaN and inf - inf that NaN and +inf sinks produce; here that is the point.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

BACKENDS = ("auto", "triton", "torch", "naive")  # triton: the interpreter on CPU


def biases(kind, b, hq):
    slopes = torch.rand(b, hq, device=DEVICE) if kind in ("alibi_batch", "both") else None
    if kind == "alibi":
        slopes = torch.rand(hq, device=DEVICE) * 0.5
    sinks = torch.randn(hq, device=DEVICE) * 2 if kind in ("sinks", "both") else None
    return slopes, sinks


def close(out, lse, ref, ref_lse):
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


KINDS = ("alibi", "alibi_batch", "sinks", "both")
OPTIONS = [dict(), dict(causal=True), dict(window=(6, 2)), dict(softcap=5.0, causal=True), dict(mask=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("sq,sk", [(19, 27), (70, 90)], ids=["decode_kernel", "prefill_kernel"])
def test_attention(backend, kind, options, sq, sk):
    """(19, 27): 38 query rows per K/V head, Triton's split-KV kernel; (70, 90): 140, its prefill kernel."""
    b, hq, hkv, d = 2, 4, 2, 16
    q, k, v = (torch.randn(b, h, s, d, device=DEVICE) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    slopes, sinks = biases(kind, b, hq)
    options = dict(options)
    keep = None
    if options.pop("mask", False):
        keep = torch.rand(b, 1, sq, sk, device=DEVICE) > 0.3
        keep[:, :, 4] = False  # a row that sees no key: out 0, lse = its sink (or -inf)
        options["mask"] = keep
    out, lse = tileattn.attention(q, k, v, alibi_slopes=slopes, sinks=sinks, return_lse=True, backend=backend,
                                  **options)
    ref, ref_lse = expected(q, k, v, slopes=slopes, sinks=sinks, mask=keep,
                            **{n: options[n] for n in ("causal", "window", "softcap") if n in options})
    close(out, lse, ref, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_varlen(backend, kind):
    lengths_q, lengths_k, hq, hkv, d = [5, 0, 11], [9, 4, 11], 4, 2, 16
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
                  for n in (lengths_q, lengths_k))
    q = torch.randn(sum(lengths_q), hq, d, device=DEVICE)
    k, v = (torch.randn(sum(lengths_k), hkv, d, device=DEVICE) for _ in range(2))
    slopes, sinks = biases(kind, len(lengths_q), hq)
    out, lse = tileattn.attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal=True,
                                         alibi_slopes=slopes, sinks=sinks, return_lse=True, backend=backend)
    for i, ((q0, q1), (k0, k1)) in enumerate(zip(zip(cu_q.tolist(), cu_q[1:].tolist()),
                                                 zip(cu_k.tolist(), cu_k[1:].tolist()))):
        seq = [t[a:z][None].transpose(1, 2) for t, a, z in ((q, q0, q1), (k, k0, k1), (v, k0, k1))]
        ref, ref_lse = expected(*seq, causal=True, slopes=None if slopes is None else slopes[i:i + 1] if
                                slopes.dim() == 2 else slopes, sinks=sinks)
        close(out[q0:q1].transpose(0, 1)[None], lse[:, q0:q1][None], ref, ref_lse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("page_size", [None, 8])
def test_kvcache(backend, kind, page_size):
    b, hq, hkv, d, cached, new = 2, 4, 2, 16, [7, 0], 2
    capacity = 16
    if page_size is None:
        k_cache, v_cache = (torch.randn(b, hkv, capacity, d, device=DEVICE) for _ in range(2))
        table = None
    else:
        k_cache, v_cache = (torch.randn(6, hkv, page_size, d, device=DEVICE) for _ in range(2))
        table = torch.tensor([[4, 1], [0, 5]], dtype=torch.int32, device=DEVICE)
    q = torch.randn(b, hq, new, d, device=DEVICE)
    k_new, v_new = (torch.randn(b, hkv, new, d, device=DEVICE) for _ in range(2))
    slopes, sinks = biases(kind, b, hq)
    seqlens = torch.tensor(cached, dtype=torch.int32, device=DEVICE)
    out, lse = tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               block_table=table, alibi_slopes=slopes, sinks=sinks, return_lse=True,
                                               backend=backend)
    for i, n in enumerate(cached):
        if table is None:
            keys, values = k_cache[i:i + 1, :, : n + new], v_cache[i:i + 1, :, : n + new]
        else:
            keys, values = (c[table[i].long()].transpose(0, 1).reshape(1, hkv, -1, d)[:, :, : n + new]
                            for c in (k_cache, v_cache))
        ref, ref_lse = expected(q[i:i + 1], keys, values, causal=True, sinks=sinks,
                                slopes=None if slopes is None else slopes[i:i + 1] if slopes.dim() == 2 else slopes)
        close(out[i:i + 1], lse[i:i + 1], ref, ref_lse)


def test_sink_semantics():
    """A row that sees no key: 0 with lse = its sink; a NaN sink makes its head NaN; -inf is no sink."""
    q, k, v = (torch.randn(1, 3, 10, 8, device=DEVICE) for _ in range(3))
    keep = torch.ones(1, 1, 10, 10, dtype=torch.bool, device=DEVICE)
    keep[..., 2, :] = False
    sinks = torch.tensor([0.5, float("nan"), float("-inf")], device=DEVICE)
    for backend in BACKENDS:
        out, lse = tileattn.attention(q, k, v, mask=keep, sinks=sinks, return_lse=True, backend=backend)
        assert (out[0, 0, 2] == 0).all() and lse[0, 0, 2] == 0.5
        assert out[0, 1, [0, 1, 3]].isnan().all() and lse[0, 1].isnan().all()
        plain, plain_lse = tileattn.attention(q, k, v, mask=keep, return_lse=True, backend=backend)
        torch.testing.assert_close(out[0, 2], plain[0, 2])
        torch.testing.assert_close(lse[0, 2], plain_lse[0, 2])
        assert torch.isfinite(out[0, 0]).all()


def test_bad_biases_are_clear_errors():
    q, k, v = (torch.randn(2, 4, 6, 8, device=DEVICE) for _ in range(3))
    cases = [(dict(alibi_slopes=torch.rand(4, dtype=torch.float64, device=DEVICE)), TypeError, "alibi_slopes"),
             (dict(alibi_slopes=torch.rand(3, device=DEVICE)), ValueError, "alibi_slopes"),
             (dict(alibi_slopes=torch.rand(3, 4, device=DEVICE)), ValueError, "alibi_slopes"),
             (dict(sinks=[0.0] * 4), TypeError, "sinks"),
             (dict(sinks=torch.rand(2, 4, device=DEVICE)), ValueError, "sinks"),
             (dict(sinks=torch.zeros(4, dtype=torch.int32, device=DEVICE)), TypeError, "sinks"),
             (dict(sinks=torch.rand(4), backend="sdpa"), ValueError, "sinks")]
    if DEVICE == "cuda":
        cases.append((dict(sinks=torch.rand(4, device="cpu")), ValueError, "sinks"))
    for kwargs, error, name in cases:
        with pytest.raises(error, match=name):
            tileattn.attention(q, k, v, **kwargs)


def test_alibi_is_shift_invariant_under_causality():
    """Under causal masking flash-attn's ``slope * j`` and our ``-slope * |i + diag - j|`` give the same output
    (they differ by a constant per row); lse differs by exactly ``slope * (i + diag)``."""
    q, k, v = (torch.randn(1, 2, s, 8, device=DEVICE, dtype=torch.float64) for s in (5, 9, 9))
    slopes = torch.tensor([0.25, 1.0], device=DEVICE)
    out, lse = tileattn.attention(q.float(), k.float(), v.float(), causal=True, alibi_slopes=slopes, return_lse=True)
    column_bias = slopes[:, None, None].double() * torch.arange(9, device=DEVICE)[None, None, :]
    ref, ref_lse = naive_attention(q, k, v, causal=True, mask=column_bias.expand(1, 2, 5, 9), return_lse=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    shift = slopes[:, None].double() * (torch.arange(5, device=DEVICE) + 4)[None, :]
    torch.testing.assert_close(lse[0].double() + shift, ref_lse[0], atol=1e-5, rtol=1e-5)


def test_keyless_rows_with_poisoned_sinks_agree_on_every_path():
    """A NaN or +inf sink makes its head's rows NaN (out and lse) also where no key exists at all (Sk = 0, an empty
    varlen sequence, an empty cache), as where every key is masked; a finite sink gives 0 and lse = sink."""
    sinks = torch.tensor([0.5, float("nan"), float("inf"), float("-inf")], device=DEVICE)

    def check(out, lse, heads_dim):  # out [..., Hq (heads_dim), ..., D]; lse with heads on heads_dim too
        for h, (value, head_lse) in enumerate(((0.0, 0.5), (None, None), (None, None), (0.0, float("-inf")))):
            o, l = out.select(heads_dim, h), lse.select(heads_dim, h)
            if value is None:
                assert o.isnan().all() and l.isnan().all()
            else:
                assert (o == value).all() and (l == head_lse).all()

    q = torch.randn(1, 4, 3, 8, device=DEVICE)
    empty = torch.randn(1, 2, 0, 8, device=DEVICE)
    keep = torch.zeros(1, 1, 3, 5, dtype=torch.bool, device=DEVICE)
    k = torch.randn(1, 2, 5, 8, device=DEVICE)
    for backend in BACKENDS:
        check(*tileattn.attention(q, empty, empty, sinks=sinks, return_lse=True, backend=backend), heads_dim=1)
        check(*tileattn.attention(q, k, k, mask=keep, sinks=sinks, return_lse=True, backend=backend), heads_dim=1)
        cu_q = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 0], dtype=torch.int32, device=DEVICE)
        out, lse = tileattn.attention_varlen(q[0].transpose(0, 1), empty[0].transpose(0, 1), empty[0].transpose(0, 1),
                                             cu_q, cu_k, 3, 0, sinks=sinks, return_lse=True, backend=backend)
        check(out.transpose(0, 1), lse, heads_dim=0)  # out [tokens, Hq, D] -> [Hq, tokens, D]; lse [Hq, tokens]
        cache = torch.randn(1, 2, 4, 8, device=DEVICE)
        out, lse = tileattn.attention_with_kvcache(q, cache, cache, torch.zeros(1, dtype=torch.int32, device=DEVICE),
                                                   sinks=sinks, return_lse=True, backend=backend)
        check(out, lse, heads_dim=1)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("options", [dict(), dict(causal=True), dict(window=(40, 3), softcap=20.0)],
                         ids=["plain", "causal", "window"])
@pytest.mark.parametrize("sq,sk", [(1, 300), (24, 200), (130, 250), (250, 130)],
                         ids=["decode", "decode_rows", "prefill", "prefill_more_queries"])
def test_kernels_in_every_dtype(dtype, kind, options, sq, sk):
    """The Triton kernels (``auto`` on CUDA) with ALiBi and sinks in fp16/bf16/fp32 against the float64 oracle
    under the library's tolerance rule (2x PyTorch's own error in that dtype), GQA 8/2, head_dim 64: key blocks
    left of, around and right of the rows' own positions, more queries than keys (rows that see none)."""
    q, k, v = random_qkv(2, 8, 2, sq, sk, 64, dtype=dtype, device=DEVICE)
    slopes, sinks = biases(kind, 2, 8)
    backend = "auto" if DEVICE == "cuda" else "triton"
    if DEVICE == "cuda":  # auto must pick the kernels here, or this would test the torch path again
        assert tileattn.explain(q, k, v, alibi_slopes=slopes, sinks=sinks, **options).backend == "triton"
    out, lse = tileattn.attention(q, k, v, alibi_slopes=slopes, sinks=sinks, return_lse=True, backend=backend,
                                  **options)
    assert_matches_oracle(out, q, k, v, lse, alibi_slopes=slopes, sinks=sinks, **options)


def test_explain_names_the_backend_that_runs_biased_calls():
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    decision = tileattn.explain(q, q, q, sinks=torch.zeros(2, device=DEVICE))
    assert decision.backend == ("triton" if DEVICE == "cuda" else "torch") and "sinks" in decision.reason
    with pytest.raises(ValueError, match="alibi_slopes"):
        tileattn.explain(q, q, q, alibi_slopes=torch.zeros(2, device=DEVICE), backend="sdpa_flash")
    assert tileattn.explain(q, q, q, sinks=torch.zeros(2, device=DEVICE), backend="triton").backend == "triton"


def test_sink_gradients_match_the_oracle_on_the_path_auto_picks():
    """A trained sink (gpt-oss's s_aux) gets its gradient on the path auto picks: the Triton backward on CUDA, the
    tiled PyTorch path elsewhere; slopes that require grad keep auto on the tiled path, the only one that gives
    them gradients."""
    q, k, v = (torch.randn(1, 4, s, 16, device=DEVICE) for s in (5, 9, 9))
    sinks = torch.randn(4, device=DEVICE, requires_grad=True)
    assert tileattn.explain(q, k, v, causal=True, sinks=sinks).backend == ("triton" if DEVICE == "cuda" else "torch")
    tileattn.attention(q, k, v, causal=True, sinks=sinks).sum().backward()
    oracle_sinks = sinks.detach().double().requires_grad_()
    naive_attention(q.double(), k.double(), v.double(), causal=True, sinks=oracle_sinks).sum().backward()
    torch.testing.assert_close(sinks.grad.double(), oracle_sinks.grad, atol=2e-3, rtol=1e-2)
    slopes = torch.rand(4, device=DEVICE, requires_grad=True)
    assert tileattn.explain(q, k, v, alibi_slopes=slopes).backend == "torch"
