"""Automatic dispatch: SDPA for plain calls, calibration files (good, bad, corrupt, missing), explain, logging."""

import json
import logging
import warnings

import pytest
import torch

import tileattn
from tileattn import calibration, dispatch
from tileattn.testing import assert_matches_oracle, random_qkv

from conftest import DEVICE, HAS_CUDA, KERNEL_DTYPES

SDPA_DTYPES = KERNEL_DTYPES if HAS_CUDA else [torch.float16, torch.float32]


@pytest.fixture(autouse=True)
def _fresh_dispatch(tmp_path, monkeypatch):
    """Each test gets its own empty cache dir and no shipped tables unless it writes some."""
    monkeypatch.setenv("TILEATTN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "SHIPPED_DIR", tmp_path / "shipped")
    dispatch.reset()
    yield
    dispatch.reset()


def table(ranking_short, ranking_long, up_to=100, device=None, dtype="float32", causal=False, head_dim=64):
    return {"format": 1, "device": device or calibration.device_name(torch.device(DEVICE)), "measured_with": {},
            "entries": [{"dtype": dtype, "causal": causal, "head_dim": head_dim,
                         "segments": [{"up_to": up_to, "ranking": ranking_short},
                                      {"up_to": None, "ranking": ranking_long}]}]}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def user_file():
    return calibration.user_path(calibration.device_name(torch.device(DEVICE)))


def shipped_file():
    return calibration.shipped_path(calibration.device_name(torch.device(DEVICE)))


# -- the SDPA backend: exact where it is allowed, refused where its semantics differ ---------------------------

@pytest.mark.parametrize("dtype", SDPA_DTYPES, ids=str)
@pytest.mark.parametrize("shape,causal", [((2, 4, 4, 77, 77, 64), True), ((1, 2, 2, 33, 130, 128), False),
                                          ((1, 3, 3, 1, 200, 32), False), ((2, 2, 2, 256, 256, 80), True)])
@pytest.mark.parametrize("layout", ["contiguous", "bshd"])
def test_sdpa_backend_matches_oracle(dtype, shape, causal, layout):
    q, k, v = random_qkv(*shape, dtype=dtype, device=DEVICE, layout=layout)
    decision = tileattn.explain(q, k, v, causal=causal, backend="sdpa")
    assert decision.backend in ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient")
    out = tileattn.attention(q, k, v, causal=causal, backend="sdpa")
    assert_matches_oracle(out, q, k, v, causal=causal)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "gqa"])
def test_each_sdpa_kernel_matches_oracle(kernel, dtype, kv_heads):
    q, k, v = random_qkv(2, 4, kv_heads, 300, 300, 128, dtype=dtype, device="cuda")
    if kv_heads == 1 and kernel == "sdpa_efficient":  # its ATen op needs equal head counts: refused, not repeated
        with pytest.raises(ValueError, match="GQA"):
            tileattn.attention(q, k, v, causal=True, backend=kernel)
        return
    out = tileattn.attention(q, k, v, causal=True, backend=kernel)
    assert_matches_oracle(out, q, k, v, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sdpa_cudnn", "sdpa_flash", "sdpa_efficient"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_each_sdpa_kernel_gives_the_oracles_gradients(kernel, kv_heads):
    """Training calls auto sends to SDPA: each kernel's backward (cuDNN's and the memory-efficient one's need the
    logsumexp saved by the forward) against the float64 oracle's autograd, bf16."""
    if kv_heads == 2 and kernel == "sdpa_efficient":
        pytest.skip("the memory-efficient kernel refuses GQA (see test_each_sdpa_kernel_matches_oracle)")
    q, k, v = random_qkv(2, 4, kv_heads, 128, 128, 64, dtype=torch.bfloat16, device="cuda")
    grad_out = torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    found = []
    for inputs, options in (((q, k, v), dict(backend=kernel)), ((q.double(), k.double(), v.double()),
                                                                 dict(backend="naive"))):
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = tileattn.attention(*inputs, causal=True, **options)
        found.append(torch.autograd.grad((out * grad_out.to(out.dtype)).sum(), inputs))
    for name, ours, exact in zip(("dq", "dk", "dv"), *found):
        err = (ours.double() - exact).abs().max().item()
        assert err <= 0.05 * max(1.0, exact.abs().max().item()), f"{kernel} {name}: max error {err:.3g}"


def test_gqa_plain_call_runs_on_sdpa_where_calibrated_fastest():
    """K/V heads are not repeated: the SDPA kernels auto may pick for GQA take un-repeated K/V (see tileattn.sdpa)."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.float16
    q, k, v = random_qkv(2, 8, 2, 96, 96, 64, dtype=dtype, device=DEVICE)
    ranking = ["sdpa_efficient", "sdpa_cudnn", "sdpa_flash", "torch"]
    write(user_file(), table(ranking, ranking, dtype=str(dtype).removeprefix("torch."), causal=True))
    dispatch.reset()
    decision = tileattn.explain(q, k, v, causal=True)
    assert decision.backend == ("sdpa_flash" if DEVICE == "cpu" else "sdpa_cudnn"), decision
    assert "sdpa_efficient (GQA" in decision.reason
    assert_matches_oracle(tileattn.attention(q, k, v, causal=True), q, k, v, causal=True)


@pytest.mark.parametrize("options,reason", [
    (dict(mask=True), "mask"), (dict(window=(4, None)), "window"), (dict(softcap=2.0), "softcap"),
    (dict(return_lse=True), "return_lse"), (dict(causal=True, sq=70), "Sq != Sk"),
    (dict(head_dim=20), "multiple of 8"),
])
def test_sdpa_refuses_what_it_cannot_do_exactly(options, reason):
    options = dict(options)
    sq, d = options.pop("sq", 80), options.pop("head_dim", 64)
    q, k, v = random_qkv(1, 2, 2, sq, 80, d, dtype=torch.float32, device=DEVICE)  # not decode-shaped
    if options.pop("mask", False):
        options["mask"] = torch.ones(80, 80, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match=reason):
        tileattn.attention(q, k, v, backend="sdpa", **options)
    # auto never picks SDPA for such a call, whatever the table says
    write(user_file(), table(["sdpa_flash", "sdpa_cudnn", "torch"], ["sdpa_flash", "sdpa_cudnn", "torch"],
                             device=calibration.device_name(q.device), causal=options.get("causal", False)))
    dispatch.reset()  # tables are read once per process
    decision = tileattn.explain(q, k, v, **options)
    assert not decision.backend.startswith("sdpa")
    assert reason.split()[0] in decision.reason


# -- auto: the calibrated ranking, the built-in rule ---------------------------------------------------------

def test_built_in_rule_without_calibration():
    q, k, v = random_qkv(1, 2, 2, 96, 96, 64, dtype=torch.float32, device=DEVICE)
    decision = tileattn.explain(q, k, v)
    assert "no calibration" in decision.reason
    assert decision.backend == ("triton" if HAS_CUDA else "sdpa_flash")
    masked = tileattn.explain(q, k, v, mask=torch.ones(96, 96, dtype=torch.bool, device=DEVICE))
    assert masked.backend == ("triton" if HAS_CUDA else "torch")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU ranking; the GPU one is checked with the shipped H100 table")
def test_calibrated_ranking_switches_by_length():
    write(user_file(), table(["torch", "sdpa_flash"], ["sdpa_flash", "torch"], up_to=100))
    short = random_qkv(1, 2, 2, 80, 80, 64, dtype=torch.float32, device="cpu")
    long = random_qkv(1, 2, 2, 120, 120, 64, dtype=torch.float32, device="cpu")
    assert tileattn.explain(*short).backend == "torch"
    decision = tileattn.explain(*long)
    assert decision.backend == "sdpa_flash"
    assert "calibrated on cpu" in decision.reason and "any length" in decision.reason
    # head_dim 32 has no entry: the nearest calibrated head_dim above it (64) is used
    assert tileattn.explain(*random_qkv(1, 2, 2, 80, 80, 32, dtype=torch.float32, device="cpu")).backend == "torch"
    # fp16 has no entry: built-in rule
    assert "no entry" in tileattn.explain(*random_qkv(1, 2, 2, 80, 80, 64, dtype=torch.float16, device="cpu")).reason
    # results follow the decision and stay exact
    for q, k, v in (short, long):
        assert_matches_oracle(tileattn.attention(q, k, v), q, k, v)


@pytest.mark.gpu
def test_shipped_h100_table_is_used_on_h100(monkeypatch):
    monkeypatch.setattr(calibration, "SHIPPED_DIR", calibration.Path(tileattn.__file__).parent / "calibrations")
    dispatch.reset()
    name = torch.cuda.get_device_name()
    if not calibration.shipped_path(name).exists():
        pytest.skip(f"no shipped table for {name}")
    q, k, v = random_qkv(2, 8, 8, 1024, 1024, 128, dtype=torch.bfloat16, device="cuda")
    with pytest.warns(calibration.CalibrationWarning, match="no calibration file"):
        decision = tileattn.explain(q, k, v, causal=True)
    assert "shipped defaults" in decision.reason
    assert_matches_oracle(tileattn.attention(q, k, v, causal=True), q, k, v, causal=True)


def test_decisions_are_cached(monkeypatch):
    q, k, v = random_qkv(1, 2, 2, 96, 96, 64, dtype=torch.float32, device=DEVICE)
    first = tileattn.explain(q, k, v)

    def fail(*args):
        raise AssertionError("a cached shape was decided again")

    monkeypatch.setattr(dispatch, "_decide", fail)
    assert tileattn.explain(q, k, v) is first
    other = random_qkv(1, 2, 2, 97, 96, 64, dtype=torch.float32, device=DEVICE)
    with pytest.raises(AssertionError, match="decided again"):
        tileattn.explain(*other)


def test_log_decisions(monkeypatch, caplog):
    monkeypatch.setenv("TILEATTN_LOG", "1")
    q, k, v = random_qkv(1, 2, 2, 80, 80, 64, dtype=torch.float32, device=DEVICE)
    with caplog.at_level(logging.INFO, logger="tileattn"):
        tileattn.attention(q, k, v, causal=True)
        tileattn.attention(q, k, v, causal=True)  # cached: logged once
    lines = [r.getMessage() for r in caplog.records if r.name == "tileattn"]
    assert len(lines) == 1 and "causal=True" in lines[0] and "backend" in lines[0]


def test_explain_validates_like_attention():
    q, k, v = random_qkv(1, 4, 3, 8, 8, 16, dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        tileattn.explain(q, k, v)
    with pytest.raises(ValueError, match="backend must be one of"):
        tileattn.explain(q, q, q, backend="flash")
    assert "backend" in str(tileattn.explain(q, q, q, backend="torch"))


def test_varlen_and_kvcache_refuse_sdpa():
    q = torch.randn(4, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="attention only"):
        tileattn.attention_varlen(q, q, q, cu, cu, 4, 4, backend="sdpa")


# -- calibration files ------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,message", [
    ("{not json", "Expecting"),
    (json.dumps({"format": 2, "device": "x", "entries": []}), "format"),
    (json.dumps({"format": 1, "device": "x"}), "entries"),
    (json.dumps({"format": 1, "device": "x", "entries": [{"dtype": "int8", "causal": False, "head_dim": 64,
                                                          "segments": []}]}), "dtype"),
    (json.dumps(table(["triton"], ["bogus"])), "ranking"),
    (json.dumps(table(["triton"], ["torch"], up_to=0)), "increasing"),
    (json.dumps({"format": 1, "device": "x", "entries": [{"dtype": "float32", "causal": False, "head_dim": 64,
                                                          "segments": [{"up_to": 8, "ranking": ["torch"]}]}]}),
     "up_to\": null"),
])
def test_corrupt_file_falls_back_with_a_warning(content, message):
    write(user_file(), content)
    write(shipped_file(), table(["torch"], ["torch"]))  # shipped defaults say: always the tiled path
    q, k, v = random_qkv(1, 2, 2, 80, 80, 64, dtype=torch.float32, device=DEVICE)
    with pytest.warns(calibration.CalibrationWarning, match=message):
        decision = tileattn.explain(q, k, v)
    assert decision.backend == "torch" and "shipped defaults" in decision.reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process, not per call
        tileattn.explain(*random_qkv(1, 2, 2, 81, 81, 64, dtype=torch.float32, device=DEVICE))


def test_corrupt_file_without_shipped_defaults_uses_built_in_rule():
    write(user_file(), "[]")
    q, k, v = random_qkv(1, 2, 2, 80, 80, 64, dtype=torch.float32, device=DEVICE)
    with pytest.warns(calibration.CalibrationWarning, match="built-in rule"):
        assert "no calibration" in tileattn.explain(q, k, v).reason


def test_missing_file_uses_shipped_defaults_with_a_warning():
    write(shipped_file(), table(["torch"], ["torch"]))
    q, k, v = random_qkv(1, 2, 2, 80, 80, 64, dtype=torch.float32, device=DEVICE)
    with pytest.warns(calibration.CalibrationWarning, match="no calibration file"):
        assert tileattn.explain(q, k, v).backend == "torch"


def test_user_file_wins_over_shipped():
    write(shipped_file(), table(["torch"], ["torch"]))
    write(user_file(), table(["sdpa_flash", "torch"], ["sdpa_flash", "torch"]))
    q, k, v = random_qkv(1, 2, 2, 80, 80, 64, dtype=torch.float32, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decision = tileattn.explain(q, k, v)
    assert str(user_file()) in decision.reason


def test_segments_from_points():
    points = [{"seqlen": 128, "ms": {"a": 1, "b": 2}}, {"seqlen": 512, "ms": {"a": 1, "b": 3}},
              {"seqlen": 2048, "ms": {"a": 5, "b": 3}}, {"seqlen": 8192, "ms": {"a": 9, "b": 4}}]
    assert calibration.segments_from_points(points) == [
        {"up_to": 1024, "ranking": ["a", "b"]}, {"up_to": None, "ranking": ["b", "a"]}]
    assert calibration.segments_from_points(points[:1]) == [{"up_to": None, "ranking": ["a", "b"]}]


def test_decode_shaped_calls():
    """Few query rows per K/V head (Sq x Hq / Hkv <= DECODE_MAX_ROWS) go to the split-KV kernel."""
    def shaped(hq, hkv, sq):
        q, k, _ = random_qkv(1, hq, hkv, sq, 8, 16, dtype=torch.float32, device="cpu")
        return dispatch.decode_shaped(q, k)

    limit = dispatch.DECODE_MAX_ROWS
    assert shaped(32, 32, 1) and shaped(32, 8, 1) and shaped(8, 1, limit // 8)
    assert not shaped(8, 1, limit // 8 + 1) and not shaped(4, 4, limit + 1)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_auto_sends_decode_shaped_calls_to_triton():
    write(user_file(), table(["sdpa_cudnn", "triton"], ["sdpa_cudnn", "triton"], dtype="float16"))
    q, k, v = random_qkv(2, 8, 8, 1, 512, 64, dtype=torch.float16, device="cuda")
    decision = tileattn.explain(q, k, v)
    assert decision.backend == "triton" and "decode-shaped" in decision.reason
    assert_matches_oracle(tileattn.attention(q, k, v), q, k, v)
