"""The ``tileattn`` command: ``tileattn bench [suite]`` and ``tileattn info``."""

from __future__ import annotations

import argparse
import sys

import torch


def _info(args) -> int:
    from .bench.report import environment
    from .dispatch import triton_unsupported_reason

    for key, value in environment().items():
        print(f"{key:>13}: {value}")
    probes = [torch.empty(0, dtype=torch.float16, device="cuda")] if torch.cuda.is_available() else []
    probes.append(torch.empty(0, dtype=torch.float32))
    print("     backends:")
    print("               torch (tiled PyTorch): usable on every device")
    print("               naive (materialized): usable on every device")
    for probe in probes:
        reason = triton_unsupported_reason(probe)
        print(f"               triton on {probe.device.type}: {'usable' if reason is None else 'not usable: ' + reason}")
    return 0


def _bench(args) -> int:
    suite = args.suite or ("kernels" if torch.cuda.is_available() else "demo")
    if suite != "demo" and not torch.cuda.is_available():
        print(f"tileattn bench {suite} needs a CUDA GPU; without one, run `tileattn bench` (the CPU demo).")
        return 2
    if suite == "kernels":
        from .bench import kernels

        paths = kernels.run(args.out)
    elif suite == "e2e":
        from .bench import e2e

        paths = e2e.run(args.out)
    elif suite in ("decode", "varlen"):
        from .bench import decode

        paths = decode.run(args.out) if suite == "decode" else decode.run_varlen(args.out)
    else:
        from .bench import demo

        if not torch.cuda.is_available():
            print("No CUDA GPU here: running the small CPU demo (tiled PyTorch path against naive attention).")
        paths = demo.run(args.out)
    print(paths[1].read_text())
    print(f"results: {paths[0]} and {paths[1]}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="tileattn", description="Exact IO-aware attention: benchmarks and info.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark suite (default: kernels on a GPU, demo on CPU)")
    bench.add_argument("suite", nargs="?", choices=["kernels", "decode", "varlen", "e2e", "demo"])
    bench.add_argument("--out", default="tileattn-bench", help="folder for JSON and markdown results")
    bench.set_defaults(func=_bench)
    info = sub.add_parser("info", help="versions, device, and which backends are usable here")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
