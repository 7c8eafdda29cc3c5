"""The Hopper (sm_90, Gluon) prefill kernel, tileattn/kernels/hopper.py.

On any machine: which calls it refuses and why, and that the module imports without a GPU (or a Gluon). On an H100 /
H200 with Triton 3.6: every option it takes (fp16 / bf16, head dims 64 and 128, causal or not, Sq != Sk both ways with
keyless rows, GQA, batches, [B, S, H, D] views, given output views, lse) against the float64 oracle, through the plan
``prefill_plan`` builds (each case asserts it got a HopperPlan), with outputs pre-filled with NaN so an unwritten row
shows; that ``tileattn.attention`` takes that path and TILEATTN_HOPPER=0 leaves it; offsets past 2^31 elements.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tileattn
from tileattn import dispatch
from tileattn.kernels import hopper, prefill
from tileattn.kernels.hopper import HopperPlan, hopper_unsupported_reason
from tileattn.kernels.prefill import PrefillPlan, prefill_plan
from tileattn.testing import assert_matches_oracle, oracle, random_qkv

from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parents[1]
PLAIN, CAUSAL = (-1, -1), (-1, 0)  # prefill windows (causal folded in as right = 0)


# ---- on any machine ------------------------------------------------------------------------------------------

def cpu_call(sq=2048, sk=2048, d=64, d_v=None, dtype=torch.float16, layout="contiguous", hq=2, hkv=2):
    q, k, v = random_qkv(1, hq, hkv, sq, sk, d, dtype=dtype, layout=layout)
    if d_v is not None:
        v = torch.randn(1, hkv, sk, d_v, dtype=dtype)
    return q, k, v


def misaligned_q():
    """A q whose strides TMA can describe (272-byte rows) but whose first element is 2 bytes off 16."""
    q = torch.randn(1, 2, 2048, 136, dtype=torch.float16)[..., 1:129]
    return q, *cpu_call(d=128)[1:]


REFUSALS = {
    # name: (inputs, extra arguments, expected reason)
    "fp32": (lambda: cpu_call(dtype=torch.float32), {}, "dtype torch.float32 (Hopper kernel: fp16 or bf16)"),
    "head_dim_96": (lambda: cpu_call(d=96), {}, "head_dim 96 (Hopper kernel: 64 or 128)"),
    "head_dim_v": (lambda: cpu_call(d=128, d_v=64), {}, "head_dim_v 64 != head_dim 128"),
    "mask": (cpu_call, dict(mask=torch.ones(1, 1, 2048, 2048, dtype=torch.bool)), "mask"),
    "softcap": (cpu_call, dict(softcap=30.0), "softcap"),
    "alibi": (cpu_call, dict(alibi_slopes=torch.ones(2)), "ALiBi"),
    "sinks": (cpu_call, dict(sinks=torch.zeros(2)), "sinks"),
    "window": (cpu_call, dict(window=(256, 0)), "sliding window"),
    "window_right": (cpu_call, dict(window=(-1, 16)), "sliding window"),
    "short_q": (lambda: cpu_call(sq=512), {}, "Sq 512 < 2048"),
    "short_k": (lambda: cpu_call(sk=1000), {}, "Sk 1000 < 2048"),
    "d_major": (lambda: cpu_call(layout="dmajor"), {}, "strides not TMA-describable (q"),
    "misaligned": (misaligned_q, {}, "q not 16-byte aligned"),
    "out_strides": (cpu_call, dict(out=torch.empty(1, 2, 64, 2048, dtype=torch.float16).transpose(2, 3)),
                    "strides not TMA-describable (out"),
    "out_dtype": (cpu_call, dict(out=torch.empty(1, 2, 2048, 64, dtype=torch.bfloat16)), "out dtype"),
    # calls the kernel takes, refused here for the platform alone
    "cpu_plain": (cpu_call, {}, "not a CUDA tensor"),
    "cpu_causal_bshd_gqa": (lambda: cpu_call(d=128, layout="bshd", hq=8, hkv=2), dict(window=CAUSAL),
                            "not a CUDA tensor"),
    "cpu_strided": (lambda: cpu_call(layout="strided", sq=2111, sk=3000), {}, "not a CUDA tensor"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusal_reasons(case):
    make, extra, expected = REFUSALS[case]
    q, k, v = make()
    arguments = dict(window=PLAIN) | extra
    assert hopper_unsupported_reason(q, k, v, **arguments).startswith(expected)


def test_environment_switch_refuses_first(monkeypatch):
    monkeypatch.setenv("TILEATTN_HOPPER", "0")
    assert hopper_unsupported_reason(*cpu_call(d=96), window=PLAIN) == "TILEATTN_HOPPER=0"


def test_module_imports_and_describes_its_configs():
    assert set(hopper.CONFIGS) == {64, 128}
    for config in hopper.CONFIGS.values():
        assert config.consumers in (2, 3) and config.stages >= 2
        # setmaxnreg's budget: maxnreg x all threads (the producer warp is allocated as a warpgroup) fits the SM's 64K
        assert config.maxnreg * 128 * (config.consumers + 1) <= 65536
    assert hopper.GLUON_MISSING is None or isinstance(hopper.GLUON_MISSING, str)


def test_imports_without_gluon():
    """A Triton without Gluon (< 3.6, or one whose Gluon names moved): tileattn imports, the module refuses."""
    script = (
        "import sys; sys.modules['triton.experimental.gluon'] = None\n"  # an import of it now fails
        "import torch\n"
        "from tileattn.kernels import hopper, prefill\n"
        "assert hopper.GLUON_MISSING\n"
        "x = torch.empty(1, 1, 2048, 64, dtype=torch.float16)\n"
        "assert isinstance(prefill.prefill_plan(x, x, x, window=(-1, -1), scale=0.1), prefill.PrefillPlan)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=120)


def test_length_one_dims_get_a_legal_descriptor_stride():
    t = torch.empty(2048, 64, dtype=torch.float16).as_strided((1, 1, 2048, 64), (3, 5, 64, 1))  # odd size-1 strides
    assert hopper._tma_strides_ok(t)
    strides = hopper._descriptor_strides(t)
    assert strides[2:] == [64, 1] and all(s * 2 % 16 == 0 and s >= 2048 * 64 for s in strides[:2])


def test_cpu_calls_get_the_portable_plan():
    q, k, v = cpu_call()
    assert isinstance(prefill_plan(q, k, v, window=PLAIN, scale=0.125), PrefillPlan)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors reach the Triton backend through the interpreter only")
def test_explain_names_the_prefill_kernel_and_why():
    q, k, v = cpu_call()
    assert "portable prefill kernel (Hopper kernel: not a CUDA tensor)" in str(tileattn.explain(q, k, v, backend="triton"))
    masked = tileattn.explain(q, k, v, mask=torch.ones(2048, 2048, dtype=torch.bool), backend="triton")
    assert "(Hopper kernel: mask)" in str(masked)
    decode = tileattn.explain(q[:, :, :1], k, v, backend="triton")  # the split-KV decode kernel: no prefill kernel
    assert decode.backend == "triton" and "prefill kernel" not in decode.reason


# ---- on an H100 / H200 with Triton 3.6 -----------------------------------------------------------------------

def _hopper_reason():
    if not HAS_CUDA:
        return "needs a CUDA device"
    probe = torch.empty(1, 1, 2048, 64, device="cuda", dtype=torch.float16)
    return hopper_unsupported_reason(probe, probe, probe, window=PLAIN)


HOPPER_REASON = _hopper_reason()


def needs_hopper(test):
    skip = pytest.mark.skipif(HOPPER_REASON is not None, reason=f"Hopper kernel: {HOPPER_REASON}")
    return pytest.mark.gpu(skip(test))


DTYPES = [torch.float16, torch.bfloat16]
HEAD_DIMS = [64, 128]
# (batch, q heads, kv heads, Sq, Sk): block edges (2111 = 11 x 192 - 1 = 16 x 128 + 63), Sq != Sk both ways
# (Sq > Sk causal: the first Sq - Sk rows see no key), GQA 4, batch 2.
SHAPES = [
    (1, 2, 2, 2048, 2048),
    (1, 2, 2, 2111, 2111),
    (1, 2, 2, 4096, 4096),
    (1, 2, 2, 2048, 3000),
    (1, 2, 2, 3000, 2048),
    (1, 8, 2, 2111, 2111),
    (2, 2, 2, 2048, 2048),
    (2, 8, 2, 3000, 2111),
]


def hopper_attention(q, k, v, *, causal, out=None, return_lse=True):
    """The call through ``prefill_plan``, asserting that it is the Hopper kernel's."""
    plan = prefill_plan(q, k, v, window=CAUSAL if causal else PLAIN, scale=q.shape[-1] ** -0.5, return_lse=return_lse,
                        out=out)
    assert isinstance(plan, HopperPlan), hopper_unsupported_reason(q, k, v, window=CAUSAL if causal else PLAIN, out=out)
    return plan.run(q, k, v, out=out)


def poisoned_like(q):
    return torch.full_like(q, float("nan"))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@needs_hopper
def test_matches_oracle(dtype, d, causal, shape):
    b, hq, hkv, sq, sk = shape
    q, k, v = random_qkv(b, hq, hkv, sq, sk, d, dtype=dtype, device="cuda")
    out = poisoned_like(q)
    result, lse = hopper_attention(q, k, v, causal=causal, out=out)
    assert result is out
    assert_matches_oracle(out, q, k, v, lse=lse, causal=causal)


LAYOUTS = {
    # name: (layout of q, k, v; output: None = fresh, "bshd" = a NaN-filled [B, S, H, D] buffer's view; return_lse)
    "bshd": ("bshd", None, True),  # what Transformers passes; the fresh output keeps q's layout
    "bshd_into_bshd_out": ("bshd", "bshd", False),
    "strided": ("strided", None, True),  # every other head, the first D of D + 8 columns
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@needs_hopper
def test_views(dtype, d, causal, layout):
    qkv_layout, out_layout, return_lse = LAYOUTS[layout]
    q, k, v = random_qkv(2, 8, 2, 2111, 3000, d, dtype=dtype, device="cuda", layout=qkv_layout)
    out = None
    if out_layout == "bshd":
        out = torch.full((2, 2111, 8, d), float("nan"), device="cuda", dtype=dtype).transpose(1, 2)
    result, lse = hopper_attention(q, k, v, causal=causal, out=out, return_lse=return_lse)
    assert (lse is None) == (not return_lse)
    if out is not None:
        assert result is out
    elif qkv_layout == "bshd":
        assert result.stride() == q.stride()
    assert_matches_oracle(result, q, k, v, lse=lse, causal=causal)


@needs_hopper
def test_misaligned_view_of_a_cached_signature_falls_back():
    """The plan cache keys on strides, not pointers: a view 2 bytes off a 16-byte boundary with the same strides as an
    aligned one finds the Hopper plan, which hands it to the portable kernel (TMA needs aligned bases)."""
    buf = torch.randn(1, 2, 2048, 136, device="cuda", dtype=torch.bfloat16)
    k, v = random_qkv(1, 2, 2, 2048, 2048, 128, dtype=torch.bfloat16, device="cuda")[1:]
    for q in (buf[..., :128], buf[..., 1:129]):
        out, lse = hopper_attention(q, k, v, causal=True)
        assert_matches_oracle(out, q, k, v, lse=lse, causal=True)


@needs_hopper
def test_nan_query_rows():
    """The NaN rule: a NaN in a query row that sees keys makes that row NaN (out and lse); a row that sees no key stays
    0 with lse -inf whatever its query holds; the other rows are untouched."""
    q, k, v = random_qkv(1, 2, 2, 3000, 2048, 128, dtype=torch.bfloat16, device="cuda")
    keyless, seeing = 5, 2500  # causal with Sq - Sk = 952: rows below 952 see no key
    q[0, 0, keyless] = float("nan")
    q[0, 1, seeing, 7] = float("nan")
    out, lse = hopper_attention(q, k, v, causal=True, out=poisoned_like(q))
    assert torch.isnan(out[0, 1, seeing]).all() and torch.isnan(lse[0, 1, seeing])
    assert (out[0, 0, keyless] == 0).all() and lse[0, 0, keyless] == float("-inf")
    clean = q.clone()
    clean[0, :, [keyless, seeing]] = 0
    ref, ref_lse = oracle(clean, k, v, causal=True)
    rows = torch.ones(3000, dtype=torch.bool)
    rows[seeing] = False
    torch.testing.assert_close(out[0, 1, rows].double(), ref[0, 1, rows], atol=3e-2, rtol=0)
    torch.testing.assert_close(lse[0, 1, rows].double(), ref_lse[0, 1, rows], atol=1e-4, rtol=0)


@pytest.fixture
def fresh_caches():
    """Plans and decisions built inside the test only (and forgotten after it, so none leaks into other tests)."""
    dispatch.reset()
    prefill._plans.clear()
    yield
    dispatch.reset()
    prefill._plans.clear()


@needs_hopper
def test_attention_goes_through_the_hopper_plan(monkeypatch, fresh_caches):
    runs = []
    original = HopperPlan.run

    def counted(self, *args, **kwargs):
        runs.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(HopperPlan, "run", counted)
    q, k, v = random_qkv(1, 8, 2, 2048, 2048, 128, dtype=torch.bfloat16, device="cuda", layout="bshd")
    for _ in range(2):  # the second call comes from the cached signature
        out = tileattn.attention(q, k, v, causal=True, backend="triton")
        assert_matches_oracle(out, q, k, v, causal=True)
    assert len(runs) == 2 and runs[0] is runs[1]

    monkeypatch.setenv("TILEATTN_HOPPER", "0")
    dispatch.reset()
    prefill._plans.clear()
    out = tileattn.attention(q, k, v, causal=True, backend="triton")
    assert len(runs) == 2
    assert isinstance(prefill_plan(q, k, v, window=CAUSAL, scale=128**-0.5), PrefillPlan)
    assert_matches_oracle(out, q, k, v, causal=True)


@needs_hopper
def test_explain_names_the_hopper_kernel():
    q, k, v = random_qkv(1, 8, 2, 2048, 2048, 128, dtype=torch.bfloat16, device="cuda", layout="bshd")
    assert str(tileattn.explain(q, k, v, causal=True, backend="triton")).endswith("runs the Hopper prefill kernel")
    assert "sliding window" in str(tileattn.explain(q, k, v, window=(256, 0), backend="triton"))


@needs_hopper
def test_explicit_config_keeps_the_portable_kernel(fresh_caches):
    q, k, v = random_qkv(1, 2, 2, 2048, 2048, 64, dtype=torch.float16, device="cuda")
    assert isinstance(prefill_plan(q, k, v, window=PLAIN, scale=0.125, config=(128, 64, 8, 3)), PrefillPlan)
    assert isinstance(prefill_plan(q, k, v, window=PLAIN, scale=0.125), HopperPlan)


@needs_hopper
@pytest.mark.large_memory
def test_packed_kv_past_2_31():
    """K and V of 270,000 tokens of 32 heads packed per token ([1, S, 2, H, D], a fused KV projection's layout): the
    token stride is 8192 elements, so keys from 262,144 on lie past 2^31 elements (TMA coordinates per dim, 64-bit
    addresses). 4.4 GB; checked on sampled query rows, the reference chunked over the keys and merged by LSE."""
    from test_large_offsets import assert_close, chunked_reference

    heads, d = 32, 128
    kv = torch.randn(1, 270_000, 2, heads, d, device="cuda", dtype=torch.bfloat16)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert k.stride(2) * (k.shape[2] - 1) >= 2**31
    q = torch.randn(1, heads, 2048, d, device="cuda", dtype=torch.bfloat16)
    out, lse = hopper_attention(q, k, v, causal=False, out=poisoned_like(q))
    assert torch.isfinite(out).all()  # every row written
    rows = torch.cat([torch.tensor([0, 2047]), torch.randperm(2046)[:30] + 1]).to("cuda")
    ref_out, ref_lse = chunked_reference(q[:, :, rows], k, v)
    assert_close(out[:, :, rows], lse[:, :, rows], ref_out, ref_lse)

