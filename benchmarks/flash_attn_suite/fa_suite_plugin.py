"""pytest plugin for run.py (loaded with ``-p fa_suite_plugin``), driven by environment variables.

Unless ``FA_SUITE_GRAD`` is set (run.py --grad): each test runs under ``torch.no_grad()`` (run.py strips the
    tests' backward parts, so no graph is needed).
``FA_SUITE_COLLECT=path`` (with ``FA_SUITE_GUARDS``, JSON ``{function: [python expression]}``): after collection,
    write gzipped JSON ``{function: [[node id, params, the guard that skips it or None], ...]}``, a torch dtype
    param written as ``{"torch_dtype": "float16"}``.
``FA_SUITE_RESULTS=path``: append one JSON line per finished test (see run.py's docstring), on the xdist controller.
"""

import gzip
import json
import os
import re

import pytest
import torch


@pytest.hookimpl(hookwrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    with torch.set_grad_enabled(bool(os.environ.get("FA_SUITE_GRAD"))):
        yield


def pytest_collection_finish(session):
    path = os.environ.get("FA_SUITE_COLLECT")
    if not path:
        return
    guards = json.loads(os.environ.get("FA_SUITE_GUARDS", "{}"))
    functions = {}
    for item in session.items:
        params = dict(item.callspec.params) if hasattr(item, "callspec") else {}
        skip = next((g for g in guards.get(item.originalname, []) if eval(g, {}, dict(params))), None)
        encoded = {k: {"torch_dtype": str(v).removeprefix("torch.")} if isinstance(v, torch.dtype) else v
                   for k, v in params.items()}
        functions.setdefault(item.originalname, []).append([item.nodeid, encoded, skip])
    with gzip.open(path, "wt") as f:
        json.dump(functions, f)


def _first_line(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):  # (path, line, reason)
        text = report.longrepr[2]
    else:
        crash = getattr(report.longrepr, "reprcrash", None)
        text = crash.message if crash is not None else str(report.longrepr)
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    entries = getattr(getattr(report.longrepr, "reprtraceback", None), "reprentries", None)
    if first.startswith("assert") and entries:  # "assert False": name the statement that failed
        source = [line.lstrip("> ").strip() for line in getattr(entries[-1], "lines", [])
                  if line.strip() and not line.startswith("E ")]
        first += f" (at `{source[-1]}`)" if source else ""
    return first


_phases = {}
# results.jsonl key -> the line the test prints, "<label> max diff: <value>" (the d* ones only with run.py --grad)
DIFFS = {"out_diff": "Output", "pt_diff": "Pytorch", "dq_diff": "dQ", "dk_diff": "dK", "dv_diff": "dV",
         "dq_pt_diff": "dQ Pytorch", "dk_pt_diff": "dK Pytorch", "dv_pt_diff": "dV Pytorch"}


def pytest_runtest_logreport(report):
    path = os.environ.get("FA_SUITE_RESULTS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # record once: on the controller (or without xdist)
        return
    _phases.setdefault(report.nodeid, []).append(report)
    if report.when != "teardown":
        return
    reports = _phases.pop(report.nodeid)
    failed = [r for r in reports if r.failed]
    skipped = [r for r in reports if r.skipped]
    record = {"id": report.nodeid, "duration": round(sum(r.duration for r in reports), 3)}
    if failed:
        where = "" if failed[0].when == "call" else f"[{failed[0].when}] "
        record.update(outcome="failed", reason=where + _first_line(failed[0]))
    elif skipped:
        record.update(outcome="skipped", reason=_first_line(skipped[0]))
    else:
        record.update(outcome="passed", reason="")
    printed = "".join(r.capstdout for r in reports)
    for key, label in DIFFS.items():
        found = re.search(rf"^{label} max diff: (\S+)", printed, re.MULTILINE)
        if found:
            record[key] = float(found.group(1))
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
