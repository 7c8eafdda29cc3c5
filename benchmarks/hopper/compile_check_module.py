"""Compile tileattn/kernels/hopper.py's kernel for sm_90 without a GPU; print registers, spills, shared memory.

    PYTHONPATH=. /tmp/v36/bin/python benchmarks/hopper/compile_check_module.py [--dump DIR]

Every configuration the library can launch: fp16 / bf16 x the head dims of hopper.CONFIGS x causal or not x lse or
not. The kernel arguments are built the way a HopperPlan builds them (its descriptors' shapes, strides, blocks and
layouts, on CPU tensors), compiled through compile_check.build (GluonASTSource + triton.compile for
GPUTarget("cuda", 90, 32); registers from cuobjdump, spills from ptxas -v). Exit status 1 if a configuration fails to
compile or spills.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_check import build  # noqa: E402

from tileattn.kernels import hopper  # noqa: E402

B, H, S = 2, 4, 2048  # any shape the plan accepts: sizes are not specialized


def kernel_arguments(plan, tensors, lse):
    """The kernel's runtime arguments by name, as HopperPlan._launch passes them on a first launch."""
    descriptors = [hopper.TensorDescriptor(t, shape, strides, block, layout)
                   for t, (shape, strides, block), layout in zip(tensors, plan.operands, plan.layouts)]
    names = hopper._hopper_attention_kernel.arg_names
    return dict(zip(names, (*descriptors, lse, *plan.args)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dump", default=None, help="write each configuration's TTGIR and PTX here")
    a = ap.parse_args()
    if hopper.GLUON_MISSING:
        sys.exit(f"no usable Gluon in this Triton: {hopper.GLUON_MISSING}")
    ok = True
    print(f"{'dtype':8s} {'D':>3s} {'causal':>6s} {'lse':>5s} {'config':>24s} | {'regs':>4s} {'stack':>5s} "
          f"{'spill st/ld':>11s} {'smem':>7s} {'wgmma':>5s} {'bar':>4s}  setmaxnreg  compile s")
    for dtype in (torch.float16, torch.bfloat16):
        for d, config in sorted(hopper.CONFIGS.items()):
            for causal in (False, True):
                for return_lse in (False, True):
                    q = torch.empty(B, H, S, d, dtype=dtype)
                    lse = torch.empty(B, H, S, dtype=torch.float32)
                    plan = hopper.HopperPlan(q, q, q, q, causal=causal, scale=d**-0.5, return_lse=return_lse,
                                             portable=None)
                    tag = f"{str(dtype)[6:]}_d{d}_{'causal' if causal else 'full'}{'_lse' if return_lse else ''}"
                    label = (f"{str(dtype)[6:]:8s} {d:3d} {causal!s:>6s} {return_lse!s:>5s} "
                             f"{config.consumers}wg pp={config.pingpong!s:5s} st={config.stages} r={config.maxnreg}")
                    start = time.perf_counter()
                    try:
                        r = build(hopper._hopper_attention_kernel, kernel_arguments(plan, (q, q, q, q), lse),
                                  plan.constexprs, hopper.NUM_WARPS, config.maxnreg, a.dump, tag)
                    except Exception as e:  # noqa: BLE001  (report every configuration)
                        ok = False
                        print(f"{label} FAILED:\n    " + "\n    ".join(str(e).strip().splitlines()[-25:]))
                        continue
                    ok = ok and r["spill_st"] == 0 and r["spill_ld"] == 0
                    print(f"{label} | {r['regs']:4d} {r['stack']:5d} {r['spill_st']:5d}/{r['spill_ld']:<5d} "
                          f"{r['smem']:7d} {r['wgmma']:5d} {r['bar_sync']:4d}  {r['setmaxnreg']:10s} "
                          f"{time.perf_counter() - start:6.1f}", flush=True)
    print("(regs: the kernel's allocation = maxnreg (warp-specialized); setmaxnreg: the per-partition limits; "
          "smem in bytes)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
