"""Measured backend crossovers per device: the table ``backend="auto"`` consults, written by ``tileattn tune``.

A calibration file is JSON::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "measured_with": {...versions, date...},
     "entries": [{"dtype": "bfloat16", "causal": false, "head_dim": 128,
                  "segments": [{"up_to": 1536, "ranking": ["sdpa_cudnn", "triton", ...]},
                               {"up_to": null, "ranking": [...]}],
                  "points": [{"seqlen": 1024, "ms": {"triton": 0.41, ...}, "spread": {"triton": 0.03, ...},
                              "noisy": [], "others_cpu": 0.01}, ...]}]}

``segments`` are the crossovers: for key lengths up to ``up_to`` (null = no limit) the backends ordered
fastest first, as measured; dispatch takes the first one that can run a call. ``points`` keep the
timings as evidence and are not read by dispatch: the median ms of each backend, its spread (interquartile
range over the median), the backends whose spread made the point noisy, and the share of the CPU that other
programs used meanwhile (files written before the spread was recorded have ``ms`` only). A head_dim without an entry uses the entry of the
nearest calibrated head_dim above it (else the largest).

Where the table comes from, per device: the user's file (``tileattn tune`` writes it into
``$TILEATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/tileattn``, else ``~/.cache/tileattn``), else the
defaults shipped in ``tileattn/calibrations/`` (our own measurements: H100 80GB HBM3, H200). A missing or corrupt
user file on a device with shipped defaults falls back to them with a :class:`CalibrationWarning`, once
per process; a device with neither uses dispatch's built-in rule.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

FORMAT = 1
SHIPPED_DIR = Path(__file__).parent / "calibrations"
KNOWN_BACKENDS = ("triton", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "torch")  # what tune measures
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CalibrationWarning(UserWarning):
    """A calibration file was missing or unreadable; dispatch fell back to shipped defaults."""


class CalibrationError(ValueError):
    """A calibration file's content is not a valid table (the message says what is wrong)."""


@dataclass(frozen=True)
class Table:
    device: str
    source: str  # the file it came from, for ``explain``
    entries: dict  # (dtype, causal, head_dim) -> tuple of (up_to or None, ranking tuple)

    def lookup(self, dtype: torch.dtype, causal: bool, head_dim: int, seqlen: int):
        """``(ranking, description)`` for a call, or None when this dtype/causal pair is not calibrated."""
        dims = sorted(d for (dt, c, d) in self.entries if dt == dtype and c == causal)
        if not dims:
            return None
        calibrated = next((d for d in dims if d >= head_dim), dims[-1])
        for up_to, ranking in self.entries[dtype, causal, calibrated]:
            if up_to is None or seqlen <= up_to:
                limit = "any length" if up_to is None else f"Sk <= {up_to}"
                name = str(dtype).removeprefix("torch.")
                return ranking, f"{name}, {'causal' if causal else 'non-causal'}, head_dim {calibrated}, {limit}"
        raise AssertionError("validated tables end with an unbounded segment")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def user_dir() -> Path:
    if os.environ.get("TILEATTN_CACHE_DIR"):
        return Path(os.environ["TILEATTN_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tileattn"


def user_path(name: str) -> Path:
    return user_dir() / f"dispatch-{slug(name)}.json"


def shipped_path(name: str) -> Path:
    return SHIPPED_DIR / f"{slug(name)}.json"


def parse(data, source: str) -> Table:
    """Validate a decoded calibration file; raises :class:`CalibrationError` saying what is wrong."""
    def fail(msg):
        raise CalibrationError(f"{source}: {msg}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        fail(f"expected a JSON object with \"format\": {FORMAT}")
    if not isinstance(data.get("device"), str) or not isinstance(data.get("entries"), list):
        fail("expected \"device\" (a string) and \"entries\" (a list)")
    entries = {}
    for i, entry in enumerate(data["entries"]):
        if not isinstance(entry, dict):
            fail(f"entry {i} is not an object")
        dtype, causal, head_dim = entry.get("dtype"), entry.get("causal"), entry.get("head_dim")
        if dtype not in DTYPES or not isinstance(causal, bool) or not isinstance(head_dim, int) or head_dim < 1:
            fail(f"entry {i} needs dtype in {sorted(DTYPES)}, causal a bool and head_dim an int >= 1")
        segments, last = [], 0
        for seg in entry.get("segments") or fail(f"entry {i} has no segments"):
            up_to, ranking = (seg.get("up_to"), seg.get("ranking")) if isinstance(seg, dict) else (None, None)
            if not isinstance(ranking, list) or not ranking or any(b not in KNOWN_BACKENDS for b in ranking):
                fail(f"entry {i}: each segment needs a non-empty ranking of {KNOWN_BACKENDS}")
            if segments and segments[-1][0] is None:
                fail(f"entry {i}: a segment follows the unbounded one")
            if up_to is not None and (not isinstance(up_to, int) or up_to <= last):
                fail(f"entry {i}: segment limits must be increasing ints (or null for the last)")
            segments.append((up_to, tuple(ranking)))
            last = up_to if up_to is not None else last
        if segments[-1][0] is not None:
            fail(f"entry {i}: the last segment must have \"up_to\": null")
        entries[DTYPES[dtype], causal, head_dim] = tuple(segments)
    return Table(device=data["device"], source=source, entries=entries)


_tables: dict[str, Table | None] = {}


def table_for(device: torch.device) -> Table | None:
    """The calibration table for ``device`` (cached per process), or None when there is none."""
    name = device_name(device)
    if name not in _tables:
        _tables[name] = _load(name)
    return _tables[name]


def reset() -> None:
    """Forget loaded tables (after ``tileattn tune`` writes a new one, and in tests)."""
    _tables.clear()


def _load(name: str) -> Table | None:
    shipped = shipped_path(name)
    path = user_path(name)
    problem = None
    if path.exists():
        try:
            return parse(json.loads(path.read_text()), str(path))
        except (OSError, ValueError) as exc:  # JSONDecodeError and CalibrationError are ValueErrors
            problem = f"the calibration file is unreadable ({exc})"
    elif shipped.exists():
        problem = f"no calibration file at {path}"
    if problem:
        fallback = "the defaults shipped for this device" if shipped.exists() else "the built-in rule"
        warnings.warn(f"tileattn: {problem}; using {fallback}. Run `tileattn tune` to measure this device.",
                      CalibrationWarning, stacklevel=7)  # the caller of tileattn.attention / explain
    if shipped.exists():
        return parse(json.loads(shipped.read_text()), f"shipped defaults ({shipped.name})")
    return None


def segments_from_points(points: list[dict]) -> list[dict]:
    """Crossovers from timings: ``points`` sorted by seqlen, each ``{"seqlen", "ms": {backend: ms}}``.

    Each point's ranking is its backends by time; neighbouring points with the same ranking merge, and a
    change of ranking between lengths a and b puts the boundary at their geometric mean.
    """
    segments = []
    for i, point in enumerate(points):
        ranking = sorted(point["ms"], key=point["ms"].get)
        if not segments or segments[-1]["ranking"] != ranking:
            segments.append({"up_to": None, "ranking": ranking})
        last = i + 1 == len(points)
        segments[-1]["up_to"] = None if last else int((point["seqlen"] * points[i + 1]["seqlen"]) ** 0.5)
    return segments
