"""Where benchmark results go: the environment they were measured in, JSON rows, a markdown table."""

from __future__ import annotations

import datetime
import json
import multiprocessing
import platform
import sys
import time
from pathlib import Path

import torch


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


def write_results(out_dir, suite: str, env: dict, rows: list[dict], markdown: str) -> tuple[Path, Path]:
    """Write ``<suite>-<device>-<date>.json`` and ``.md`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}-{device_slug(env)}-{env['date']}"
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps({"suite": suite, "environment": env, "rows": rows}, indent=1) + "\n")
    header = f"# tileattn bench {suite}\n\n" + ", ".join(f"{k}: {v}" for k, v in env.items()) + "\n\n"
    md_path.write_text(header + markdown)
    return json_path, md_path


def markdown_table(headers: list[str], rows: list[list]) -> str:
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
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


def _call_and_send(fn, args, conn):
    conn.send(fn(*args))
    conn.close()


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new (spawned) process, so that its resident-memory high-water mark (``ru_maxrss``)
    measures that run alone. ``fn`` must be a module-level function and return something picklable."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_and_send, args=(fn, args, child))
    proc.start()
    child.close()  # so that recv() sees end-of-file if the child dies
    try:
        return parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the measuring process for {fn.__name__}{args} died (exit code {proc.exitcode})") from None
    finally:
        proc.join()
