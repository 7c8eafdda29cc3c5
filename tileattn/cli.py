"""The ``tileattn`` command: ``bench``, ``tune``, ``info``, ``plot``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

SUITES = ("e2e", "kernels", "decode", "varlen", "vit", "demo")
GPU_ONLY = ("kernels", "decode", "varlen")


def _info(args) -> int:
    from . import calibration
    from .bench.report import environment
    from .dispatch import triton_unsupported_reason

    for key, value in environment().items():
        print(f"{key:>13}: {value}")
    probes = [torch.empty(0, dtype=torch.float16, device="cuda")] if torch.cuda.is_available() else []
    probes.append(torch.empty(0, dtype=torch.float32))
    print("     backends:")
    for probe in probes:
        reason = triton_unsupported_reason(probe)
        print(f"               triton on {probe.device.type}: {'usable' if reason is None else 'not usable: ' + reason}")
    print("               sdpa: PyTorch's fused kernels, for plain calls (no mask, window, softcap or lse)")
    print("               torch (tiled PyTorch): usable on every device")
    print("               naive (materialized): usable on every device (a baseline, never chosen by auto)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = calibration.device_name(device)
    user, shipped = calibration.user_path(name), calibration.shipped_path(name)
    source = user if user.exists() else shipped if shipped.exists() else None
    print(f"  calibration: {source or 'none (built-in rule; run `tileattn tune`)'}")
    return 0


def _bench(args) -> int:
    from .bench import plots

    has_gpu = torch.cuda.is_available()
    suites = SUITES[:-1] if args.suite == "all" else (args.suite or "e2e",)
    if not has_gpu:
        missing = [s for s in suites if s in GPU_ONLY]
        if missing and args.suite != "all":
            print(f"tileattn bench {missing[0]} needs a CUDA GPU; without one, `tileattn bench` runs the article's "
                  "table on a small CPU configuration.")
            return 2
        suites = tuple(s for s in suites if s not in GPU_ONLY)
        print("No CUDA GPU here: running the small CPU configuration (labelled as such in the results).")
    status = 0
    for suite in suites:
        print(f"== tileattn bench {suite} ==")
        try:
            paths = _run_suite(suite, args)
        except RuntimeError as exc:  # TooLargeError, a missing optional package: a message, not a trace
            print(f"tileattn bench {suite}: {exc}")
            status = 2
            continue
        print(paths[1].read_text())
        pngs = plots.plot(paths[0])
        print("results: " + ", ".join(str(p) for p in (*paths, *pngs)))
    return status


def _run_suite(suite, args):
    from .bench import decode, demo, e2e, kernels, vit

    if suite == "e2e":
        return e2e.run(args.out, model_name=args.model)
    if suite == "kernels":
        return kernels.run(args.out)
    if suite == "decode":
        return decode.run(args.out)
    if suite == "varlen":
        return decode.run_varlen(args.out)
    if suite == "vit":
        return vit.run(args.out)
    return demo.run(args.out)


def _tune(args) -> int:
    from . import tune

    sweep = None
    if args.quick:
        base = tune.GPU_SWEEP if torch.cuda.is_available() else tune.CPU_SWEEP
        sweep = dict(base, head_dims=base["head_dims"][-1:], dtypes=base["dtypes"][-1:], seqlens=base["seqlens"][::2])
    path, data = tune.run(sweep=sweep, out_path=args.out)
    print(tune.summarize(data))
    print(f"calibration written to {path}; backend='auto' uses it from now on")
    return 0


def _plot(args) -> int:
    from .bench import plots

    for path in args.results:
        for png in plots.plot(path):
            print(png)
    return 0


def main(argv=None) -> int:
    from .bench.e2e import MODELS

    parser = argparse.ArgumentParser(prog="tileattn", description="Exact IO-aware attention: benchmarks, tuning, info.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark suite (default: e2e, the article's table; on a machine "
                                         "without a GPU a small CPU configuration)")
    bench.add_argument("suite", nargs="?", choices=[*SUITES, "all"], help="default: e2e")
    bench.add_argument("--model", choices=sorted(MODELS), help="e2e model (default: llama-7b on a GPU, llama-tiny on CPU)")
    bench.add_argument("--out", default="tileattn-bench", help="folder for JSON, markdown and PNG results")
    bench.set_defaults(func=_bench)
    tune = sub.add_parser("tune", help="measure backend crossovers on this device for backend='auto'")
    tune.add_argument("--quick", action="store_true", help="one head_dim and dtype, every other length")
    tune.add_argument("--out", type=Path, help="write here instead of the user's cache dir")
    tune.set_defaults(func=_tune)
    info = sub.add_parser("info", help="versions, device, usable backends and the calibration in use")
    info.set_defaults(func=_info)
    plot = sub.add_parser("plot", help="draw the PNG plots of results JSON files")
    plot.add_argument("results", nargs="+", help="JSON files written by tileattn bench")
    plot.set_defaults(func=_plot)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
