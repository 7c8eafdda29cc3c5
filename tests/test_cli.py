"""The ``tileattn`` command: arguments, messages instead of traces, plots, tune's file, Ctrl-C keeping results."""

import io
import json
import signal

import pytest
import torch

from tileattn import calibration, cli, dispatch, tune
from tileattn.bench import e2e, plots
from tileattn.bench.report import Progress, Timing, in_fresh_process

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


def interrupt_after_first_phase(monkeypatch):
    """e2e's phases: the first one gives a row, the second one is interrupted by Ctrl-C."""
    phases = []

    def fake_phase(model, model_name, phase, device, implementations, progress):
        if phases:
            raise KeyboardInterrupt
        phases.append(phase)
        return [dict(kind=phase[0], impl="eager", batch=1, seqlen=phase[1], peak_extra_gib=0.5,
                     **Timing((1.0, 1.1, 0.9)).fields("ms"))]

    monkeypatch.setattr(e2e, "measure_phase", fake_phase)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_ctrl_c_keeps_what_was_measured(monkeypatch, tmp_path):
    interrupt_after_first_phase(monkeypatch)
    json_path, md_path = e2e.run(tmp_path, progress=Progress(9, "e2e", stream=io.StringIO()))
    record = json.loads(json_path.read_text())
    assert [(r["impl"], r["ms"]) for r in record["rows"]] == [("eager", 1.0)]
    assert record["interrupted"]
    assert "CPU small configuration" in md_path.read_text() and "Interrupted (Ctrl-C)" in md_path.read_text()


def test_ctrl_c_in_the_cli_is_a_note_of_what_was_saved(monkeypatch, capsys, tmp_path):
    interrupt_after_first_phase(monkeypatch)
    assert cli.main(["bench", "--out", str(tmp_path)]) == cli.INTERRUPTED
    out = capsys.readouterr().out
    assert "Interrupted: 1 result rows of tileattn bench e2e measured before Ctrl-C are saved" in out
    assert "Traceback" not in out


def test_fresh_process_ignores_ctrl_c_and_the_parent_keeps_it():
    """The child must not print its own KeyboardInterrupt traceback; the parent still gets Ctrl-C."""
    handler = signal.getsignal(signal.SIGINT)
    assert in_fresh_process(signal.getsignal, signal.SIGINT) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) is handler


@pytest.mark.skipif(HAS_CUDA, reason="the CPU's refusal")
def test_model_too_slow_for_the_cpu_is_refused_with_an_estimate(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(e2e, "cpu_matmul_flops", lambda dtype: 100e9)
    assert cli.main(["bench", "--model", "llama-7b", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    hours = 3 * e2e.suite_flops(e2e.MODELS["llama-7b"]) / 100e9 / 3600  # eager, sdpa, tileattn at 100 GFLOP/s
    assert f"on this CPU the suite would take at least {hours:.0f} hours" in out and "Run it on a CUDA GPU" in out
    assert "running the small CPU configuration" not in out  # never says one thing and does another
    assert not list(tmp_path.iterdir())


def test_vit_without_timm_gives_advice_that_keeps_this_torch(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    assert cli.main(["bench", "vit", "--out", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    minor = int(torch.__version__.split(".")[1])
    assert f"torchvision==0.{minor + 15}.*" in out  # the release made for this torch: pip keeps torch as it is
    if torch.version.cuda is None:
        assert "download.pytorch.org/whl/cpu" in out and "GPU machine" in out


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


def test_tune_elsewhere_says_how_auto_would_use_it(monkeypatch, capsys, tmp_path):
    elsewhere = tmp_path / "mine.json"
    data = {"device": "test", "measured_with": {}, "entries": []}
    monkeypatch.setattr(tune, "run", lambda device, sweep, out_path: (str(out_path), data))
    assert cli.main(["tune", "--out", str(elsewhere)]) == 0
    out = capsys.readouterr().out
    read_by_auto = calibration.user_path(calibration.device_name(torch.device("cuda" if HAS_CUDA else "cpu")))
    assert f"backend='auto' reads only {read_by_auto}: to use this one, copy it there" in out
    assert "uses it from now on" not in out


def test_info_reports_backends_and_calibration(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch:" in out and "backends:" in out and "calibration:" in out
    assert str(calibration.user_dir()) in out  # where auto looks (or what it read)


def test_plot_errors_are_one_line_naming_the_file(tmp_path, capsys):
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "other.json").write_text('{"some": "json"}')
    files = [tmp_path / "missing.json", tmp_path / "text.json", tmp_path / "other.json"]
    assert cli.main(["plot", *map(str, files)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"tileattn plot: {files[0]}: no such file",
                     f"tileattn plot: {files[1]}: not JSON (Expecting value: line 1 column 1 (char 0))",
                     f"tileattn plot: {files[2]}: not a tileattn bench result (expected \"suite\" and \"rows\")"]


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
