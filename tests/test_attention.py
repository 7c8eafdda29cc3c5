"""``tileattn.attention`` on every backend against the float64 oracle, plus input validation.

On CPU the Triton kernel runs through the interpreter (fp16/fp32); with CUDA the same grid runs on
the GPU and adds bf16.
"""

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tileattn
from tileattn.testing import LAYOUTS, assert_matches_oracle, random_qkv

from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES

BACKENDS = ["triton", "torch"]

# (batch, q heads, kv heads, Sq, Sk, head_dim): awkward lengths, Sq != Sk both ways, GQA 1/4/8.
SHAPES = [
    (1, 1, 1, 1, 1, 16),
    (2, 4, 4, 17, 113, 40),
    (1, 4, 1, 113, 17, 80),
    (1, 8, 1, 1, 255, 64),
    (2, 4, 1, 255, 255, 96),
    (1, 2, 2, 17, 1023, 128),
    (1, 2, 1, 255, 113, 256),
    (1, 3, 3, 33, 65, 7),
    (1, 2, 2, 1023, 1023, 64),
    (2, 8, 2, 3, 300, 256),
]


def make_mask(kind, b, hq, sq, sk, device):
    """A mask with ~20% of pairs hidden and at least one fully masked row; or one shared by all query rows."""
    if kind is None:
        return None
    keep = torch.rand(b, 1, sq, sk, device=device) > 0.2
    keep[:, :, sq // 2] = False
    if kind == "keys":  # a padding mask [B, 1, 1, Sk] (one row for all queries): left padding, batch 1 all padding
        start = torch.randint(0, max(1, sk // 2), (b,), device=device)
        start[1:2] = sk
        return (torch.arange(sk, device=device) >= start[:, None])[:, None, None, :]
    if kind == "key_bias":  # additive [1, 1, 1, Sk], some keys hidden
        bias = torch.randn(1, 1, 1, sk, device=device)
        return bias.masked_fill(torch.rand(1, 1, 1, sk, device=device) < 0.2, float("-inf"))
    if kind == "bool":
        return keep
    bias = torch.randn(1, hq, sq, sk, device=device) * 0.5  # additive, broadcast over batch
    return torch.where(keep, bias, float("-inf"))


OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(13, 5)),
    "window_left_causal": dict(window=(20, None), causal=True),
    "softcap_scale": dict(softcap=3.0, scale=0.3),
    "bool_mask": dict(mask="bool"),
    "additive_mask_causal": dict(mask="additive", causal=True),
    "padding_mask_causal": dict(mask="keys", causal=True),
    "key_bias": dict(mask="key_bias"),
}


def run_case(backend, shape, dtype, options, layout="contiguous"):
    b, hq, hkv, sq, sk, d = shape
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, device=DEVICE, layout=layout)
    options = dict(options)
    options["mask"] = make_mask(options.get("mask"), b, hq, sq, sk, DEVICE)
    out, lse = tileattn.attention(q, k, v, return_lse=True, backend=backend, **options)
    assert_matches_oracle(out, q, k, v, lse=lse, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape_index", range(len(SHAPES)))
def test_matches_oracle(backend, dtype, option, shape_index):
    layout = LAYOUTS[shape_index % len(LAYOUTS)]  # every layout meets every option across the shapes
    run_case(backend, SHAPES[shape_index], dtype, OPTIONS[option], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_triton(layout):
    run_case("triton", (2, 4, 2, 70, 90, 64), torch.float16, dict(causal=True), layout)


def test_float64_on_torch_backends():
    q, k, v = random_qkv(2, 4, 2, 33, 47, 24, dtype=torch.float64)
    for backend in ("torch", "naive", "auto"):
        out, lse = tileattn.attention(q, k, v, causal=True, return_lse=True, backend=backend)
        assert_matches_oracle(out, q, k, v, lse=lse, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    q, k, v = random_qkv(2, 4, 2, 100, 130, 64, dtype=torch.float16, device=DEVICE)
    first = tileattn.attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(first, tileattn.attention(q, k, v, causal=True, backend=backend))


def test_output_keeps_the_query_layout():
    q, k, v = random_qkv(1, 4, 4, 16, 16, 32, dtype=torch.float16, device=DEVICE, layout="bshd")
    out = tileattn.attention(q, k, v, backend="triton")
    assert out.stride() == q.stride()  # so out.transpose(1, 2) is a contiguous [B, S, H, D]


def test_default_backend_runs():
    q, k, v = random_qkv(1, 2, 2, 10, 12, 16, dtype=torch.float32, device=DEVICE)
    assert_matches_oracle(tileattn.attention(q, k, v), q, k, v)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
    sq=st.integers(1, 150), sk=st.integers(1, 150), d=st.integers(1, 160),
    causal=st.booleans(), left=st.sampled_from([None, 0, 3, 40]), right=st.sampled_from([None, 0, 2, 50]),
    softcap=st.sampled_from([None, 2.0]), mask=st.sampled_from([None, "bool", "additive"]),
    layout=st.sampled_from(LAYOUTS), dtype=st.sampled_from(KERNEL_DTYPES),
)
def test_property_random_shapes_and_options(b, hkv, group, sq, sk, d, causal, left, right, softcap, mask,
                                            layout, dtype):
    window = None if left is None and right is None else (left, right)
    options = dict(causal=causal, window=window, softcap=softcap, mask=mask)
    run_case("triton", (b, hkv * group, hkv, sq, sk, d), dtype, options, layout)


# ---- results without a kernel launch ------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,sq,sk", [(0, 5, 5), (2, 0, 5), (2, 5, 0)])
def test_empty_inputs(backend, b, sq, sk):
    q, k, v = random_qkv(b, 4, 2, sq, sk, 16, dtype=torch.float16, device=DEVICE)
    out, lse = tileattn.attention(q, k, v, return_lse=True, backend=backend)
    assert out.shape == (b, 4, sq, 16) and out.dtype == q.dtype
    assert (out == 0).all() and (lse == float("-inf")).all() and lse.shape == (b, 4, sq)


def test_nan_in_a_visible_key_reaches_only_rows_that_can_see_it():
    """Documented result: inputs are not scanned; non-finite values propagate through rows that use them."""
    q, k, v = random_qkv(1, 1, 1, 8, 8, 16, dtype=torch.float32, device=DEVICE)
    k[0, 0, 5] = float("nan")
    out = tileattn.attention(q, k, v, causal=True, backend="triton")
    assert torch.isnan(out[0, 0, 5:]).all() and torch.isfinite(out[0, 0, :5]).all()


# ---- validation: clear errors before any launch ---------------------------------------------------

def _qkv(**overrides):
    q, k, v = random_qkv(2, 4, 2, 8, 8, 16, dtype=torch.float32)
    return {"q": q, "k": k, "v": v, **overrides}


@pytest.mark.parametrize("args,error,match", [
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.randn(2, 2, 8)), ValueError, "k must have 4 dims"),
    (dict(v=torch.zeros(2, 2, 8, 16, dtype=torch.int32)), TypeError, "v must be float16"),
    (dict(k=torch.randn(2, 2, 8, 16, dtype=torch.float16)), TypeError, "k must have q's dtype"),
    (dict(k=torch.randn(3, 2, 8, 16)), ValueError, "k batch size 3"),
    (dict(k=torch.randn(2, 2, 8, 8)), ValueError, "k head_dim 8 != q head_dim 16"),
    (dict(k=torch.randn(2, 3, 8, 16), v=torch.randn(2, 3, 8, 16)), ValueError, r"q heads \(4\) must be a positive multiple"),
    (dict(v=torch.randn(2, 2, 9, 16)), ValueError, "k and v must have the same heads and length"),
    (dict(q=torch.randn(1, 1, 2, 577), k=torch.randn(1, 1, 2, 577), v=torch.randn(1, 1, 2, 512)), ValueError,
     "q/k head_dim must be between 1 and 576"),
    (dict(q=torch.randn(1, 1, 2, 0), k=torch.randn(1, 1, 2, 0), v=torch.randn(1, 1, 2, 0)), ValueError,
     "q/k head_dim must be between 1 and 576"),
    (dict(v=torch.randn(2, 2, 8, 513)), ValueError, "v head_dim must be between 1 and 512"),
    (dict(v=torch.randn(2, 2, 8, 0)), ValueError, "v head_dim must be between 1 and 512"),
])
def test_bad_tensors(args, error, match):
    a = _qkv(**args)
    with pytest.raises(error, match=match):
        tileattn.attention(a["q"], a["k"], a["v"])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale=math.inf), ValueError, "scale must be finite"),
    (dict(scale="0.1"), TypeError, "scale must be a real number"),
    (dict(window=(1, 2, 3)), ValueError, "window must be None or a"),
    (dict(window=(-2, 0)), ValueError, "window left must be >= 0"),
    (dict(window=(0, 1.5)), ValueError, "window right must be an int"),
    (dict(softcap=0.0), ValueError, "softcap must be a finite number > 0"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite number > 0"),
    (dict(causal=1), TypeError, "causal must be a bool"),
    (dict(mask=torch.ones(3, 8, 8, dtype=torch.bool)), ValueError, "mask of shape"),
    (dict(mask=torch.ones(8, 8, dtype=torch.int64)), TypeError, "mask must be bool"),
    (dict(mask=[[True]]), TypeError, "mask must be a torch.Tensor"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_options(kwargs, error, match):
    a = _qkv()
    with pytest.raises(error, match=match):
        tileattn.attention(a["q"], a["k"], a["v"], **kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (full-size tiles and grids)")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8, 32, 32, 64, 700, 128), (4, 32, 8, 8, 700, 256), (1, 16, 2, 1, 3000, 256)])
@pytest.mark.parametrize("mask", [None, "keys", "bool"])
def test_decode_shaped_full_size(dtype, shape, mask):
    """Decode-shaped calls at sizes whose tiles must shrink to fit shared memory (64-row masked tiles, D = 256,
    fp32), on grids larger and smaller than the GPU."""
    run_case("triton", shape, dtype, dict(causal=True, mask=mask))


def test_triton_backend_refuses_float64():
    q, k, v = random_qkv(1, 1, 1, 4, 4, 16, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="float16, bfloat16 and float32"):
        tileattn.attention(q, k, v, backend="triton")


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without CUDA")
def test_triton_backend_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = random_qkv(1, 1, 1, 4, 4, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="need CUDA tensors"):
        tileattn.attention(q, k, v, backend="triton")


@pytest.mark.gpu
def test_mismatched_devices():
    q, k, v = random_qkv(1, 1, 1, 4, 4, 16, dtype=torch.float16, device="cuda")
    with pytest.raises(ValueError, match="k must be on q's device"):
        tileattn.attention(q, k.cpu(), v)
    with pytest.raises(ValueError, match="mask must be on q's device"):
        tileattn.attention(q, k, v, mask=torch.ones(4, 4, dtype=torch.bool))


def test_triton_calls_that_require_grad_get_a_backward():
    """A Triton call on inputs that require grad runs through the FlashAttention backward (tests/test_backward.py
    checks its values), with sinks too (they get a gradient); ALiBi slopes that require grad run on the tiled path,
    as a mask that requires grad does. The varlen and decode kernels have no backward yet: asked for explicitly,
    they still run forward (inference that forgot torch.no_grad() works) and a backward through their result raises,
    naming the entry point, instead of leaving q, k, v without gradients."""
    q, k, v = random_qkv(1, 2, 2, 8, 8, 16, dtype=torch.float32, device=DEVICE)
    q.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = tileattn.attention(q, k, v, backend="triton")
    assert out.grad_fn is not None
    sinks = torch.zeros(2, device=DEVICE, requires_grad=True)
    slopes = torch.rand(2, device=DEVICE, requires_grad=True)
    tileattn.attention(q, k, v, sinks=sinks, alibi_slopes=slopes, backend="triton").sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (q, sinks, slopes))
    assert "require grad" in tileattn.explain(q, k, v, alibi_slopes=slopes, backend="triton").reason
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    q3, k3, v3 = (t[0].transpose(0, 1) for t in (q, k, v))
    without_backward = {
        "attention_varlen": lambda: tileattn.attention_varlen(q3, k3, v3, cu, cu, 5, 5, backend="triton"),
        "attention_with_kvcache": lambda: tileattn.attention_with_kvcache(
            q, k, v, torch.tensor([8], dtype=torch.int32, device=DEVICE), backend="triton"),
    }
    for name, call in without_backward.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = call()
        with pytest.raises(RuntimeError, match=f"{name}.*no backward yet.*backend='auto'"):
            out.sum().backward()
        with torch.no_grad():
            assert not call().requires_grad


def test_auto_gives_varlen_and_kvcache_calls_that_require_grad_a_backward(monkeypatch):
    """Where auto picks the varlen or decode kernel (CUDA; forced here), a call that requires grad runs on a path with
    a backward instead: the gradients of q, k, v (and of the appended tokens) are the torch backend's."""
    monkeypatch.setattr(tileattn.dispatch, "choose_backend",
                        lambda q, v, requested, k=None: "triton" if requested == "auto" else requested)
    tileattn.api._prepared.clear()
    q, k, v = (t[0].transpose(0, 1) for t in random_qkv(1, 4, 2, 8, 8, 16, dtype=torch.float32, device=DEVICE))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = (torch.randn(2, 2, 12, 16, device=DEVICE) for _ in range(2))
    q_new, k_new, v_new = (torch.randn(2, h, 2, 16, device=DEVICE) for h in (4, 2, 2))
    lengths = torch.tensor([3, 10], dtype=torch.int32, device=DEVICE)
    calls = {
        "varlen": ((q, k, v), lambda q, k, v, backend: tileattn.attention_varlen(
            q, k, v, cu, cu, 5, 5, causal=True, return_lse=True, backend=backend)),
        "kvcache": ((q_new, k_new, v_new), lambda q, k, v, backend: tileattn.attention_with_kvcache(
            q, k_cache.clone(), v_cache.clone(), lengths, k_new=k, v_new=v, return_lse=True, backend=backend)),
    }
    for name, (inputs, call) in calls.items():
        gradients = {}
        for backend in ("auto", "torch"):
            leaves = [t.detach().requires_grad_() for t in inputs]
            out, lse = call(*leaves, backend=backend)
            gradients[backend] = torch.autograd.grad(out.square().sum() + lse.sum(), leaves)
        for got, expected in zip(gradients["auto"], gradients["torch"]):
            torch.testing.assert_close(got, expected, msg=lambda m: f"{name}: {m}")
    tileattn.api._prepared.clear()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("options", [dict(causal=True), dict(causal=False, window=(3, 0), return_lse=True)])
def test_a_growing_cache_reuses_its_first_checks_and_stays_exact(dtype, options, monkeypatch):
    """Decode steps over K/V one key longer each call (Transformers' DynamicCache) reuse the checks and backend of
    their first step (the length-free family in tileattn.api); every length, in an order that alternates what Triton
    specializes on (1, multiples of 16, others), matches the oracle with the call's own options, and calls that break
    the family (k and v of unequal lengths, no keys, a non-contiguous cache) still get the full checks."""
    tileattn.api._prepared.clear()
    tileattn.api._families.clear()
    checks = []
    check = tileattn.api._check_attention_call
    monkeypatch.setattr(tileattn.api, "_check_attention_call", lambda *args: checks.append(1) or check(*args))
    q = torch.randn(2, 8, 1, 16, dtype=dtype, device=DEVICE)
    k_all, v_all = (torch.randn(2, 2, 40, 16, dtype=dtype, device=DEVICE) for _ in range(2))
    for length in (5, 6, 16, 1, 17, 32, 33, 7):
        k, v = k_all[:, :, :length].contiguous(), v_all[:, :, :length].contiguous()
        result = tileattn.attention(q, k, v, **options, backend="triton")
        out, lse = result if options.get("return_lse") else (result, None)
        assert_matches_oracle(out, q, k, v, lse, **{o: x for o, x in options.items() if o != "return_lse"})
    assert len(checks) == 1 and len(tileattn.api._families) == 1  # one family: the first length was checked
    with pytest.raises(ValueError, match="same heads and length"):
        tileattn.attention(q, k_all[:, :, :9].contiguous(), v_all[:, :, :8].contiguous(), **options, backend="triton")
    empty = tileattn.attention(q, k_all[:, :, :0].contiguous(), v_all[:, :, :0].contiguous(), **options,
                               backend="triton")
    assert not (empty[0] if options.get("return_lse") else empty).any()
    k, v = k_all[:, :, :11], v_all[:, :, :11]  # views into the longer cache: other strides, the full path
    result = tileattn.attention(q, k, v, **options, backend="triton")
    out, lse = result if options.get("return_lse") else (result, None)
    assert_matches_oracle(out, q, k, v, lse, **{o: x for o, x in options.items() if o != "return_lse"})
    tileattn.api._prepared.clear()
    tileattn.api._families.clear()


@pytest.mark.parametrize("bad", [dict(causal=1), dict(window=(1.0, 2)), dict(window=(True, 2)), dict(scale=True),
                                 dict(softcap=True), dict(scale=float("nan"))])
def test_a_cached_signature_lets_no_invalid_option_through(bad):
    """Validated calls are cached by signature; a value that compares equal to a valid one (1 == True == 1.0)
    must still be checked."""
    q, k, v = random_qkv(1, 2, 2, 5, 9, 16, dtype=torch.float32, device=DEVICE)
    good = dict(causal=True, window=(1, 2), scale=1.0, softcap=1.0)
    tileattn.attention(q, k, v, **good, backend="torch")
    with pytest.raises((TypeError, ValueError)):
        tileattn.attention(q, k, v, **{**good, **bad}, backend="torch")
