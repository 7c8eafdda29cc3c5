"""Decode step time over an fp8 KV cache against the bf16 cache, on the Triton kernel (issue 16's bars), on a GPU.

    PYTHONPATH=. python benchmarks/fp8/time_decode.py --out DIR [--no-paged] [--no-sweep | --sweep-only]

One query token per sequence (Hq = 32, Hkv = 8, D = 128, bf16 q) over full caches of L tokens, B in {1, 8, 32}, L in
{4096, 16384}. Each step is captured in a CUDA graph and timed by its replays with CUDA events, L2 flushed before
each replay (``triton.testing.do_bench``, median), the variants of a shape interleaved over a few rounds (median
of the rounds' medians). Variants:

* ``bf16``, and fp8 (e4m3fn) caches with per-tensor, per-KV-head ``[Hkv]`` and per-token scales, contiguous;
* the same steps writing their new token (``k_new``/``v_new``: quantized on write into the fp8 caches), for the
  write overhead (a step over ``L - 1`` cached tokens plus the new one, against one over ``L`` cached tokens);
* paged caches (pages of 16 and 64 tokens, shuffled block tables): bf16, fp8 per tensor, fp8 per token;
* (informational) a sweep of the kernel's ``(block_n, num_warps, num_stages)`` tile over the fp8 per-token cache,
  for tuning: fp8 tiles carry half the bytes of the bf16 ones the defaults were tuned for.

Bars (issue 16): fp8 step <= 0.55x the bf16 step; B = 1, L = 16k: <= 0.6x; a step that writes its token <= 1.05x
one that does not. Prints a markdown table and writes ``fp8_decode.md`` and ``fp8_decode.json`` to ``--out``,
also when stopped early (SIGTERM from ``timeout``, Ctrl-C): the rows measured so far. Exit status 0, or
:data:`BARS_MISSED` when a row missed its bar.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import torch
from triton.testing import do_bench

import tileattn
from tileattn import quant
from tileattn.bench.decode import to_pages
from tileattn.bench.report import environment
from tileattn.testing import capture_graph

HQ, HKV, D = 32, 8, 128
SHAPES = [(1, 4096), (8, 4096), (32, 4096), (1, 16384), (8, 16384), (32, 16384)]
FP8 = torch.float8_e4m3fn
GRANULARITIES = ("tensor", "head", "token")
ROUNDS = 3
SWEEP_SHAPES = [(1, 16384), (8, 16384), (32, 16384)]
# Stages of an fp8 tile hold half the bytes of a bf16 one: the tiles below keep as many bytes in flight per
# program as the bf16 defaults (128 x 3, 64 x 3) with twice the keys or twice the stages, or more warps.
SWEEP_CONFIGS = [(128, 4, 3), (64, 4, 3), (128, 4, 4), (128, 4, 6), (64, 4, 6), (256, 4, 3), (128, 8, 3),
                 (128, 8, 4), (256, 8, 2), (256, 8, 3)]
# Key splits per sequence beside the kernel's own choice (0): an fp8 program keeps half a bf16 one's bytes in flight,
# so small grids may want more programs (B x Hkv = 8 and 64 programs against 132 SMs here).
SWEEP_SPLITS = {1: (0, 32, 64), 8: (0, 4, 8), 32: (0, 2)}
FP8_BAR, FP8_SMALL_BATCH_BAR, WRITE_BAR = 0.55, 0.60, 1.05
BARS_MISSED = 2  # the exit status when every row was measured but some missed their bar


class Stop(BaseException):
    """SIGTERM (``timeout``): write what was measured. Not an Exception, so the sweep's skip of a tile that does not
    fit cannot swallow it."""


def _stop(signum, frame):
    raise Stop()


def interleaved_us(graphs: dict, rounds=ROUNDS) -> dict:
    """Median replay time (us) of each graph, round-robin over ``rounds`` rounds of ``do_bench``."""
    samples = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, graph in graphs.items():
            samples[name].append(1000 * do_bench(graph.replay, warmup=5, rep=25, return_mode="median"))
    return {name: statistics.median(values) for name, values in samples.items()}


def paged_view(cache, page_size, order):
    """``cache [B, H, L, D]`` (any dtype; fp8 through its bytes) as shuffled token-major pages ``[P, H, page, D]``."""
    pages = to_pages(cache.view(torch.uint8) if quant.is_fp8(cache.dtype) else cache, page_size, order)
    return pages.view(cache.dtype)


def shape_caches(b, length, gen):
    """bf16 caches, their fp8 versions per granularity (cache, scale), q and the new token."""
    k, v = (torch.randn(b, HKV, length, D, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2))
    fp8 = {g: (quant.quantize_kv_cache(k, FP8, g), quant.quantize_kv_cache(v, FP8, g)) for g in GRANULARITIES}
    q = torch.randn(b, HQ, 1, D, generator=gen, device="cuda").to(torch.bfloat16)
    k_new, v_new = (torch.randn(b, HKV, 1, D, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(2))
    return k, v, fp8, q, k_new, v_new


def step_fn(q, k_cache, v_cache, lengths, *, table=None, k_scale=None, v_scale=None, k_new=None, v_new=None):
    def step():
        return tileattn.attention_with_kvcache(q, k_cache, v_cache, lengths, block_table=table, k_new=k_new,
                                               v_new=v_new, k_scale=k_scale, v_scale=v_scale, check_bounds=False,
                                               backend="triton")
    return step


def time_contiguous(b, length, caches):
    """bf16 and fp8 steps without and with the write of the new token."""
    k, v, fp8, q, k_new, v_new = caches
    full = torch.full((b,), length, dtype=torch.int32, device="cuda")
    before_last = full - 1
    steps = {"bf16": step_fn(q, k, v, full),
             "bf16 +write": step_fn(q, k, v, before_last, k_new=k_new, v_new=v_new)}
    for g in GRANULARITIES:
        (kq, ks), (vq, vs) = fp8[g]
        steps[f"fp8 {g}"] = step_fn(q, kq, vq, full, k_scale=ks, v_scale=vs)
        if g != "head":
            steps[f"fp8 {g} +write"] = step_fn(q, kq, vq, before_last, k_scale=ks, v_scale=vs, k_new=k_new,
                                               v_new=v_new)
    return interleaved_us({name: capture_graph(step)[0] for name, step in steps.items()})


def time_paged(b, length, caches, page_size, gen):
    k, v, fp8, q, _, _ = caches
    pages = b * length // page_size
    order = torch.randperm(pages, generator=gen).cuda()
    table = order.view(b, length // page_size).to(torch.int32)
    full = torch.full((b,), length, dtype=torch.int32, device="cuda")
    steps = {f"bf16 paged{page_size}": step_fn(q, paged_view(k, page_size, order), paged_view(v, page_size, order),
                                               full, table=table)}
    for g in ("tensor", "token"):
        (kq, ks), (vq, vs) = fp8[g]
        if g == "token":  # [B, Hkv, L] scales paged like the tokens: [P, Hkv, page]
            ks, vs = (paged_view(s[..., None], page_size, order)[..., 0] for s in (ks, vs))
        steps[f"fp8 {g} paged{page_size}"] = step_fn(q, paged_view(kq, page_size, order),
                                                     paged_view(vq, page_size, order), full, table=table,
                                                     k_scale=ks, v_scale=vs)
    return interleaved_us({name: capture_graph(step)[0] for name, step in steps.items()})


def time_sweep(b, length, caches):
    """The fp8 per-token cache at each tile of :data:`SWEEP_CONFIGS` and split count of :data:`SWEEP_SPLITS`, beside
    bf16 and fp8 per-tensor at the default tile."""
    from tileattn.kernels.decode import decode_attention

    k, v, fp8, q, _, _ = caches
    (kq, ks), (vq, vs) = fp8["token"]
    full = torch.full((b,), length, dtype=torch.int32, device="cuda")
    (kt, kts), (vt, vts) = fp8["tensor"]
    steps = {"bf16 default": lambda: decode_attention(q, k, v, full, new_tokens=0, window=(-1, 0), scale=D ** -0.5),
             "fp8 tensor default": lambda: decode_attention(q, kt, vt, full, new_tokens=0, window=(-1, 0),
                                                            scale=D ** -0.5, k_scale=kts, v_scale=vts)}
    for config in SWEEP_CONFIGS:
        for splits in SWEEP_SPLITS.get(b, (0,)):
            name = f"fp8 token {config}" + (f" splits {splits}" if splits else "")
            steps[name] = (lambda config=config, splits=splits: decode_attention(
                q, kq, vq, full, new_tokens=0, window=(-1, 0), scale=D ** -0.5, config=config, num_splits=splits,
                k_scale=ks, v_scale=vs))
    graphs = {}
    for name, step in steps.items():
        try:
            graphs[name] = capture_graph(step)[0]
        except Exception as exc:  # a tile Triton cannot fit (shared memory): skip it
            print(f"    {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})", flush=True)
            torch.cuda.synchronize()
    return interleaved_us(graphs, rounds=2)


def verdicts(b, length, us):
    """``(variant, us, ratio, bar, ok)`` rows: fp8 against bf16 (same layout), writes against no writes."""
    rows = []
    for name, t in us.items():
        if name.startswith("fp8") and "+write" not in name:
            layout = name[name.index(" paged"):] if " paged" in name else ""  # e.g. " paged16"
            base = us["bf16" + layout]
            bar = FP8_SMALL_BATCH_BAR if (b, length) == (1, 16384) else FP8_BAR
            rows.append((name, t, t / base, bar, t / base <= bar))
        elif "+write" in name:
            ratio = t / us[name.replace(" +write", "")]
            rows.append((name, t, ratio, WRITE_BAR, ratio <= WRITE_BAR))
        else:
            rows.append((name, t, None, None, None))
    return rows


def markdown(env, results, sweep):
    lines = [f"# FP8 KV cache decode step, {env.get('device')} (torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']})", "",
             f"Hq = {HQ}, Hkv = {HKV}, D = {D}, bf16 q, e4m3fn caches; CUDA graph replays, CUDA events, L2 flushed, "
             f"median of {ROUNDS} interleaved rounds. Ratio: against the bf16 step of the same layout (fp8 rows) or "
             "the same step without the write (+write rows).", "",
             "| B | L | variant | us | ratio | bar | ok |", "|---:|---:|---|---:|---:|---:|:---:|"]
    for (b, length), rows in results:
        for name, t, ratio, bar, ok in rows:
            verdict = "" if ok is None else "yes" if ok else "**NO**"
            lines.append(f"| {b} | {length} | {name} | {t:.1f} | {'' if ratio is None else f'{ratio:.3f}'} | "
                         f"{'' if bar is None else f'<= {bar}'} | {verdict} |")
    checked = [(b, length, name, ok) for (b, length), rows in results for name, _, _, _, ok in rows if ok is not None]
    missed = [f"B={b} L={length} {name}" for b, length, name, ok in checked if not ok]
    lines += ["", f"Bars met: {len(checked) - len(missed)} of {len(checked)}"
              + (f"; missed: {', '.join(missed)}" if missed else "")]
    if sweep:
        lines += ["", "## Tile sweep (fp8 per-token, contiguous; informational)", "",
                  "| B | L | variant | us | vs bf16 default |", "|---:|---:|---|---:|---:|"]
        for (b, length), us in sweep:
            base = us.get("bf16 default")
            for name, t in us.items():
                lines.append(f"| {b} | {length} | {name} | {t:.1f} | {t / base:.3f} |" if base else
                             f"| {b} | {length} | {name} | {t:.1f} | |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--no-paged", action="store_true")
    sweep_choice = parser.add_mutually_exclusive_group()
    sweep_choice.add_argument("--no-sweep", action="store_true")
    sweep_choice.add_argument("--sweep-only", action="store_true", help="only the tile sweep, no bar rows")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    gen = torch.Generator(device="cuda").manual_seed(0)
    cpu_gen = torch.Generator().manual_seed(0)
    results, sweep, start = [], [], time.perf_counter()
    try:
        for b, length in [] if args.sweep_only else SHAPES:
            caches = shape_caches(b, length, gen)
            us = time_contiguous(b, length, caches)
            if not args.no_paged:
                for page_size in (16, 64):
                    us.update(time_paged(b, length, caches, page_size, cpu_gen))
            results.append(((b, length), verdicts(b, length, us)))
            print(f"B={b} L={length}: " + ", ".join(f"{n} {t:.1f}us" for n, t in us.items())
                  + f"  [{time.perf_counter() - start:.0f} s]", flush=True)
            del caches
            torch.cuda.empty_cache()
        for b, length in [] if args.no_sweep else SWEEP_SHAPES:  # last: the bars come first
            sweep.append(((b, length), time_sweep(b, length, shape_caches(b, length, gen))))
            print(f"sweep B={b} L={length} done [{time.perf_counter() - start:.0f} s]", flush=True)
            torch.cuda.empty_cache()
    except (Stop, KeyboardInterrupt):
        print("stopped early: writing the rows measured so far", flush=True)
    text = markdown(env, results, sweep)
    (out / "fp8_decode.md").write_text(text)
    (out / "fp8_decode.json").write_text(json.dumps(dict(
        environment=env, rows=[dict(batch=b, length=length, variant=n, us=t, ratio=r, bar=bar, ok=ok)
                               for (b, length), rows in results for n, t, r, bar, ok in rows],
        sweep=[dict(batch=b, length=length, variant=n, us=t) for (b, length), us in sweep for n, t in us.items()]),
        indent=1))
    print(text)
    return 0 if all(ok is not False for _, rows in results for *_, ok in rows) else BARS_MISSED


if __name__ == "__main__":
    sys.exit(main())
