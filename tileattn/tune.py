"""``tileattn tune``: measure on this device which backend is fastest at each key length, and store the
crossovers where ``backend="auto"`` reads them (see ``calibration`` for the file format and location).

For every head_dim, dtype and causal mode it times each backend that can run a plain call (the Triton
kernel, each usable SDPA kernel, the tiled PyTorch path) over a sweep of sequence lengths at a fixed
number of tokens (batch = tokens // S), after checking each one's output against the first's. The
backends are timed interleaved round-robin (``bench.report.interleaved_timings``), and each point keeps
every backend's spread; noisy points are listed in the summary with the advice to rerun. The ranking of
medians at each length becomes the table's segments. Ctrl-C stops early and keeps the entries finished.
"""

from __future__ import annotations

import datetime
import json

import torch

from . import calibration, dispatch, sdpa
from .bench.report import BUSY_LIMIT, NOISE_LIMIT, Progress, environment, interleaved_timings, wall_ms

GPU_SWEEP = dict(head_dims=(64, 128), dtypes=(torch.float16, torch.bfloat16), causal_modes=(False, True),
                 seqlens=(128, 256, 512, 1024, 2048, 4096, 8192), tokens=16384, heads=32)
CPU_SWEEP = dict(head_dims=(64,), dtypes=(torch.float32,), causal_modes=(False, True), seqlens=(64, 256, 1024),
                 tokens=2048, heads=8)
REPEATS = 5  # interleaved timings per backend and point


def candidates(q, k, v, causal) -> list[str]:
    """The backends that can run a plain call on these inputs here."""
    names = [b for b in ("triton", *sdpa.KERNELS) if dispatch._why_not(b, q, k, v, dict(
        causal=causal, has_mask=False, windowed=False, softcap=None, return_lse=False)) is None]
    if q.device.type == "cpu":
        names = [b for b in names if b != "triton"]  # the interpreter is a test tool, not a backend to time
    return names + ["torch"]


def sample_ms(device):
    """One timing sample of ``fn``: on a GPU the median of ``triton.testing.do_bench`` over ~15 ms of calls
    (CUDA events), on CPU the wall time of one call."""
    if device.type != "cuda":
        return wall_ms
    from triton.testing import do_bench

    return lambda fn: do_bench(fn, warmup=5, rep=15, return_mode="median")


def run(device=None, *, sweep=None, out_path=None, progress: Progress | None = None) -> tuple[str, dict]:
    """Measure, write the calibration JSON (default: the user's file for this device, which ``auto`` reads);
    returns (path, data). Ctrl-C keeps the finished entries (``measured_with["interrupted"]`` is then true),
    or, before the first one, re-raises KeyboardInterrupt and writes nothing."""
    import tileattn

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sweep = sweep or (GPU_SWEEP if device.type == "cuda" else CPU_SWEEP)
    name = calibration.device_name(device)
    combos = [(d, dt, c) for d in sweep["head_dims"] for dt in sweep["dtypes"] for c in sweep["causal_modes"]]
    progress = progress or Progress(len(combos) * len(sweep["seqlens"]), "tune")
    entries, interrupted = [], False
    try:
        for head_dim, dtype, causal in combos:
            points = []
            for s in sweep["seqlens"]:
                b = max(1, sweep["tokens"] // s)
                q, k, v = (torch.randn(b, sweep["heads"], s, head_dim, device=device, dtype=dtype) for _ in range(3))
                calls, first = {}, None
                for backend in candidates(q, k, v, causal):
                    def call(backend=backend):
                        return tileattn.attention(q, k, v, causal=causal, backend=backend)
                    out = call()  # also the warm-up
                    if first is None:
                        first = out
                    elif not torch.allclose(out.float(), first.float(), atol=2e-2, rtol=2e-2):
                        progress.note(f"  {backend} disagrees with {next(iter(calls))} at S={s}: not ranked")
                        continue
                    calls[backend] = call
                timings = interleaved_timings(calls, REPEATS, time_one=sample_ms(device), warmup=0)
                points.append({"seqlen": s, "batch": b, "ms": {n: t.median for n, t in timings.items()},
                               "spread": {n: round(t.spread, 3) for n, t in timings.items()},
                               "noisy": [n for n, t in timings.items() if t.noisy],
                               "others_cpu": next(iter(timings.values())).others_cpu})
                progress.step(f"D={head_dim} {str(dtype).removeprefix('torch.')} causal={causal} S={s}: " + ", ".join(
                    f"{n} {t.median:.3g} ms" + (" (noisy)" if t.noisy else "")
                    for n, t in sorted(timings.items(), key=lambda item: item[1].median)))
            entries.append({"dtype": str(dtype).removeprefix("torch."), "causal": causal, "head_dim": head_dim,
                            "segments": calibration.segments_from_points(points), "points": points})
    except KeyboardInterrupt:
        if not entries:
            raise  # nothing to keep: leave any earlier calibration file as it was
        progress.note(f"interrupted: keeping the {len(entries)} finished entries")
        interrupted = True
    env = environment()
    measured_with = {"date": datetime.date.today().isoformat(), "torch": env["torch"], "triton": env["triton"],
                     "heads": sweep["heads"], "tokens": sweep["tokens"]}
    if interrupted:
        measured_with["interrupted"] = True
    data = {"format": calibration.FORMAT, "device": name, "measured_with": measured_with, "entries": entries}
    calibration.parse(data, "tune result")  # what we write must load
    path = out_path or calibration.user_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    dispatch.reset()
    return str(path), data


def summarize(data: dict) -> str:
    """Markdown: the crossovers of each entry (what auto will choose up to which length), then whether other
    programs competed for the CPU and which points' timings were noisy, with the advice to rerun."""
    lines = [f"# tileattn tune: {data['device']}", "",
             ", ".join(f"{k}: {v}" for k, v in data["measured_with"].items()), "",
             "| dtype | causal | head_dim | fastest first, by key length |", "|---|---|---|---|"]
    noisy = []
    for e in data["entries"]:
        segs = "; ".join(f"{'S <= ' + str(s['up_to']) if s['up_to'] else 'longer'}: {' < '.join(s['ranking'])}"
                         for s in e["segments"])
        lines.append(f"| {e['dtype']} | {e['causal']} | {e['head_dim']} | {segs} |")
        noisy += [f"{e['dtype']} causal={e['causal']} head_dim={e['head_dim']} S={p['seqlen']}: "
                  + ", ".join(f"{n} (interquartile range {p['spread'][n]:.0%} of the median)" for n in p["noisy"])
                  for p in e["points"] if p.get("noisy")]
    lines += ["", f"Timings: median of {REPEATS} repeats, backends interleaved round-robin in each repeat."]
    others = max((p.get("others_cpu") or 0 for e in data["entries"] for p in e["points"]), default=0)
    if others > BUSY_LIMIT:
        lines += ["", f"**The machine was busy**: other programs used up to {others:.0%} of its CPU time during "
                      "the measurement. Rerun `tileattn tune` when it is idle."]
    if noisy:
        lines += ["", f"**The machine was noisy**: at these points a backend's timings varied by more than "
                      f"{NOISE_LIMIT:.0%} between repeats, so the ranking there may be wrong. Close other programs "
                      "and rerun `tileattn tune`:", ""] + [f"- {n}" for n in noisy]
    return "\n".join(lines) + "\n"
