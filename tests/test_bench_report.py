"""The benchmarks' reporting: interleaved timings with their spread, noisy and implausible results flagged in
the table, the markdown and the plot; the e2e suite's Transformers calls free of deprecation warnings."""

import json
import warnings

import pytest
import torch

from tileattn.bench import e2e, plots, report
from tileattn.bench.report import Timing, interleaved_timings


def test_interleaved_timings_warm_up_then_rotate_the_order():
    calls = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    timings = interleaved_timings(candidates, 3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(t.samples) == 3 for t in timings.values())


def test_timing_statistics():
    steady, noisy = Timing((10.0, 11.0, 10.5, 9.5, 10.0)), Timing((10.0, 30.0, 10.0, 40.0, 12.0))
    assert steady.median == 10.0 and steady.quartiles == (10.0, 10.5) and not steady.noisy
    assert noisy.median == 12.0 and noisy.spread == pytest.approx((30 - 10) / 12) and noisy.noisy
    fields = noisy.scaled(1e3).fields("us")
    assert fields["us"] == 12e3 and fields["us_q1"] == 10e3 and fields["us_q3"] == 30e3 and fields["noisy"]


def synthetic_phase(samples, spec=e2e.MODELS["llama-tiny"], phase=("prefill", 512)):
    """e2e rows of one phase from preset timings (name -> ms per repeat), through the suite's own code."""
    candidates = {name: iter(values).__next__ for name, values in samples.items()}
    timings = interleaved_timings(candidates, len(next(iter(samples.values()))), time_one=lambda fn: fn(), warmup=0)
    return e2e.phase_rows(spec, phase, dict.fromkeys(samples, 0.1), timings, splits={})


def drawn_figures(monkeypatch):
    """The matplotlib figures ``plots.plot`` saves, kept for inspection."""
    figure = pytest.importorskip("matplotlib.figure")
    figures, save = [], figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(figure.Figure, "savefig", keep)
    return figures


def test_a_noisy_implementation_is_flagged_in_table_markdown_and_plot(tmp_path, monkeypatch):
    rows = synthetic_phase({"eager": [30, 31, 30, 29, 30], "sdpa": [25, 90, 24, 60, 26], "tileattn": [24, 25, 24, 23, 24]})
    assert [r["noisy"] for r in rows] == [False, True, False]
    spec = e2e.MODELS["llama-tiny"]
    e2e.mark_implausible(rows, spec)
    json_path, md_path = report.write_results(tmp_path, "e2e", {"device": "test", "date": "today"}, rows,
                                              e2e.summarize(rows, spec, "llama-tiny"))
    markdown = md_path.read_text()
    table_row = next(line for line in markdown.splitlines() if line.startswith("| prefill, 1 x 512"))
    assert "| 30 [30-30] | 26 [25-60] (noisy) | 24 [24-24] |" in table_row  # median [interquartile range]
    assert "**The machine was noisy**: 1 timing(s)" in markdown and "rerun `tileattn bench e2e`" in markdown
    assert "implausible" not in markdown
    saved = json.loads(json_path.read_text())["rows"]
    assert saved[1]["ms_samples"] == [25, 90, 24, 60, 26] and saved[1]["noisy"]

    figures = drawn_figures(monkeypatch)
    assert [p.name for p in plots.plot(json_path)] == [f"{json_path.stem}.png"]
    latency = figures[0].axes[0]
    assert "noisy" in figures[0]._suptitle.get_text()
    assert "(noisy!)" in latency.get_xticklabels()[0].get_text()
    sdpa_bars = next(c for c in latency.containers if c.get_label() == "sdpa")
    (sdpa_spread,) = sdpa_bars.errorbar.lines[2][0].get_segments()
    assert sorted(sdpa_spread[:, 1].tolist()) == [25, 60]
    assert any(line.get_color() == "red" for line in latency.lines)  # the noisy bar is crossed out


def test_an_implausible_speedup_is_flagged(tmp_path):
    """27x over eager at 512 tokens on the tiny model (the report of a busy first run) cannot come from
    attention, which is a fifth of that model's FLOPs there."""
    rows = synthetic_phase({"eager": [833] * 5, "sdpa": [704] * 5, "tileattn": [30.4] * 5})
    spec = e2e.MODELS["llama-tiny"]
    e2e.mark_implausible(rows, spec)
    assert rows[2]["implausible"] == ["eager", "sdpa"]
    markdown = e2e.summarize(rows, spec, "llama-tiny")
    assert "27.4 (implausible: > 6.0x)" in markdown and "**Implausible speedup**" in markdown
    assert rows[2]["speedup_limit"] == pytest.approx(report.speedup_limit(*e2e.forward_flops(spec["shape"], 512, 512)))
    # the H100 7B table's figures stay unflagged: 2.85x over eager at 4096 tokens
    assert not report.implausible(362 / 127, report.speedup_limit(*e2e.forward_flops(e2e.LLAMA_7B, 4096, 4096)))


def test_a_busy_machine_is_said_to_be_busy():
    rows = [dict(Timing((1.0, 1.0), others_cpu=0.5).fields("ms"))]
    assert "**The machine was busy**: other programs used up to 50%" in report.flag_notes(rows, "tileattn bench", 2)
    assert "busy" not in report.flag_notes([dict(Timing((1.0, 1.0), others_cpu=0.1).fields("ms"))], "x", 2)


def test_line_plots_show_the_spread_and_flags(tmp_path, monkeypatch):
    rows = [dict(impl=impl, head_dim=64, causal=False, seqlen=s, batch=1, tflops=100.0 / t.median, flops=1e11,
                 peak_extra_mib=1.0, **t.fields("ms"))
            for impl, t in (("tileattn", Timing((1.0, 1.0, 1.1))), ("naive", Timing((2.0, 4.0, 3.0, 9.0))))
            for s in (512, 1024)]
    path = tmp_path / "kernels-test.json"
    path.write_text(json.dumps({"suite": "kernels", "environment": {"device": "test"}, "rows": rows}))
    figures = drawn_figures(monkeypatch)
    plots.plot(path)
    throughput = figures[0].axes[0]
    naive_bars = next(c for c in throughput.containers if c.get_label() == "naive").lines[2][0].get_segments()
    assert [sorted(seg[:, 1].tolist()) for seg in naive_bars] == [pytest.approx([100 / 5.25, 100 / 2.75])] * 2
    assert "red x: noisy" in figures[0]._suptitle.get_text()


def test_the_e2e_serving_loop_passes_the_cache_without_deprecation_warnings():
    """Transformers 5.24 renamed forward's ``past_key_values`` to ``cache`` (a FutureWarning per call with the
    old name); older versions only know ``past_key_values``: the keyword is picked from the signature."""
    pytest.importorskip("transformers")

    class OldModel:
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            pass

    assert e2e.cache_argument(OldModel()) == "past_key_values"
    spec = dict(e2e.MODELS["llama-tiny"], requests=2, prompt=8, new_tokens=2)
    model = e2e.build_model(spec, torch.device("cpu"))
    splits = []
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        for impl in ("eager", "tileattn"):
            e2e.use(model, impl)
            e2e.workload(model, spec, ("requests",), torch.device("cpu"), splits)()
    assert not [str(w.message) for w in caught]
    assert len(splits) == 2


def test_decode_plot_with_equal_cache_sizes(tmp_path):
    """Decode rows are plotted against B x L, and different shapes can hold as many tokens: no crash on ties."""
    t = Timing((10.0, 11.0, 10.0))
    rows = [dict(impl="tileattn", kv_heads=8, batch=b, seqlen=s, tb_per_s=2.5, **t.fields("us"))
            for b, s in ((64, 4096), (8, 32768), (1, 16384))]
    path = tmp_path / "decode-test.json"
    path.write_text(json.dumps({"suite": "decode", "environment": {"device": "test"}, "rows": rows}))
    assert plots.plot(path)


def test_error_bars_are_never_negative():
    """A quartile equal to the median must give a zero bar, not a rounding error below zero (matplotlib refuses)."""
    from tileattn.bench.plots import error_bar

    for value, median in ((469.0, 0.3), (1 / 3, 2.9e-3), (0.1 * 3, 1.7)):
        for row in (dict(t=value, ms=median, ms_q1=median * 0.9, ms_q3=median),
                    dict(t=value, ms=median, ms_q1=median, ms_q3=median * 1.1)):
            for is_rate in (True, False):
                assert min(error_bar(row, "t", "ms", is_rate)) >= 0.0


def test_kernel_tables_split_forward_and_backward_rows():
    """Each pass gets its own table; the ratio to FA2 is taken within the pass (a backward row is never compared
    with a forward one), and the backward tables have no naive column (its backward is not timed)."""
    from tileattn.bench import kernels

    def row(impl, which, ms):
        return dict(impl=impl, head_dim=128, causal=True, seqlen=4096, batch=4, tflops=1000.0 / ms, flops=1e12,
                    peak_extra_mib=1.0, max_abs_diff_tileattn_vs_sdpa_flash=0.01, **{"pass": which},
                    **Timing((ms, ms)).fields("ms"))

    rows = [row("tileattn", "forward", 2.0), row("sdpa_flash", "forward", 4.0), row("naive", "forward", 8.0),
            row("tileattn", "backward", 5.0), row("sdpa_flash", "backward", 4.0)]
    text = kernels.summarize(rows)
    forward, backward = text.split("## backward, head_dim 128, causal")
    assert "## forward, head_dim 128, causal" in forward and "naive MiB" in forward
    assert "| 500 [500-500] | 250 [250-250] | 125 [125-125] | 2 |" in forward  # tileattn / FA2 = 2
    assert "| 200 [200-200] | 250 [250-250] | 0.8 |" in backward and "naive" not in backward.split("Timings")[0]
