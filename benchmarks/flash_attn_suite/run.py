"""Run flash-attn 2's own ``tests/test_flash_attn.py`` against ``tileattn.flash_attn_compat``, forward checks only
(``--grad``: forward and backward checks).

flash-attn's file is not ours and is never committed: it is read from a checkout (``--flash-attn-dir``, by default
the git-ignored ``scratch/flash-attention``), rewritten at run time (see README.md beside this file for exactly
what changes), and run by pytest against a temporary ``flash_attn`` package whose API is tileattn's.

    python benchmarks/flash_attn_suite/run.py --sample 2000 --seed 0 --out OUT -- -n 8   # args after -- go to pytest

``--grad`` keeps the tests' backward parts and gradient checks (no stripping, no ``torch.no_grad()``) and samples
only the test functions that have gradient checks.

Steps: collect every case of the rewritten file (cached per test file), drop the ineligible ones (dropout > 0,
tests of flash-attn's private entry points, cases the test itself skips from its parameters alone), draw a
stratified random sample (every test function represented), run exactly those cases, record each outcome.

Writes under ``--out``:
  cases.json     {"settings": {...}, "collected": {function: n}, "eligible": {function: n},
                  "cases": [{"id": pytest node id, "function": name, "params": {name: value}}]}
                 (a torch dtype is written as {"torch_dtype": "float16"})
  results.jsonl  one line per finished case (written by fa_suite_plugin.py): {"id", "outcome": "passed" | "failed" |
                 "skipped", "reason": first line of the failure or skip message (a bare "assert False" also names its
                 statement), "duration": seconds, "out_diff"/"pt_diff": the max errors the test printed (ours and
                 PyTorch's low-precision reference, both against the fp32 reference), when it printed them;
                 with --grad also "dq_diff", "dk_diff", "dv_diff" and "dq_pt_diff", "dk_pt_diff", "dv_pt_diff"}
  summary.json   {"settings", "collected", "eligible", "per_function": {function: {"sampled", "passed", "failed",
                  "skipped", "not_run"}}, "failures": [{"id", "reason", "out_diff", "pt_diff"}]}
  summary.md     the per-function table, failures grouped by reason, and the failing ids
"""

from __future__ import annotations

import argparse
import ast
import collections
import copy
import gzip
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_FILE = "tests/test_flash_attn.py"
COLLECT_VERSION = 1  # bump when the collection's rewrite or record changes (its cache is keyed on this and the file)
# flash-attn's own helper modules, used by the tests to build their references (copied, not tested).
HELPERS = ["flash_attn/bert_padding.py", "flash_attn/layers/rotary.py", "flash_attn/ops/triton/rotary.py"]
# --device cpu only: text replacements in those helper files (each must occur exactly once).
CPU_HELPER_PATCHES = {"flash_attn/ops/triton/rotary.py": [  # `torch.cuda.device(None)` fails for a CPU tensor
    ("with torch.cuda.device(x.device.index):", "with torch.device(x.device):")]}
# Test functions that call flash-attn's private entry points, which a drop-in for the public API does not have.
EXCLUDED_FUNCTIONS = {
    "test_flash_attn_varlen_paged_kv_num_splits": "calls flash-attn's private _flash_attn_varlen_forward",
    "test_flash_attn_generator_arg_must_be_none": "calls flash-attn's compiled extension (flash_attn_gpu) directly",
}

SHIM_INIT = '''"""flash_attn for flash-attn's tests, written by benchmarks/flash_attn_suite/run.py: tileattn's API."""
from tileattn.flash_attn_compat import *  # noqa: F401,F403
from tileattn.flash_attn_compat import __all__  # noqa: F401
'''
SHIM_INTERFACE = SHIM_INIT + '''
USE_TRITON_ROCM = False  # the test file reads it (a skipif on a test of flash-attn's compiled extension)


def _get_block_size_n(device, head_dim, is_dropout, is_causal):
    """Imported by the test file; used only to decode flash-attn's dropout pattern (S_dmask): dropout is excluded."""
    raise NotImplementedError("dropout cases are out of scope (tileattn is an inference library)")
'''
# ---- the rewrite of flash-attn's test file ---------------------------------------------------------------------

def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _uses_autograd(node) -> bool:
    """``torch.autograd.grad(...)``, ``x.backward(...)`` or ``x.grad`` anywhere in ``node``."""
    return any(isinstance(n, ast.Attribute) and n.attr in ("grad", "backward") for n in ast.walk(node))


def _reads(node, names) -> bool:
    return any(isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) and n.id in names for n in ast.walk(node))


def _assigned(node) -> set:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}


def _strip_backward(body, tainted, removed):
    """``body`` without the statements that use autograd and those that read what they computed (transitively).
    A compound statement whose header does either goes whole; one whose body empties goes too."""
    kept = []
    for stmt in body:
        compound = isinstance(stmt, (ast.If, ast.For, ast.While, ast.With))
        header = ([stmt.test] if isinstance(stmt, (ast.If, ast.While)) else [stmt.iter] if isinstance(stmt, ast.For)
                  else [item.context_expr for item in stmt.items] if compound else [stmt])
        if any(_uses_autograd(h) or _reads(h, tainted) for h in header):
            tainted |= _assigned(stmt)
            removed.append(stmt)
            continue
        if compound:
            stmt.body = _strip_backward(stmt.body, tainted, removed)
            orelse = stmt.orelse = _strip_backward(stmt.orelse, tainted, removed) if hasattr(stmt, "orelse") else []
            if not stmt.body and not orelse:
                removed.append(stmt)
                continue
            stmt.body = stmt.body or [ast.Pass()]
        kept.append(stmt)
    return kept


class _ToCpu(ast.NodeTransformer):
    """``--device cpu``: "cuda" -> "cpu"; the module-level compute-capability probes answer (9, 0) (an H100's, so
    the same cases are collected), and the reference-OOM guards see 80 GiB."""

    def visit_Constant(self, node):
        return ast.Constant("cpu") if node.value == "cuda" else node

    def visit_Call(self, node):
        if _dotted(node.func) == "torch.cuda.get_device_capability":
            return ast.Constant((9, 0))
        return self.generic_visit(node)

    def visit_Attribute(self, node):
        if node.attr == "total_memory" and isinstance(node.value, ast.Call) \
                and _dotted(node.value.func) == "torch.cuda.get_device_properties":
            return ast.Constant(80 * 2**30)
        return self.generic_visit(node)


def _is_skip_guard(stmt) -> bool:
    return (isinstance(stmt, ast.If) and not stmt.orelse and len(stmt.body) == 1 and isinstance(stmt.body[0], ast.Expr)
            and isinstance(stmt.body[0].value, ast.Call) and _dotted(stmt.body[0].value.func) == "pytest.skip")


def rewrite(source: str, device: str, grad: bool = False):
    """-> (module AST, notes {function: {"asserts_kept", "asserts_removed", "removed_lines", "skip_guards"}}).
    ``grad``: the backward parts stay; the notes still say what the forward-only rewrite removes (so its
    "asserts_removed" count a function's gradient checks)."""
    tree = ast.parse(source)
    if device == "cpu":
        tree = _ToCpu().visit(tree)
    notes = {}
    for fn in tree.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("test_")):
            continue
        params = {a.arg for a in fn.args.args}
        asserts = sum(isinstance(n, ast.Assert) for n in ast.walk(fn))
        # `if <parameters only>: pytest.skip()` before any of those names is reassigned: decided at collection time.
        guards, assigned = [], set()
        for stmt in fn.body:
            names = {n.id for n in ast.walk(stmt.test) if isinstance(n, ast.Name)} if _is_skip_guard(stmt) else None
            if names is not None and names <= params | {"True", "False", "None"} and not names & assigned:
                guards.append(ast.unparse(stmt.test))
            assigned |= _assigned(stmt)
        removed = []
        stripped = _strip_backward(copy.deepcopy(fn.body) if grad else fn.body, set(), removed) or [ast.Pass()]
        kept = sum(isinstance(n, ast.Assert) for stmt in stripped for n in ast.walk(stmt))
        if not grad:
            fn.body = stripped
        spans = []  # the removed lines of flash-attn's file, as [first, last] ranges
        for line in sorted({i for s in removed for i in range(s.lineno, s.end_lineno + 1)}):
            if spans and line == spans[-1][1] + 1:
                spans[-1][1] = line
            else:
                spans.append([line, line])
        notes[fn.name] = {"asserts_kept": kept, "asserts_removed": asserts - kept, "skip_guards": guards,
                          "removed_lines": spans}
    return ast.fix_missing_locations(tree), notes


def restrict(tree, cases):
    """The module keeping only ``cases``: each test function's parametrize stack becomes one parametrize listing
    exactly its sampled cases under their original ids (so node ids do not change); others are removed."""
    by_function = collections.defaultdict(list)
    for case in cases:
        by_function[case["function"]].append(case)
    body = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            chosen = by_function.get(node.name)
            if not chosen:
                continue
            argnames = list(chosen[0]["params"])
            node.decorator_list = [d for d in node.decorator_list
                                   if not (isinstance(d, ast.Call) and _dotted(d.func) == "pytest.mark.parametrize")]
            if argnames:
                values = [ast.Tuple([_value_node(c["params"][a]) for a in argnames], ast.Load()) for c in chosen]
                ids = [c["id"].split("[", 1)[1][:-1] for c in chosen]
                node.decorator_list.insert(0, ast.Call(
                    ast.Attribute(ast.Attribute(ast.Name("pytest", ast.Load()), "mark", ast.Load()), "parametrize",
                                  ast.Load()),
                    [ast.Constant(",".join(argnames)), ast.List(values, ast.Load())],
                    [ast.keyword("ids", ast.Constant(ids))]))
        body.append(node)
    tree.body = body
    return ast.fix_missing_locations(tree)


def _value_node(value):
    if isinstance(value, dict):  # {"torch_dtype": "float16"}
        return ast.Attribute(ast.Name("torch", ast.Load()), value["torch_dtype"], ast.Load())
    return ast.Constant(value)


# ---- workspace, collection, sampling ---------------------------------------------------------------------------

def build_workspace(fa_dir: Path, work: Path, device: str) -> Path:
    """``work/shim/flash_attn``: tileattn's API, flash-attn's helper files and the stand-ins the tests import."""
    shim = work / "shim"
    shutil.rmtree(shim, ignore_errors=True)
    for rel in HELPERS:
        (shim / rel).parent.mkdir(parents=True, exist_ok=True)
        text = (fa_dir / rel).read_text()
        for old, new in CPU_HELPER_PATCHES.get(rel, []) if device == "cpu" else []:
            if text.count(old) != 1:
                sys.exit(f"{rel}: expected `{old}` once for --device cpu; flash-attn's file has changed")
            text = text.replace(old, new)
        (shim / rel).write_text(text)
    for package in ("flash_attn/layers", "flash_attn/ops", "flash_attn/ops/triton"):
        (shim / package / "__init__.py").write_text("")
    (shim / "flash_attn/__init__.py").write_text(SHIM_INIT)
    (shim / "flash_attn/flash_attn_interface.py").write_text(SHIM_INTERFACE)
    return shim


def write_tests(directory: Path, tree) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    (directory / "tests").mkdir(parents=True)
    (directory / "pytest.ini").write_text("[pytest]\n")  # rootdir here; none of tileattn's pytest settings
    (directory / TEST_FILE).write_text(ast.unparse(tree) + "\n")


def subprocess_env(shim: Path, fa_dir: Path, work: Path, device: str, grad: bool) -> dict:
    env = dict(os.environ, FA_SUITE_GRAD="1" if grad else "")  # the plugin's torch.no_grad() hook unless grad
    path = [str(shim), str(Path(__file__).parent), str(REPO)]  # the shim first: it shadows a real flash-attn
    if subprocess.run([sys.executable, "-c", "import einops"], capture_output=True).returncode:
        path.append(str(fa_dir / "_vendor"))  # einops, installed there by hand (see README) if the env lacks it
    env["PYTHONPATH"] = os.pathsep.join(path + [p for p in [env.get("PYTHONPATH")] if p])
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # flash-attn's Triton rotary (the kvcache reference) on CPU tensors
        env["TILEATTN_CACHE_DIR"] = str(work / "tileattn-cache")  # no user calibration: the built-in CPU rule
    return env


def collect(work: Path, tree, notes, env, target: Path) -> dict:
    """{function: [[node id, params, static skip guard or None], ...]} of every case in the rewritten file, cached
    in ``target`` (gzipped JSON; the same on either device, as ``--device cpu`` answers the probes as an H100)."""
    if target.exists():
        with gzip.open(target, "rt") as f:
            return json.load(f)
    directory = work / "collect"
    write_tests(directory, tree)
    guards = {name: note["skip_guards"] for name, note in notes.items()}
    env = dict(env, FA_SUITE_COLLECT=str(target), FA_SUITE_GUARDS=json.dumps(guards))
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "fa_suite_plugin", "-p", "no:cacheprovider",
                           "--collect-only", "-qq", TEST_FILE], cwd=directory, env=env, capture_output=True, text=True)
    if proc.returncode:
        target.unlink(missing_ok=True)
        sys.exit(f"collection failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    print(f"collected in {time.time() - started:.0f} s (cached: {target})", flush=True)
    with gzip.open(target, "rt") as f:
        return json.load(f)


def excluded_functions(notes: dict, grad: bool) -> dict:
    """{function: why none of its cases is sampled}: EXCLUDED_FUNCTIONS, and with ``grad`` those with no gradient
    checks."""
    no_grad_checks = {f: "no gradient checks" for f, note in notes.items() if grad and not note["asserts_removed"]}
    return no_grad_checks | EXCLUDED_FUNCTIONS


def eligible(function: str, params: dict, static_skip, excluded: dict) -> bool:
    return function not in excluded and not params.get("dropout_p", 0.0) and static_skip is None


def allocate(counts: dict, n: int) -> dict:
    """Sample sizes per function summing to min(n, total): each gets at least min(count, n / (4 * #functions)),
    the rest in proportion to the cases it has left."""
    floor = max(1, n // (4 * len(counts)))
    take = {f: min(c, floor) for f, c in counts.items()}
    while sum(take.values()) < min(n, sum(counts.values())):
        room = {f: counts[f] - take[f] for f in counts if counts[f] > take[f]}
        left = min(n, sum(counts.values())) - sum(take.values())
        shares = {f: left * r / sum(room.values()) for f, r in room.items()}
        extra = {f: min(room[f], int(s)) for f, s in shares.items()}
        if not sum(extra.values()):  # fewer left than functions with room: largest shares first
            for f in sorted(shares, key=lambda f: -shares[f])[:left]:
                extra[f] = 1
        for f, e in extra.items():
            take[f] += e
    return take


def sample(functions: dict, n: int, seed: int, excluded: dict):
    pools = {f: sorted((c for c in cases if eligible(f, c[1], c[2], excluded)), key=lambda c: c[0])
             for f, cases in functions.items()}
    pools = {f: p for f, p in pools.items() if p}
    sizes = allocate({f: len(p) for f, p in pools.items()}, n)
    rng = random.Random(seed)
    chosen = []
    for f in sorted(pools):
        chosen += [{"id": c[0], "function": f, "params": c[1]} for c in rng.sample(pools[f], sizes[f])]
    return chosen, {f: len(p) for f, p in pools.items()}


# ---- running and reporting -------------------------------------------------------------------------------------

def read_results(path: Path) -> dict:
    results = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a --budget stop: that case runs again
            continue
        results[record["id"]] = record
    return results


def run_cases(work: Path, tree, cases, env, out: Path, pytest_args, budget) -> int:
    directory = work / "run"
    write_tests(directory, restrict(tree, cases))
    env = dict(env, FA_SUITE_RESULTS=str(out / "results.jsonl"))
    log = work / "run.log"
    command = [sys.executable, "-m", "pytest", "-p", "fa_suite_plugin", "-p", "no:cacheprovider", "-q", "--tb=short",
               TEST_FILE, *pytest_args]
    print(f"running {len(cases)} cases: {' '.join(command[1:4])} ... {' '.join(pytest_args)} (log: {log})", flush=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=directory, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            print(f"budget of {budget} s spent: stopped; rerun with --resume to finish", flush=True)
            return -1


def summarize(out: Path, meta: dict, excluded: dict) -> dict:
    results = read_results(out / "results.jsonl")
    per_function = {}
    for case in meta["cases"]:
        row = per_function.setdefault(case["function"], dict(sampled=0, passed=0, failed=0, skipped=0, not_run=0))
        row["sampled"] += 1
        row[results[case["id"]]["outcome"] if case["id"] in results else "not_run"] += 1
    failures = [{k: r.get(k) for k in ("id", "reason", "out_diff", "pt_diff")}
                for r in results.values() if r["outcome"] == "failed"]
    summary = dict(settings=meta["settings"], collected=meta["collected"], eligible=meta["eligible"],
                   per_function=per_function, failures=sorted(failures, key=lambda f: f["id"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")

    s = meta["settings"]
    mode = "forward and backward" if s.get("grad") else "forward only"
    lines = [f"# flash-attn's tests/test_flash_attn.py on tileattn.flash_attn_compat ({mode})", "",
             f"flash-attn {s['flash_attn_commit']}, device {s['device']}, sample {s['sample']} (seed {s['seed']}), "
             f"tileattn {s['tileattn_commit']}, torch {s['torch']}, triton {s['triton']}, {s['gpu']}", "",
             "| test function | collected | eligible | sampled | passed | failed | skipped | not run |",
             "|---|---|---|---|---|---|---|---|"]
    totals = collections.Counter()
    for f in sorted(meta["collected"]):
        row = per_function.get(f, dict(sampled=0, passed=0, failed=0, skipped=0, not_run=0))
        cells = [meta["collected"][f], meta["eligible"].get(f, 0), *row.values()]
        totals.update(dict(zip(range(len(cells)), cells)))
        note = f" ({excluded[f]})" if f in excluded else ""
        lines.append(f"| {f}{note} | " + " | ".join(map(str, cells)) + " |")
    lines.append("| **total** | " + " | ".join(str(totals[i]) for i in range(7)) + " |")
    if failures:
        grouped = collections.Counter(re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", f["reason"])[:160] for f in failures)
        lines += ["", "## Failures by reason (numbers replaced by N)", ""]
        lines += [f"- {count} x `{reason}`" for reason, count in grouped.most_common()]
        lines += ["", "## Failing cases", ""]
        lines += [f"- `{f['id']}`: {f['reason'][:200]}"
                  + (f" (ours {f['out_diff']:.3g}, PyTorch {f['pt_diff']:.3g})" if f.get("out_diff") is not None
                     and f.get("pt_diff") is not None else "") for f in summary["failures"]]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return summary


def versions(device: str) -> dict:
    probe = ("import json, torch, triton; print(json.dumps([torch.__version__, triton.__version__, "
             "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU']))")
    torch_version, triton_version, gpu = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True,
                                                                   text=True, check=True).stdout)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no", "tileattn"],
                           capture_output=True, text=True).stdout.strip()
    return dict(torch=torch_version, triton=triton_version, gpu=gpu if device == "cuda" else "CPU",
                tileattn_commit=head.stdout.strip() + ("+dirty" if dirty else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- (or unknown ones) go to pytest, e.g. -- -n 8")
    parser.add_argument("--flash-attn-dir", type=Path, default=REPO / "scratch/flash-attention")
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("flash-attn-suite-out"))
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--grad", action="store_true",
                        help="keep the backward parts and gradient checks; only test functions that have them")
    parser.add_argument("--resume", action="store_true", help="keep out's sample and results; run the cases left")
    parser.add_argument("--budget", type=float, help="stop pytest after this many seconds (then --resume)")
    args, pytest_args = parser.parse_known_args(argv)
    pytest_args = [a for a in pytest_args if a != "--"]

    fa_dir, args.out = args.flash_attn_dir.resolve(), args.out.resolve()  # pytest runs elsewhere
    source = (fa_dir / TEST_FILE).read_text()
    work = fa_dir / f"_work-{args.device}{'-grad' * args.grad}"  # inside the git-ignored checkout: their code
    work.mkdir(exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    shim = build_workspace(fa_dir, work, args.device)
    env = subprocess_env(shim, fa_dir, work, args.device, args.grad)
    tree, notes = rewrite(source, args.device, args.grad)
    excluded = excluded_functions(notes, args.grad)
    (work / "rewrite-notes.json").write_text(json.dumps(notes, indent=1) + "\n")

    meta_path, results_path = args.out / "cases.json", args.out / "results.jsonl"
    if args.resume and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["settings"]["device"] != args.device:
            sys.exit(f"{meta_path} is a --device {meta['settings']['device']} sample: resume it with that device")
        if meta["settings"].get("grad", False) != args.grad:
            sys.exit(f"{meta_path} is a {'forward-only' if args.grad else '--grad'} sample: resume it "
                     f"{'without' if args.grad else 'with'} --grad")
    else:
        key = hashlib.sha256(f"{COLLECT_VERSION}\n{source}".encode()).hexdigest()[:16]
        functions = collect(work, tree, notes, env, fa_dir / f"_collected-{key}.json.gz")
        cases, eligible_counts = sample(functions, args.sample, args.seed, excluded)
        commit = (fa_dir / "COMMIT").read_text().strip() if (fa_dir / "COMMIT").exists() else "unknown"
        settings = dict(sample=args.sample, seed=args.seed, device=args.device, grad=args.grad,
                        flash_attn_commit=commit, **versions(args.device))
        meta = dict(settings=settings, collected={f: len(c) for f, c in functions.items()},
                    eligible=eligible_counts, cases=cases)
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
        results_path.unlink(missing_ok=True)

    done = read_results(results_path)
    todo = [c for c in meta["cases"] if c["id"] not in done]
    code = run_cases(work, tree, todo, env, args.out, pytest_args, args.budget) if todo else 0
    summary = summarize(args.out, meta, excluded)
    print((args.out / "summary.md").read_text())
    if code not in (0, 1, -1):  # 1: some tests failed (recorded); other codes: pytest itself went wrong
        print(f"pytest exited with {code}; the end of {work / 'run.log'}:\n" + (work / "run.log").read_text()[-3000:])
    not_run = sum(row["not_run"] for row in summary["per_function"].values())
    return 0 if code in (0, 1) and not not_run else 1


if __name__ == "__main__":
    sys.exit(main())
