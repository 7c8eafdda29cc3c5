"""PNG plots of a suite's JSON results: throughput and peak memory against sequence length.

``tileattn bench`` calls :func:`plot` after each suite; ``tileattn plot results/*.json`` redraws them
(e.g. on a laptop from results measured on a GPU machine without matplotlib). matplotlib is optional
(``pip install tileattn[bench]``): without it the plots are skipped with a message.
"""

from __future__ import annotations

import json
from pathlib import Path

# suite -> (throughput key, its axis label, the keys that split rows into separate panels)
METRICS = {
    "kernels": ("tflops", "TFLOP/s", ("head_dim", "causal")),
    "decode": ("tb_per_s", "K+V read, TB/s", ("kv_heads",)),
    "e2e": (None, None, ()),
    "vit": ("images_per_s", "images / s", ()),
    "demo": ("seconds", "seconds per call", ()),
}


def plot(json_path) -> list[Path]:
    """Draw the PNGs for one results JSON next to it; returns their paths (empty without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, then `tileattn plot <json>`)")
        return []
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    suite, rows = data["suite"], [r for r in data["rows"] if r.get("kind") != "generate"]
    if suite not in METRICS or not rows:
        return []
    device = data["environment"].get("device", "")
    paths = []
    if suite == "e2e":
        paths.append(_e2e_bars(plt, rows, device, json_path))
    else:
        metric, label, panel_keys = METRICS[suite]
        def length(r):  # decode shapes vary B and L together: plot against the tokens in the cache
            return r["batch"] * r["seqlen"] if suite == "decode" else r["seqlen"]
        xlabel = "cached tokens (B x L)" if suite == "decode" else "sequence length (tokens)"
        panels = list(dict.fromkeys(tuple(r.get(k) for k in panel_keys) for r in rows))
        for what, key, axis in (("throughput", metric, label), ("memory", "peak_extra_mib", "peak extra MiB")):
            if key == "peak_extra_mib" and not any(key in r for r in rows):
                key, axis = "peak_extra_gib", "peak extra GiB"
            if not any(r.get(key) is not None for r in rows):
                continue
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
            for ax, panel in zip(axes[0], panels):
                sel = [r for r in rows if tuple(r.get(k) for k in panel_keys) == panel]
                for impl in dict.fromkeys(r["impl"] for r in sel):
                    pts = sorted((length(r), r[key]) for r in sel if r["impl"] == impl and r.get(key) is not None)
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=impl)
                ax.set_xscale("log", base=2)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(axis)
                ax.set_title(", ".join(f"{k}={v}" for k, v in zip(panel_keys, panel)) or suite, fontsize=9)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.suptitle(f"tileattn bench {suite}: {what} ({device})", fontsize=10)
            fig.tight_layout()
            path = json_path.with_name(f"{json_path.stem}-{what}.png")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def _e2e_bars(plt, rows, device, json_path) -> Path:
    """Latency and peak memory per workload, one bar per implementation."""
    workloads = list(dict.fromkeys((r["kind"], r["seqlen"], r["batch"]) for r in rows))
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(impls)
    for ax, key, axis in ((axes[0], "ms", "ms (lower is better)"), (axes[1], "peak_extra_gib", "peak extra GiB")):
        for i, impl in enumerate(impls):
            values = [next((r.get(key) or 0 for r in rows if (r["kind"], r["seqlen"], r["batch"]) == w
                            and r["impl"] == impl), 0) for w in workloads]
            ax.bar([x + i * width for x in range(len(workloads))], values, width, label=impl)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(workloads))])
        ax.set_xticklabels([f"{k}\n{b} x {s}" for k, s, b in workloads], fontsize=8)
        ax.set_ylabel(axis)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"tileattn bench e2e ({device})", fontsize=10)
    fig.tight_layout()
    path = json_path.with_name(f"{json_path.stem}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
