"""``tileattn tune``: measure on this device which backend is fastest at each key length, and store the
crossovers where ``backend="auto"`` reads them (see ``calibration`` for the file format and location).

For every head_dim, dtype and causal mode it times each backend that can run a plain call (the Triton
kernel, each usable SDPA kernel, the tiled PyTorch path) over a sweep of sequence lengths at a fixed
number of tokens (batch = tokens // S), after checking each one's output against the first's. The
ranking at each length becomes the table's segments. Ctrl-C stops early and keeps the entries finished.
"""

from __future__ import annotations

import datetime
import json
import time

import torch

from . import calibration, dispatch, sdpa
from .bench.report import Progress, environment

GPU_SWEEP = dict(head_dims=(64, 128), dtypes=(torch.float16, torch.bfloat16), causal_modes=(False, True),
                 seqlens=(128, 256, 512, 1024, 2048, 4096, 8192), tokens=16384, heads=32)
CPU_SWEEP = dict(head_dims=(64,), dtypes=(torch.float32,), causal_modes=(False, True), seqlens=(64, 256, 1024),
                 tokens=2048, heads=8)


def candidates(q, k, v, causal) -> list[str]:
    """The backends that can run a plain call on these inputs here."""
    names = [b for b in ("triton", *sdpa.KERNELS) if dispatch._why_not(b, q, k, v, dict(
        causal=causal, has_mask=False, windowed=False, softcap=None, return_lse=False)) is None]
    if q.device.type == "cpu":
        names = [b for b in names if b != "triton"]  # the interpreter is a test tool, not a backend to time
    return names + ["torch"]


def time_ms(fn, device) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def run(device=None, *, sweep=None, out_path=None, progress: Progress | None = None) -> tuple[str, dict]:
    """Measure, write the calibration JSON (default: the user's file for this device); returns (path, data)."""
    import tileattn

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sweep = sweep or (GPU_SWEEP if device.type == "cuda" else CPU_SWEEP)
    name = calibration.device_name(device)
    combos = [(d, dt, c) for d in sweep["head_dims"] for dt in sweep["dtypes"] for c in sweep["causal_modes"]]
    progress = progress or Progress(len(combos) * len(sweep["seqlens"]), "tune")
    entries = []
    try:
        for head_dim, dtype, causal in combos:
            points = []
            for s in sweep["seqlens"]:
                b = max(1, sweep["tokens"] // s)
                q, k, v = (torch.randn(b, sweep["heads"], s, head_dim, device=device, dtype=dtype) for _ in range(3))
                ms, first = {}, None
                for backend in candidates(q, k, v, causal):
                    def call(backend=backend):
                        return tileattn.attention(q, k, v, causal=causal, backend=backend)
                    out = call()
                    if first is None:
                        first = out
                    elif not torch.allclose(out.float(), first.float(), atol=2e-2, rtol=2e-2):
                        progress.note(f"  {backend} disagrees with {next(iter(ms))} at S={s}: not ranked")
                        continue
                    ms[backend] = time_ms(call, device)
                points.append({"seqlen": s, "batch": b, "ms": ms})
                progress.step(f"D={head_dim} {str(dtype).removeprefix('torch.')} causal={causal} S={s}: "
                              + ", ".join(f"{k_} {v_:.3g}" for k_, v_ in sorted(ms.items(), key=lambda x: x[1])))
            entries.append({"dtype": str(dtype).removeprefix("torch."), "causal": causal, "head_dim": head_dim,
                            "segments": calibration.segments_from_points(points), "points": points})
    except KeyboardInterrupt:
        progress.note(f"interrupted: keeping the {len(entries)} finished entries")
    env = environment()
    data = {"format": calibration.FORMAT, "device": name,
            "measured_with": {"date": datetime.date.today().isoformat(), "torch": env["torch"],
                              "triton": env["triton"], "heads": sweep["heads"], "tokens": sweep["tokens"]},
            "entries": entries}
    calibration.parse(data, "tune result")  # what we write must load
    path = out_path or calibration.user_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")
    dispatch.reset()
    return str(path), data


def summarize(data: dict) -> str:
    """Markdown: the crossovers of each entry (what auto will choose up to which length)."""
    lines = [f"# tileattn tune: {data['device']}", "",
             ", ".join(f"{k}: {v}" for k, v in data["measured_with"].items()), "",
             "| dtype | causal | head_dim | fastest first, by key length |", "|---|---|---|---|"]
    for e in data["entries"]:
        segs = "; ".join(f"{'S <= ' + str(s['up_to']) if s['up_to'] else 'longer'}: {' < '.join(s['ranking'])}"
                         for s in e["segments"])
        lines.append(f"| {e['dtype']} | {e['causal']} | {e['head_dim']} | {segs} |")
    return "\n".join(lines) + "\n"
