"""Compile the Gluon Hopper attention kernels for sm_90 without a GPU; print registers, spills, smem.

    /tmp/v36/bin/python benchmarks/hopper/compile_check.py [--ws] [--only-ws] [--pp] [--only-pp] [--dump DIR]

(--pp: versions 2 and 3 of attn_hopper_pp.py, tags v2 / pp / pp3 (3 consumers at D=64).
 --v4 / --only-v4: the persistent version 4 of attn_hopper_v4.py, tags v4 (2 consumers), v4_pp3 (3 consumers +
 ping-pong, D=64 only), v4_ost (D=128 with an O staging buffer + TMA store, 2-stage ring).)

Signatures are built the way the runtime builds them: descriptors made from CPU tensors of the real
shapes are mangled by triton.runtime.jit.mangle_type ("tensordesc<bf16[1, 1, 128, 128],NVMMASharedLayout(...)>"),
then GluonASTSource + triton.compile(target=GPUTarget("cuda", 90, 32)).  Registers / stack come from
cuobjdump -res-usage, spills from ptxas' verbose output (re-run on the PTX), smem from the metadata.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import attn_hopper as A  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def build(fn, args, constexprs, num_warps, maxnreg=None, dump=None, tag=""):
    """args: name -> runtime value (descriptor, tensor, int, float); constexprs: name -> value."""
    signature, consts, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            consts[(i,)] = constexprs[name]
            continue
        val = args[name]
        if isinstance(val, float):
            signature[name] = "fp32"
        elif isinstance(val, int):
            signature[name] = "i32"  # not specialized on divisibility: the real seqlens are arbitrary
        else:
            signature[name] = mangle_type(val)
            if signature[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    opts = dict(num_warps=num_warps)
    if maxnreg is not None:
        opts["maxnreg"] = maxnreg
    k = triton.compile(GluonASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32), options=opts)
    if dump:
        os.makedirs(dump, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            open(os.path.join(dump, f"{fn.__name__}_{tag}.{ext}"), "w").write(k.asm[ext])
    return measure(k)


def measure(k):
    """Registers / stack (cuobjdump), spills (ptxas -v on the PTX), smem, warps, wgmma / bar.sync counts and the
    setmaxnreg limits of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        open(cubin, "wb").write(k.asm["cubin"])
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", cubin], capture_output=True,
                               text=True, check=True).stdout
        ptx = os.path.join(tmp, "k.ptx")
        open(ptx, "w").write(k.asm["ptx"])
        verbose = subprocess.run([os.path.join(BIN, "ptxas"), "-v", "--gpu-name=sm_90a", ptx, "-o",
                                  os.path.join(tmp, "k2.cubin")], capture_output=True, text=True).stderr
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", verbose)
    ptx_text = k.asm["ptx"]
    return dict(regs=int(fields["REG"]), stack=int(fields.get("STACK", 0)),
                spill_st=int(spill.group(1)) if spill else -1, spill_ld=int(spill.group(2)) if spill else -1,
                smem=k.metadata.shared, num_warps=k.metadata.num_warps,
                wgmma=ptx_text.count("wgmma.mma_async"), bar_sync=len(re.findall(r"\bbar\.sync|barrier\.sync", ptx_text)),
                setmaxnreg="/".join(sorted(set(re.findall(r"setmaxnreg\.(?:inc|dec)\.sync\.aligned\.u32\s+(\d+)", ptx_text)),
                                           key=int, reverse=True)) or "-")


def kernel_args(D, dtype, block_n, B=2, H=4, S=1024, qo_rows=A.BLOCK_M):
    q = torch.empty(B, H, S, D, dtype=dtype)
    kv = torch.empty(B, H, S, D, dtype=dtype)
    lse = torch.empty(B, H, S, dtype=torch.float32)
    return dict(q_desc=A.make_desc(q, qo_rows), k_desc=A.make_desc(kv, block_n), v_desc=A.make_desc(kv, block_n),
                o_desc=A.make_desc(q, qo_rows), Lse=lse, stride_lb=H * S, stride_lh=S, seqlen_q=S, seqlen_k=S,
                num_heads=H, group_size=1, qk_scale=0.18)


def v4_kernel_args(D, dtype, block_n, B=2, H=4, S=1024, qo_rows=64, block_m=128):
    q = torch.empty(B, H, S, D, dtype=dtype)
    kv = torch.empty(B, H, S, D, dtype=dtype)
    lse = torch.empty(B, H, S, dtype=torch.float32)
    n_m = -(-S // block_m)
    return dict(q_desc=A.make_desc(q, qo_rows), k_desc=A.make_desc(kv, block_n), v_desc=A.make_desc(kv, block_n),
                o_desc=A.make_desc(q, qo_rows), O=q, stride_ob=H * S * D, stride_oh=S * D, stride_os=D,
                Lse=lse, stride_lb=H * S, stride_lh=S, seqlen_q=S, seqlen_k=S, num_heads=H, group_size=1,
                qk_scale=0.18, n_m=n_m, bh_total=B * H, n_work=n_m * B * H, swizzle=3)


def v4_variants():
    import attn_hopper_v4 as V
    out = []
    for tag, wg64, pp, o_smem, dims in (("v4", 2, False, None, (64, 128)), ("v4_pp3", 3, True, None, (64,)),
                                        ("v4_ost", 2, False, True, (128,))):
        def cfg(d, wg64=wg64, o_smem=o_smem):
            return V.BLOCK_N, V.v4_config(d, wg64, o_smem)[1]

        def extra(d, wg64=wg64, pp=pp, o_smem=o_smem):
            nwg, _, osm = V.v4_config(d, wg64, o_smem)
            return dict(NUM_WG=nwg, PINGPONG=pp, CONSUMER_REGS=V.consumer_regs_for(d, wg64), O_SMEM=osm)
        o = dict(block_m=lambda d, wg64=wg64: V.num_wg_for(d, wg64) * V.WG_M, qo_rows=V.WG_M, extra=extra,
                 dims=dims, args=v4_kernel_args)
        out.append((tag, V._attn_fwd_v4_kernel, cfg, 4, lambda d, wg64=wg64: V.maxnreg_for(d, wg64), o))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ws", action="store_true", help="also the warp-specialized kernel")
    ap.add_argument("--only-ws", action="store_true")
    ap.add_argument("--pp", action="store_true", help="also versions 2 / 3 (attn_hopper_pp.py)")
    ap.add_argument("--only-pp", action="store_true")
    ap.add_argument("--v4", action="store_true", help="also version 4 (attn_hopper_v4.py, persistent)")
    ap.add_argument("--only-v4", action="store_true")
    ap.add_argument("--dump", default=None)
    ap.add_argument("--lse", action="store_true", help="RETURN_LSE=True too")
    a = ap.parse_args()
    variants = []
    if not (a.only_ws or a.only_pp or a.only_v4):
        variants.append(("v1", A._attn_fwd_kernel, A.config_for, A.NUM_WARPS, None, {}))
    if a.ws or a.only_ws:
        import attn_hopper_ws as W
        variants.append(("ws", W._attn_fwd_ws_kernel, W.config_for, W.NUM_WARPS, W.MAXNREG, {}))
    if a.pp or a.only_pp:
        import attn_hopper_pp as P
        for tag, o in (("v2", P.OPTS_V2), ("pp", P.OPTS_V3), ("pp3", P.OPTS_V3_WG3)):
            variants.append((tag, P._attn_fwd_pp_kernel, lambda d: (A.config_for(d)[0], P.stages_for(d)),
                             o["num_warps"], o["maxnreg"], o))
    if a.v4 or a.only_v4:
        variants += v4_variants()
    ok = True
    print(f"{'kernel':6s} {'dtype':5s} {'D':>3s} {'causal':>6s} {'lse':>5s} {'BN':>4s} {'ST':>3s} | "
          f"{'regs':>4s} {'stack':>5s} {'spill st/ld':>11s} {'smem':>7s} {'warps':>5s} {'wgmma':>5s} {'bar':>4s}  setmaxnreg")
    print("(regs: the kernel's allocation = maxnreg when warp-specialized; setmaxnreg: the per-partition limits)")
    per_d = lambda x, d: x(d) if callable(x) else x  # noqa: E731
    for tag, fn, cfg, nw, maxnreg, o in variants:
        for dtype in (torch.float16, torch.bfloat16):
            for D in o.get("dims", (64, 128)):
                for causal in (False, True):
                    for lse in ((False, True) if a.lse else (False,)):
                        block_n, stages = cfg(D)
                        block_m = per_d(o.get("block_m", A.BLOCK_M), D)
                        qo_rows = per_d(o.get("qo_rows", block_m), D)
                        cx = dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, CAUSAL=causal,
                                  RETURN_LSE=lse, **(per_d(o.get("extra"), D) or {}))
                        name = f"{tag}_{str(dtype)[6:]}_d{D}_{'causal' if causal else 'full'}{'_lse' if lse else ''}"
                        try:
                            if "args" in o:
                                kargs = o["args"](D, dtype, block_n, qo_rows=qo_rows, block_m=block_m)
                            else:
                                kargs = kernel_args(D, dtype, block_n, qo_rows=qo_rows)
                            r = build(fn, kargs, cx, per_d(nw, D),
                                      per_d(maxnreg, D), a.dump, name)
                        except Exception as e:  # noqa: BLE001
                            ok = False
                            msg = str(e).strip().splitlines()
                            print(f"{tag:6s} {str(dtype)[6:]:5s} {D:3d} {causal!s:>6s} {lse!s:>5s} FAILED: "
                                  + "\n    ".join(msg[-25:]))
                            continue
                        print(f"{tag:6s} {str(dtype)[6:]:5s} {D:3d} {causal!s:>6s} {lse!s:>5s} {block_n:4d} {stages:3d} | "
                              f"{r['regs']:4d} {r['stack']:5d} {r['spill_st']:5d}/{r['spill_ld']:<5d} {r['smem']:7d} "
                              f"{r['num_warps']:5d} {r['wgmma']:5d} {r['bar_sync']:4d}  {r['setmaxnreg']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
