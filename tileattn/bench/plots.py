"""PNG plots of a suite's JSON results: throughput (or time) and peak memory against sequence length.

``tileattn bench`` calls :func:`plot` after each suite; ``tileattn plot tileattn-bench/*.json`` redraws them
(e.g. on a laptop from results measured on a GPU machine without matplotlib). matplotlib is optional
(``pip install tileattn[bench]``): without it the plots are skipped with a message.

Every timed point carries its spread: error bars span the interquartile range of the repeats, and a point
flagged noisy (or a speedup flagged implausible) is drawn with a red cross and named in the title.
"""

from __future__ import annotations

import json
from pathlib import Path

from .report import BUSY_LIMIT, NOISE_LIMIT


class ResultsError(ValueError):
    """A file is not a readable tileattn bench result (the message names the file and the problem)."""


# suite -> (plotted key, its axis label, the timing key it derives from, whether it is a rate (work / time),
#           the keys that split rows into separate panels, the plot's name)
METRICS = {
    "kernels": ("tflops", "TFLOP/s", "ms", True, ("head_dim", "causal"), "throughput"),
    "decode": ("tb_per_s", "K+V read, TB/s", "us", True, ("kv_heads",), "throughput"),
    "vit": ("images_per_s", "images / s", "ms", True, (), "throughput"),
    "demo": ("seconds", "seconds per call", "seconds", False, (), "time"),
}
FLAG_NOTE = f"red x: noisy (IQR > {NOISE_LIMIT:.0%} of the median) or implausible; rerun"


def load(json_path) -> dict:
    """The results in ``json_path``; raises :class:`ResultsError` naming the file and what is wrong."""
    json_path = Path(json_path)
    try:
        data = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{json_path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"{json_path}: cannot be read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{json_path}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list) or "suite" not in data:
        raise ResultsError(f"{json_path}: not a tileattn bench result (expected \"suite\" and \"rows\")")
    return data


def error_bar(row, metric, timing_key, is_rate):
    """(value - low, high - value) of ``row[metric]`` over the interquartile range of its timing, or (0, 0)."""
    value, median = row[metric], row.get(timing_key)
    q1, q3 = row.get(f"{timing_key}_q1"), row.get(f"{timing_key}_q3")
    if None in (median, q1, q3) or not median:
        return 0.0, 0.0
    low, high = (value * median / q3, value * median / q1) if is_rate else (value * q1 / median, value * q3 / median)
    return max(value - low, 0.0), max(high - value, 0.0)  # a quartile equal to the median: rounding may go below 0


def flagged(row) -> bool:
    return bool(row.get("noisy") or row.get("implausible"))


def warnings_line(rows) -> str:
    """The title's lines about flagged points and a busy machine ("" when there is nothing to say)."""
    notes = [FLAG_NOTE] if any(flagged(r) for r in rows) else []
    others = max((r.get("others_cpu") or 0 for r in rows), default=0)
    if others > BUSY_LIMIT:
        notes.append(f"machine busy: other programs used {others:.0%} of the CPU")
    return "\n".join(notes)


def plot(json_path) -> list[Path]:
    """Draw the PNGs for one results JSON next to it; returns their paths (empty without matplotlib).
    Raises :class:`ResultsError` if the file is not a tileattn bench result."""
    data = load(json_path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, then `tileattn plot <json>`)")
        return []
    json_path = Path(json_path)
    suite, rows = data["suite"], [r for r in data["rows"] if r.get("kind") != "generate"]
    device = data.get("environment", {}).get("device", "")
    if suite == "e2e" and rows:
        return [_e2e_bars(plt, rows, device, json_path)]
    if suite not in METRICS or not rows:
        return []
    metric, label, timing_key, is_rate, panel_keys, name = METRICS[suite]

    def length(r):  # decode shapes vary B and L together: plot against the tokens in the cache
        return r["batch"] * r["seqlen"] if suite == "decode" else r["seqlen"]

    xlabel = "cached tokens (B x L)" if suite == "decode" else "sequence length (tokens)"
    panels = list(dict.fromkeys(tuple(r.get(k) for k in panel_keys) for r in rows))
    paths = []
    for what, key, axis in ((name, metric, label), ("memory", "peak_extra_mib", "peak extra MiB")):
        if key == "peak_extra_mib" and not any(key in r for r in rows):
            key, axis = "peak_extra_gib", "peak extra GiB"
        if not any(r.get(key) is not None for r in rows):
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
        for ax, panel in zip(axes[0], panels):
            sel = [r for r in rows if tuple(r.get(k) for k in panel_keys) == panel and r.get(key) is not None]
            for series in dict.fromkeys(_series(r) for r in sel):
                points = sorted(((length(r), r) for r in sel if _series(r) == series), key=lambda point: point[0])
                xs, ys = [x for x, _ in points], [r[key] for _, r in points]
                bars = ([error_bar(r, key, timing_key, is_rate) for _, r in points] if key == metric
                        else [(0.0, 0.0)] * len(points))
                ax.errorbar(xs, ys, yerr=list(zip(*bars)), marker="o", capsize=3, label=series)
                bad = [(x, r[key]) for x, r in points if key == metric and flagged(r)]
                if bad:
                    ax.plot(*zip(*bad), "x", color="red", markersize=10, zorder=5)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(axis)
            ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel)) or suite, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=8)
        title = f"tileattn bench {suite}: {what} ({device})"
        if key == metric:
            title += "\nerror bars: interquartile range (IQR) of the repeats"
        paths.append(_save(plt, fig, title, rows if key == metric else [],
                           json_path.with_name(f"{json_path.stem}-{what}.png")))
    return paths


def _series(row) -> str:
    """A plotted line's name: the implementation, and the pass when it is not the forward (``bench kernels``)."""
    which = row.get("pass", "forward")
    return row["impl"] if which == "forward" else f"{row['impl']} ({which})"


def _e2e_bars(plt, rows, device, json_path) -> Path:
    """Latency (with its interquartile range) and peak memory per workload, one bar per implementation;
    flagged workloads are named on the axis and their bars crossed out in red."""
    workloads = list(dict.fromkeys((r["kind"], r["seqlen"], r["batch"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    by = {((r["kind"], r["seqlen"], r["batch"]), r["impl"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    width = 0.8 / len(impls)
    for ax, key, axis in ((axes[0], "ms", "ms (lower is better)"), (axes[1], "peak_extra_gib", "peak extra GiB")):
        for i, impl in enumerate(impls):
            sel = [by.get((w, impl), {}) for w in workloads]
            xs = [x + i * width for x in range(len(workloads))]
            values = [r.get(key) or 0 for r in sel]
            bars = [error_bar(r, "ms", "ms", False) if key == "ms" and r.get("ms") else (0.0, 0.0) for r in sel]
            ax.bar(xs, values, width, yerr=list(zip(*bars)) if key == "ms" else None, capsize=3, label=impl)
            if key == "ms":
                bad = [(x, v) for x, v, r in zip(xs, values, sel) if flagged(r)]
                if bad:
                    ax.plot(*zip(*bad), "x", color="red", markersize=10, zorder=5)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))])
        labels = []
        for w in workloads:  # the timing flags name the workload under the latency bars
            flags = {f for impl in impls for f in ("noisy", "implausible") if by.get((w, impl), {}).get(f)}
            flagged_timing = flags and key == "ms"
            labels.append(f"{w[0]}\n{w[2]} x {w[1]}" + (f"\n({', '.join(sorted(flags))}!)" if flagged_timing else ""))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(axis)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    title = f"tileattn bench e2e ({device})\nms: median, error bars: interquartile range (IQR) of the interleaved repeats"
    return _save(plt, fig, title, rows, json_path.with_name(f"{json_path.stem}.png"))


def _save(plt, fig, title, flagged_rows, path):
    """Title the figure (with the flags of ``flagged_rows``, if any), write it to ``path``, return the path."""
    if warnings_line(flagged_rows):
        title += f"\n{warnings_line(flagged_rows)}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
