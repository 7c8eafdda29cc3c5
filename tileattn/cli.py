"""The ``tileattn`` command: ``bench``, ``tune``, ``warmup``, ``info``, ``plot``.

Every failure the user can fix (no GPU, a model too large or too slow for the device, a missing optional
package, a file that is not a result) is one line saying so, with exit status 2; Ctrl-C ends quietly with a
note of what was saved, with status 130 (the shell's convention for an interrupted program).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import torch

SUITES = ("e2e", "kernels", "decode", "varlen", "longctx", "vit", "overhead", "demo")
ALL = ("e2e", "kernels", "decode", "varlen", "longctx", "vit", "overhead")  # `bench all`: every suite but the CPU demo
GPU_ONLY = ("kernels", "decode", "varlen", "longctx")
INTERRUPTED = 130


def _info(args) -> int:
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
    print(f"  calibration: {_calibration_in_use()}")
    return 0


def _calibration_in_use() -> str:
    """Which calibration file backend='auto' reads on this machine's default device, and where it looks."""
    import json

    from . import calibration

    name = calibration.device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    user, shipped = calibration.user_path(name), calibration.shipped_path(name)
    fallback = f"shipped defaults ({shipped})" if shipped.exists() else "the built-in rule"
    if user.exists():
        try:
            calibration.parse(json.loads(user.read_text()), str(user))
        except (OSError, ValueError) as exc:
            return f"{user} is unreadable ({exc}); auto uses {fallback}"
        return f"{user} (written by `tileattn tune`)"
    if shipped.exists():
        return f"shipped defaults ({shipped}); `tileattn tune` would write {user}, which auto reads first"
    return f"none: the built-in rule (run `tileattn tune` to measure this device; auto reads {user})"


def _bench(args) -> int:
    from .bench import plots

    suites = ALL if args.suite == "all" else (args.suite or "e2e",)
    if not torch.cuda.is_available():
        if args.suite in GPU_ONLY:
            print(f"tileattn bench {args.suite} needs a CUDA GPU; without one, `tileattn bench` runs the article's "
                  "table on a small CPU configuration.")
            return 2
        skipped = [s for s in suites if s in GPU_ONLY]
        if skipped:
            print(f"No CUDA GPU here: skipping {', '.join(skipped)} (GPU only).")
        suites = tuple(s for s in suites if s not in GPU_ONLY)
    status = 0
    for suite in suites:
        print(f"== tileattn bench {suite} ==", flush=True)
        try:
            json_path, md_path = _run_suite(suite, args)
        except RuntimeError as exc:  # TooLargeError, a missing optional package: a message, not a trace
            print(f"tileattn bench {suite}: {exc}")
            status = 2
            continue
        except KeyboardInterrupt:
            print(f"\nInterrupted before tileattn bench {suite} measured anything: nothing saved for it.")
            return INTERRUPTED
        print(md_path.read_text())
        pngs = plots.plot(json_path)
        print("results: " + ", ".join(str(p) for p in (json_path, md_path, *pngs)), flush=True)
        results = plots.load(json_path)
        if results.get("interrupted"):
            print(f"Interrupted: {len(results['rows'])} result rows of tileattn bench {suite} measured before Ctrl-C "
                  "are saved in the files above" + ("; the suites after it did not run." if suite != suites[-1] else "."))
            return INTERRUPTED
    return status


def _run_suite(suite, args):
    """Run one suite (its module imported only now: each needs only its own optional packages)."""
    module = importlib.import_module(f"tileattn.bench.{'decode' if suite == 'varlen' else suite}")
    if suite == "e2e":
        return module.run(args.out, model_name=args.model)
    if suite == "varlen":
        return module.run_varlen(args.out)
    return module.run(args.out)


def _tune(args) -> int:
    from . import calibration, tune

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sweep = None
    if args.quick:
        base = tune.GPU_SWEEP if device.type == "cuda" else tune.CPU_SWEEP
        sweep = dict(base, head_dims=base["head_dims"][-1:], dtypes=base["dtypes"][-1:], seqlens=base["seqlens"][::2])
    try:
        path, data = tune.run(device, sweep=sweep, out_path=args.out)
    except KeyboardInterrupt:
        print("\nInterrupted before any entry was finished: no calibration written.")
        return INTERRUPTED
    print(tune.summarize(data))
    read_by_auto = calibration.user_path(calibration.device_name(device))
    if Path(path).resolve() == read_by_auto.resolve():
        print(f"calibration written to {path}; backend='auto' uses it from now on (`tileattn info` shows it)")
    else:
        print(f"calibration written to {path}. backend='auto' reads only {read_by_auto}: to use this one, copy "
              f"it there (cp {path} {read_by_auto}), or run `tileattn tune` without --out.")
    if data["measured_with"].get("interrupted"):
        print("Interrupted: only the entries finished before Ctrl-C were written.")
        return INTERRUPTED
    return 0


def _warmup(args) -> int:
    import os

    from .warmup import warmup

    if not torch.cuda.is_available():
        print("tileattn warmup compiles the Triton kernels for a CUDA GPU; there is none here (on other devices "
              "tileattn runs PyTorch code, which has nothing to compile).")
        return 2
    try:
        heads, kv_heads, head_dim = _warmup_shape(args)
        warmed = warmup(heads, kv_heads, head_dim, head_dim_v=args.head_dim_v, dtype=getattr(torch, args.dtype),
                        batch_sizes=args.batch_sizes, prompt_lengths=args.prompt_lengths,
                        max_new_tokens=args.max_new_tokens, paged_block_size=args.paged_block_size,
                        backend=args.backend)
    except ValueError as exc:
        print(f"tileattn warmup: {exc}")
        return 2
    width = max(len(w.call) for w in warmed)
    print(f"{'call':<{width}}  {'backend':<14}  {'first call':>11}  {'warm':>9}")
    for w in warmed:
        print(f"{w.call:<{width}}  {w.backend:<14}  {w.first_s * 1e3:8.1f} ms  {w.warm_s * 1e3:6.2f} ms")
    cache = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    print(f"Triton's compiled kernels are in {cache} (TRITON_CACHE_DIR): later processes load them instead of "
          "compiling; run this again to see the first-call times with them cached.")
    return 0


def _warmup_shape(args) -> tuple[int, int, int]:
    """``(heads, kv_heads, head_dim)`` from the flags, with those not given read from ``--model``'s config."""
    heads, kv_heads, head_dim = args.heads, args.kv_heads, args.head_dim
    if args.model:
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(args.model)
        except (ImportError, OSError, ValueError) as exc:
            raise ValueError(f"cannot read the config of {args.model!r}: {exc}") from None
        config = getattr(config, "text_config", config)  # a multimodal model's language part
        heads = heads or config.num_attention_heads
        kv_heads = kv_heads or getattr(config, "num_key_value_heads", None) or heads
        head_dim = head_dim or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not (heads and head_dim):
        raise ValueError("give --model, or --heads and --head-dim (and --kv-heads for GQA)")
    return heads, kv_heads or heads, head_dim


def _plot(args) -> int:
    from .bench import plots

    status = 0
    for path in args.results:
        try:
            pngs = plots.plot(path)
        except plots.ResultsError as exc:
            print(f"tileattn plot: {exc}", file=sys.stderr)
            status = 2
            continue
        for png in pngs:
            print(png)
    return status


def main(argv=None) -> int:
    from .bench.e2e import MODELS

    parser = argparse.ArgumentParser(prog="tileattn", description="Exact IO-aware attention: benchmarks, tuning, info.")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark suite (default: e2e, the article's table; on a machine "
                                         "without a GPU a small CPU configuration)")
    bench.add_argument("suite", nargs="?", choices=[*SUITES, "all"], help="default: e2e; all: every suite but demo "
                                                                          "that this machine can run")
    bench.add_argument("--model", choices=sorted(MODELS), help="e2e model (default: llama-7b on a GPU, llama-tiny on "
                                                               "CPU; a model the device cannot run in reasonable "
                                                               "memory or time is refused with an estimate)")
    bench.add_argument("--out", default="tileattn-bench", help="folder for JSON, markdown and PNG results "
                                                               "(default: ./tileattn-bench)")
    bench.set_defaults(func=_bench)
    tune = sub.add_parser("tune", help="measure backend crossovers on this device for backend='auto'")
    tune.add_argument("--quick", action="store_true", help="one head_dim and dtype, every other length")
    tune.add_argument("--out", type=Path, help="write here instead of the file backend='auto' reads (see "
                                               "`tileattn info`)")
    tune.set_defaults(func=_tune)
    warm = sub.add_parser("warmup", help="compile the kernels a model's attention will launch, before serving")
    warm.add_argument("--model", help="a Transformers model name or local path: heads and head dim from its config")
    warm.add_argument("--heads", type=int, help="query heads (default: the model's)")
    warm.add_argument("--kv-heads", type=int, help="K/V heads (default: the model's, else --heads)")
    warm.add_argument("--head-dim", type=int, help="q/k head dim (default: the model's)")
    warm.add_argument("--head-dim-v", type=int, help="v head dim (default: --head-dim)")
    warm.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    warm.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="default: 1")
    warm.add_argument("--prompt-lengths", type=int, nargs="+", default=[512], help="default: 512")
    warm.add_argument("--max-new-tokens", type=int, default=256, help="decode steps after each prompt (default: "
                                                                      "256)")
    warm.add_argument("--paged-block-size", type=int, help="also warm decode over a paged cache of these pages")
    warm.add_argument("--backend", default="auto", choices=("auto", "triton"), help="as the model will use it")
    warm.set_defaults(func=_warmup)
    info = sub.add_parser("info", help="versions, device, usable backends and the calibration in use")
    info.set_defaults(func=_info)
    plot = sub.add_parser("plot", help="draw the PNG plots of results JSON files")
    plot.add_argument("results", nargs="+", help="JSON files written by tileattn bench, e.g. tileattn-bench/*.json")
    plot.set_defaults(func=_plot)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # outside a suite's measuring loop (which keeps its results itself)
        print("\nInterrupted.", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
