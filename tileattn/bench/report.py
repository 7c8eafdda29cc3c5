"""Where benchmark results go, and how they are timed.

- :func:`interleaved_timings` times several implementations round-robin, so that whatever else the machine
  does during a run lands on all of them alike, and returns each one's :class:`Timing` (median and spread);
  a timing whose spread is large is *noisy*, and :func:`flag_notes` tells the reader how to rerun (also when
  other programs used much of the CPU meanwhile: :class:`CpuUsage`).
- :func:`speedup_limit` is the largest whole-model speedup a change of attention can explain at a given size;
  a ratio beyond it is flagged as implausible rather than printed as a result.
- :func:`write_results` writes a suite's JSON rows and markdown, with the environment they were measured in.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import platform
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

NOISE_LIMIT = 0.2  # a timing whose interquartile range exceeds this fraction of its median is flagged noisy
BUSY_LIMIT = 0.25  # other programs using more than this share of all cores during a timing make the machine busy
# How much slower per FLOP than the model's matrix products the slower attention may run: eager attention
# (scores written to memory, a separate softmax) measured ~11x on the H100 (LLaMA-7B, 2048-4096 tokens) and
# ~3x on CPU; the margin keeps real results unflagged while a 27x "speedup" of a tiny model is caught.
ATTENTION_SLOWDOWN_LIMIT = 25


@dataclass(frozen=True)
class Timing:
    """Repeated timings of one implementation, ``samples`` in the unit measured (ms unless a suite says);
    ``others_cpu``: the share of the machine's CPU time other programs used meanwhile (None where unknown)."""

    samples: tuple[float, ...]
    others_cpu: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def quartiles(self) -> tuple[float, float]:
        """(first, third) quartile; both the sample itself when there is one."""
        if len(self.samples) < 2:
            return self.samples[0], self.samples[0]
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q1, q3

    @property
    def spread(self) -> float:
        """The interquartile range as a fraction of the median (robust to one outlier among the repeats)."""
        q1, q3 = self.quartiles
        return (q3 - q1) / self.median if self.median else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISE_LIMIT

    def scaled(self, factor: float) -> Timing:
        """The same timings in another unit (e.g. ``factor=1e3`` for ms to us)."""
        return Timing(tuple(s * factor for s in self.samples), self.others_cpu)

    def fields(self, key: str) -> dict:
        """JSON row fields: ``key`` (the median), ``key_q1``, ``key_q3``, ``key_min``, ``key_max``,
        ``key_samples``, ``noisy`` and ``others_cpu``."""
        q1, q3 = self.quartiles
        return {key: self.median, f"{key}_q1": q1, f"{key}_q3": q3, f"{key}_min": min(self.samples),
                f"{key}_max": max(self.samples), f"{key}_samples": list(self.samples), "noisy": self.noisy,
                "others_cpu": self.others_cpu}


def wall_ms(fn) -> float:
    """Milliseconds of one ``fn()`` call, waiting for the GPU's queued work before and after (if CUDA is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - start) * 1e3


def interleaved_timings(candidates: dict, repeats: int, *, time_one=wall_ms, before=None,
                        warmup: int = 1) -> dict[str, Timing]:
    """Time each of ``candidates`` (name -> callable) ``repeats`` times, round-robin.

    Every candidate is first called ``warmup`` times untimed. Repeat ``r`` then runs every candidate once, in
    an order rotated by ``r`` (no candidate always runs right after the same other one), so that a busy
    machine slows them alike instead of one of them. ``before(name)``, if given, runs untimed before each
    call (e.g. switching a model's attention); ``time_one(fn)`` returns one sample (default: wall-clock ms
    of one call; GPU suites pass a CUDA-event timer such as ``triton.testing.do_bench``).
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            if before:
                before(name)
            candidates[name]()
    samples = {name: [] for name in names}
    usage = CpuUsage()
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            if before:
                before(name)
            samples[name].append(time_one(candidates[name]))
    others = usage.others_share()
    return {name: Timing(tuple(values), others) for name, values in samples.items()}


class CpuUsage:
    """From its creation on: how much of the machine's CPU time programs other than this one used (Linux's
    ``/proc/stat`` against this process's own ``os.times``); a busy machine slows every timing."""

    def __init__(self):
        self.start = self._now()

    @staticmethod
    def _now():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        except (OSError, ValueError):
            return None
        own = os.times()
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
        return busy, own.user + own.system, time.perf_counter()

    def others_share(self) -> float | None:
        """Other programs' CPU seconds over the cores' seconds since creation; None where unknown."""
        end = self._now()
        if self.start is None or end is None or end[2] <= self.start[2]:
            return None
        others = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return max(0.0, others) / ((end[2] - self.start[2]) * (os.cpu_count() or 1))


def speedup_limit(attention_flops: float, other_flops: float) -> float:
    """The largest whole-model speedup (or slowdown) that changing only the attention can explain.

    Amdahl's law: the faster model still does everything but attention, so the ratio of two runs is at
    most ``1 + (slower attention's time) / (the rest's time)``, and the slower attention is assumed to take
    at most :data:`ATTENTION_SLOWDOWN_LIMIT` times the rest's time per FLOP.
    """
    return 1 + ATTENTION_SLOWDOWN_LIMIT * attention_flops / other_flops


def implausible(ratio: float | None, limit: float) -> bool:
    return ratio is not None and ratio > 0 and max(ratio, 1 / ratio) > limit


def timing_cell(median: float | None, low: float | None = None, high: float | None = None,
                noisy: bool = False) -> str:
    """A table cell: ``median [low-high]`` (the interquartile range), marked ``(noisy)`` when flagged."""
    if median is None:
        return "-"
    text = _number(median) + ("" if low is None else f" [{_number(low)}-{_number(high)}]")
    return text + (" (noisy)" if noisy else "")


def rate_cell(work: float, row: dict, key: str = "ms") -> str:
    """A cell for ``work / time`` (TFLOP/s, images/s...) from a row's timing fields: the rate at the median
    time, bracketed by the rates at the third and first quartiles."""
    if row.get(key) is None:
        return "-"
    return timing_cell(work / row[key], work / row[f"{key}_q3"], work / row[f"{key}_q1"], row.get("noisy", False))


def flag_notes(rows: list[dict], rerun: str, repeats: int) -> str:
    """The paragraph under a table: how timings were taken, and what to do about flagged rows."""
    parts = [f"Timings: median of {repeats} repeats with the implementations interleaved round-robin in each "
             "repeat; [brackets]: the interquartile range."]
    others = max((r.get("others_cpu") or 0 for r in rows), default=0)
    if others > BUSY_LIMIT:
        parts.append(f"**The machine was busy**: other programs used up to {others:.0%} of its CPU time while "
                     "these were timed, so every time here is slower than on an idle machine (the implementations "
                     f"were interleaved, so their ratios suffer less). Rerun `{rerun}` when it is idle.")
    noisy = sum(bool(r.get("noisy")) for r in rows)
    if noisy:
        parts.append(f"**The machine was noisy**: {noisy} timing(s) marked (noisy) varied by more than "
                     f"{NOISE_LIMIT:.0%} of their median between repeats (another program running, frequency "
                     f"changes), so their medians and the ratios built on them are not reliable. Close other "
                     f"programs and rerun `{rerun}`.")
    if any(r.get("implausible") for r in rows):
        parts.append("**Implausible speedup**: a ratio marked (implausible) is larger than changing attention "
                     "alone can cause at that size (attention's share of the model's FLOPs bounds it), so "
                     f"something else slowed one implementation down. Rerun `{rerun}` on an idle machine.")
    return "\n\n".join(parts) + "\n"


def environment() -> dict:
    """Versions and the device: the facts every result must carry."""
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:  # report, never fail, in an info dump
        env["triton"] = f"unavailable ({type(exc).__name__})"
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except Exception:
        env["transformers"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["sms"] = props.multi_processor_count
        env["memory_gib"] = round(props.total_memory / 2**30, 1)
        env["capability"] = f"{props.major}.{props.minor}"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def device_slug(env: dict) -> str:
    return "".join(c if c.isalnum() else "-" for c in env["device"].split("(")[0].strip()).strip("-").lower()


class Interruptible:
    """Around a suite's measuring loop: Ctrl-C ends the loop instead of the program, and ``interrupted``
    records it, so that the suite still writes what it measured, marked as partial."""

    interrupted = False

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        self.interrupted = kind is KeyboardInterrupt
        return self.interrupted


def write_results(out_dir, suite: str, env: dict, rows: list[dict], markdown: str,
                  interrupted: bool = False) -> tuple[Path, Path]:
    """Write ``<suite>-<device>-<date>.json`` and ``.md`` into ``out_dir``; returns both paths. Results of a
    run stopped by Ctrl-C carry ``"interrupted": true`` and say so at the top of the markdown."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}-{device_slug(env)}-{env['date']}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    record = {"suite": suite, "environment": env, "interrupted": interrupted, "rows": rows}
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    header = f"# tileattn bench {suite}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
    if interrupted:
        header += "**Interrupted (Ctrl-C): partial results.**\n\n"
        markdown = markdown if rows else "Nothing was measured before the interruption.\n"
    md_path.write_text(header + markdown)
    return json_path, md_path


def _number(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return _number(x)
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


class Progress:
    """A one-line progress bar on a terminal (a line per step otherwise, e.g. in CI logs).

    ``step(message)`` advances by one and shows the message; ``note(message)`` prints a line above the bar.
    """

    def __init__(self, total: int, label: str, stream=None):
        self.total, self.label, self.done = max(total, 1), label, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()

    def step(self, message: str = "") -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.start
        if self.tty:
            filled = int(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            end = "\n" if self.done >= self.total else ""
            self.stream.write(f"\r\033[K{self.label} [{bar}] {self.done}/{self.total} {elapsed:4.0f}s {message}{end}")
        else:
            self.stream.write(f"{self.label} {self.done}/{self.total} ({elapsed:.0f}s) {message}\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        self.stream.write(("\r\033[K" if self.tty else "") + message + "\n")
        self.stream.flush()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


class ResidentPeak:
    """The growth of this process's resident memory over a block, at its peak (Linux; ``mib`` after exit).

    The high-water mark (``VmHWM``) is reset to the current resident size on entry (``/proc/self/clear_refs``;
    where that is refused, the mark since the process started is read, an upper bound). Not ``ru_maxrss``: a
    spawned process inherits its parent's through exec. Use it in a fresh process (:func:`in_fresh_process`):
    in one that ran other work, memory freed but kept by the allocator hides part of the peak.
    """

    mib = None

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.base = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mib = max(0, _status_kib("VmHWM") - self.base) / 1024


def _call_and_send(fn, args, conn):
    conn.send(fn(*args))
    conn.close()


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new (spawned) process, so that its resident memory (:class:`ResidentPeak`) measures
    that run alone. ``fn`` must be a module-level function and return something picklable.

    The child ignores Ctrl-C (it would print its own KeyboardInterrupt traceback); the parent gets it,
    stops the child and raises KeyboardInterrupt.
    """
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_and_send, args=(fn, args, child))
    # An ignored SIGINT survives exec, and Python then installs no KeyboardInterrupt handler in the child.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        proc.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    child.close()  # so that recv() sees end-of-file if the child dies
    try:
        return parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the measuring process for {fn.__name__}{args} died (exit code {proc.exitcode})") from None
    except KeyboardInterrupt:
        proc.terminate()
        raise
    finally:
        proc.join()
