"""The ``tileattn`` command: arguments, messages instead of traces, plots, tune's file, Ctrl-C keeping results."""

import io
import json

import pytest
import torch

from tileattn import calibration, cli, dispatch
from tileattn.bench import e2e, plots
from tileattn.bench.report import Progress

from conftest import HAS_CUDA


def test_unknown_suite_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "nonsense"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(HAS_CUDA, reason="checks the message shown without a GPU")
def test_gpu_suite_without_gpu_says_so(capsys):
    assert cli.main(["bench", "kernels"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().out


def test_too_large_model_is_a_message_not_a_trace(monkeypatch, capsys, tmp_path):
    def too_large(*args, **kwargs):
        raise e2e.TooLargeError("this model needs about 40 GiB")

    monkeypatch.setattr(e2e, "run", too_large)
    assert cli.main(["bench", "e2e", "--out", str(tmp_path)]) == 2
    assert "needs about 40 GiB" in capsys.readouterr().out


def test_check_fits_names_the_sizes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (8 * 2**30, 16 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Small GPU")
    with pytest.raises(e2e.TooLargeError, match=r"needs about \d+ GiB.*Small GPU has 8 of 16 GiB free.*llama-tiny"):
        e2e.check_fits(e2e.MODELS["llama-7b"], torch.device("cuda"))
    e2e.check_fits(e2e.MODELS["llama-tiny"], torch.device("cuda"))  # fits: no error


def test_model_size_arithmetic():
    # LLaMA-7B: 6.74e9 parameters (with untied embeddings), 0.5 MiB of bf16 K+V per token
    assert abs(e2e.parameter_bytes(e2e.LLAMA_7B, torch.bfloat16) / 2 - 6.74e9) < 0.01e9
    assert e2e.kv_cache_bytes(e2e.LLAMA_7B, torch.bfloat16, 1) == 2 * 32 * 4096 * 2


def test_ctrl_c_keeps_what_was_measured(monkeypatch, tmp_path):
    calls = []

    def fake_measure(model_name, impl, phase):
        if calls:
            raise KeyboardInterrupt
        calls.append(impl)
        return dict(ms=1.0, peak_extra_gib=0.5)

    monkeypatch.setattr(e2e, "measure_fresh", fake_measure)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    json_path, md_path = e2e.run(tmp_path, progress=Progress(9, "e2e", stream=io.StringIO()))
    rows = json.loads(json_path.read_text())["rows"]
    assert [(r["impl"], r["ms"]) for r in rows] == [("eager", 1.0)]
    assert "CPU small configuration" in md_path.read_text()


def test_progress_without_a_terminal_prints_lines():
    stream = io.StringIO()
    bar = Progress(2, "demo", stream=stream)
    bar.step("first")
    bar.note("a note")
    bar.step("second")
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("demo 1/2") and lines[0].endswith("first")
    assert lines[1] == "a note" and lines[2].startswith("demo 2/2")


def results_json(tmp_path, suite, rows):
    path = tmp_path / f"{suite}-test.json"
    path.write_text(json.dumps({"suite": suite, "environment": {"device": "test"}, "rows": rows}))
    return path


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    kernels = [dict(impl=i, head_dim=64, causal=c, seqlen=s, tflops=t * s, peak_extra_mib=s / 8)
               for i, t in (("tileattn", 1.0), ("naive", 0.5)) for c in (False, True) for s in (512, 1024)]
    pngs = plots.plot(results_json(tmp_path, "kernels", kernels))
    assert [p.name for p in pngs] == ["kernels-test-throughput.png", "kernels-test-memory.png"]
    e2e_rows = [dict(kind="prefill", impl=i, batch=1, seqlen=512, ms=m, peak_extra_gib=0.1)
                for i, m in (("eager", 2.0), ("tileattn", 1.0))]
    assert cli.main(["plot", str(results_json(tmp_path, "e2e", e2e_rows))]) == 0
    for png in (*pngs, tmp_path / "e2e-test.png"):
        assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(HAS_CUDA, reason="the CPU sweep (the GPU one is a benchmark)")
def test_tune_writes_a_table_auto_then_uses(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TILEATTN_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    try:
        assert cli.main(["tune", "--quick"]) == 0
        path = calibration.user_path("cpu")
        data = json.loads(path.read_text())
        table = calibration.parse(data, str(path))
        assert {(e["dtype"], e["causal"]) for e in data["entries"]} == {("float32", False), ("float32", True)}
        assert all(set(p["ms"]) == {"sdpa_flash", "torch"} for e in data["entries"] for p in e["points"])
        assert table.lookup(torch.float32, True, 64, 100) is not None
        q = torch.randn(1, 2, 64, 64)
        assert str(path) in str(__import__("tileattn").explain(q, q, q))
        assert "calibration written" in capsys.readouterr().out
    finally:
        dispatch.reset()


def test_info_reports_backends_and_calibration(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "backends:" in out and "calibration:" in out


def test_e2e_without_transformers_is_a_message(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_transformers(name, *args, **kwargs):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("No module named 'transformers'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_transformers)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "e2e", "--out", str(tmp_path)]) == 2
    assert "needs Transformers" in capsys.readouterr().out
