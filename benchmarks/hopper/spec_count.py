"""Count (and optionally compile) the Triton specializations that attn_hopper.py's correctness check and its
timings hit, for the Gluon kernels of attn_hopper_pp.py (v2, pp, pp3) and attn_hopper_v4.py (v4, v4_pp3).
No GPU needed.

    PYTHONPATH=. /tmp/v36/bin/python benchmarks/hopper/spec_count.py [--only v4,v4_pp3] [--shapes check|quick|both]
        [--compile [--dump DIR]]

How: each check case's host launcher runs on CPU tensors of the real shapes with the kernel replaced by a recorder
of its launch arguments; the arguments then go through the kernel's own binder (triton.runtime.jit's
create_function_from_signature with the CUDA backend of a GPUTarget("cuda", 90, 32)), which is what a launch uses to
build its cache key: distinct keys = distinct compiles in a run.  --compile: compile each distinct key for sm_90
exactly as the runtime would (same signature, constexprs, alignment attributes, options) and print the compile
seconds with registers / spills / shared memory (compile_check.py's measurements).
"""

import argparse
import os
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import compute_cache_key, create_function_from_signature

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn_hopper as A  # noqa: E402
import attn_hopper_pp as P  # noqa: E402
import attn_hopper_v4 as V4  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


class Recorder:
    """Stands in for a @gluon.jit kernel: kernel[grid](*args, **kwargs) records (grid, args, kwargs)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def variants(num_sms):
    v4 = lambda o: (None, dict(o, extra=dict(o["extra"], num_sms=num_sms)))  # noqa: E731
    return {"v2": (P._attn_fwd_pp_kernel, P.OPTS_V2), "pp": (P._attn_fwd_pp_kernel, P.OPTS_V3),
            "pp3": (P._attn_fwd_pp_kernel, P.OPTS_V3_WG3), "v4": v4(V4.OPTS_V4), "v4_pp3": v4(V4.OPTS_V4_PP3)}


def bench_cases(dims, quick):
    """The shapes of attn_hopper._bench (B x H = 16 heads x 16k tokens / S)."""
    out = []
    for dtype in ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)):
        for D in dims:
            for causal in (False, True):
                for S in ((1024, 8192) if quick else (512, 1024, 2048, 4096, 8192)):
                    BH = max(16, (16 * 16384) // S)
                    out.append((dtype, D, causal, BH // 16, 16, 16, S, S))
    return out


def launches(fn, opts, cases):
    """(case, grid, args, kwargs) of each case's kernel launch, on CPU tensors (never run)."""
    opts = {n: o for n, o in opts.items() if n != "dims"}
    real = V4._attn_fwd_v4_kernel
    rec = Recorder(fn if fn is not None else real)
    try:
        V4._attn_fwd_v4_kernel = rec  # the v4 host launcher looks its kernel up in its module
        for case in cases:
            dtype, D, causal, B, H, Hk, Sq, Sk = case
            q = torch.empty(B, H, Sq, D, dtype=dtype)
            k = torch.empty(B, Hk, Sk, D, dtype=dtype)
            v = torch.empty(B, Hk, Sk, D, dtype=dtype)
            A.attention_hopper(q, k, v, causal=causal, return_lse=True, kernel=rec if fn is not None else None,
                               **opts)
    finally:
        V4._attn_fwd_v4_kernel = real
    assert len(rec.calls) == len(cases)
    return rec.fn, [(c,) + call for c, call in zip(cases, rec.calls)]


def specialize(kernel, backend, binder, args, kwargs):
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or triton.knobs.runtime.debug
    bound_args, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key({}, specialization, options)
    return key, (kwargs, bound_args, specialization, options)


def varying(kernel, specs):
    """Parameter name -> set of its specializations over `specs` (only those that differ)."""
    out = {}
    for i, p in enumerate(kernel.params):
        vals = {repr(s[2][i]) for s in specs}
        if len(vals) > 1:
            out[p.name] = sorted(vals)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="v2,pp3,v4,v4_pp3")
    ap.add_argument("--sms", type=int, default=132)
    ap.add_argument("--compile", action="store_true", help="compile each distinct specialization at sm_90")
    ap.add_argument("--shapes", choices=("check", "quick", "both"), default="check",
                    help="the check's cases, the --quick timing shapes, or both")
    ap.add_argument("--dump", default=None, help="with --compile: write each compile's ttgir / ptx here")
    a = ap.parse_args()
    backend = make_backend(TARGET)
    import compile_check as C
    for name in a.only.split(","):
        fn, opts = variants(a.sms)[name]
        dims = opts.get("dims", (64, 128))
        cases = ((A.check_cases(dims) if a.shapes != "quick" else [])
                 + (bench_cases(dims, quick=True) if a.shapes != "check" else []))
        kernel, calls = launches(fn, opts, cases)
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        keys = {}
        for case, grid, args, kwargs in calls:
            key, spec = specialize(kernel, backend, binder, args, kwargs)
            keys.setdefault(key, (case, spec))
        print(f"{name}: {len(calls)} launches ({a.shapes} shapes) -> {len(keys)} distinct specializations (compiles)",
              flush=True)
        dns = [p.name for p in kernel.params if p.do_not_specialize]
        print(f"  do_not_specialize: {', '.join(dns) or '-'}")
        for pname, vals in varying(kernel, [s for _, s in keys.values()]).items():
            print(f"  varies: {pname}: {' | '.join(vals)}")
        if not a.compile:
            continue
        t_all = time.perf_counter()
        for key, (case, (kwargs, bound_args, specialization, options)) in keys.items():
            options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization,
                                                                      options)
            t0 = time.perf_counter()
            k = triton.compile(GluonASTSource(kernel, signature, constexprs, attrs), target=TARGET,
                               options=options.__dict__)
            dt = time.perf_counter() - t0
            r = C.measure(k)
            dtype, D, causal = case[:3]
            if a.dump:
                os.makedirs(a.dump, exist_ok=True)
                tag = f"{name}_{str(dtype)[6:]}_d{D}_{'causal' if causal else 'full'}_" + "_".join(map(str, case[3:]))
                for ext in ("ttgir", "ptx"):
                    open(os.path.join(a.dump, f"{tag}.{ext}"), "w").write(k.asm[ext])
            print(f"  {str(dtype)[6:]:8s} D={D:3d} causal={causal!s:5s} first case {case[3:]}: compile {dt:5.1f} s | "
                  f"regs {r['regs']} spill {r['spill_st']}/{r['spill_ld']} B smem {r['smem']} "
                  f"setmaxnreg {r['setmaxnreg']} wgmma {r['wgmma']} bar {r['bar_sync']}", flush=True)
        print(f"  {len(keys)} compiles: {time.perf_counter() - t_all:.0f} s", flush=True)


if __name__ == "__main__":
    main()
