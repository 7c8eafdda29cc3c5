"""Registers, stack and shared memory of a tileattn Triton kernel built for sm_90, without a GPU.

Builds with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (the Triton wheel carries ptxas) and reads the
cubin with ``cuobjdump -res-usage``: a kernel change that costs registers shows here before it costs GPU time.
Example (the causal prefill kernel, head_dim 64, the H100 config)::

    PYTHONPATH=. python benchmarks/registers.py prefill --head-dim 64 --causal
"""

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def build(fn, pointer_types, constexprs, num_warps, num_stages, floats=("sm_scale", "softcap")):
    """Compile ``fn`` for sm_90: pointers of ``pointer_types`` (name -> Triton type), 16-aligned; strides of the
    head dim (``stride_*d``) equal to 1, other ints divisible by 16, as a contiguous call specializes them."""
    signature, fixed, attrs = {}, {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs or (name.startswith("stride_") and name.endswith("d")):
            signature[name] = "constexpr"
            fixed[(index,)] = constexprs.get(name, 1)
        elif name in pointer_types:
            signature[name] = "*" + pointer_types[name]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, fixed, attrs), target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([tool, "-res-usage", cubin.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return dict(registers=int(fields["REG"]), stack=int(fields["STACK"]), shared=kernel.metadata.shared)


def head_dim_constexprs(head_dim, head_dim_v):
    """The head-dim constexprs a call of these head dims gets (``kernels.common``'s tiling)."""
    from tileattn.kernels.common import qk_head_dim_tiling, v_head_dim_tiling

    (block_d, qk_chunks), (block_dv, _) = qk_head_dim_tiling(head_dim), v_head_dim_tiling(head_dim_v)
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, QK_CHUNKS=qk_chunks, HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv)


def prefill(head_dim, causal, dtype, alibi=False, sinks=False, head_dim_v=None):
    from tileattn.kernels import prefill as module

    dims = head_dim_constexprs(head_dim, head_dim_v or head_dim)
    if dims["QK_CHUNKS"] > 1:
        block_m, block_n, num_warps, num_stages = module._CHUNKED_CONFIG
    else:
        block_m, block_n, num_warps, num_stages = module._CONFIGS[max(dims["BLOCK_D"], dims["BLOCK_DV"])]
    types = dict(Q=dtype, K=dtype, V=dtype, Out=dtype, Lse="fp32", Mask="i8", CuSeqlensQ="i32", CuSeqlensK="i32",
                 Alibi="fp32", Sinks="fp32")
    constexprs = dict(**dims, BLOCK_M=block_m, BLOCK_N=block_n, HAS_LEFT=False,
                      HAS_RIGHT=causal, MASK_KIND=0, MASK_PER_KEY=False, HAS_SOFTCAP=False, RETURN_LSE=False,
                      IS_VARLEN=False, INT64_INDEX=False, DOT_PRECISION="tf32", HAS_ALIBI=alibi, HAS_SINKS=sinks)
    return build(module._prefill_kernel, types, constexprs, num_warps, num_stages)


def decode(head_dim, causal, dtype, batch=1, kv_heads=8, group=4, split=True, alibi=False, sinks=False,
           head_dim_v=None, kv_dtype=None, scale_mode=0, append=False, paged=0):
    """The split-KV decode kernel for one query token per sequence, its H100 tile for this grid (before
    ``fit_config``'s shared-memory fitting). ``kv_dtype``: the caches' Triton type (default ``dtype``; ``"fp8e4nv"``
    or ``"fp8e5"`` for fp8 caches, with ``scale_mode`` one of ``common.SCALE_*``'s values for both); ``append``:
    with the fused write of new tokens; ``paged``: ``common.PAGED_*``'s value."""
    from tileattn.kernels import decode as module
    from tileattn.kernels.common import token_scale_headroom

    import torch

    block_m = min(64, max(16, 1 << (group - 1).bit_length()))
    block_n, num_warps, num_stages = module.choose_config(batch, kv_heads, 1, 132)
    kv_dtype = kv_dtype or dtype
    fp8 = {"fp8e4nv": torch.float8_e4m3fn, "fp8e5": torch.float8_e5m2}.get(kv_dtype)
    types = dict(Q=dtype, K=kv_dtype, V=kv_dtype, Out=dtype, Lse="fp32", Workspace="fp32", SplitsDone="i32",
                 BlockTable="i32", CacheSeqlens="i32", Mask="i8", KNew=dtype, VNew=dtype, Alibi="fp32", Sinks="fp32",
                 KScale="fp32", VScale="fp32")
    largest = float(torch.finfo(fp8).max) if fp8 else 0.0
    constexprs = dict(**head_dim_constexprs(head_dim, head_dim_v or head_dim), BLOCK_M=block_m, BLOCK_N=block_n,
                      HAS_LEFT=False, HAS_RIGHT=causal, MASK_KIND=0, MASK_PER_KEY=False, HAS_SOFTCAP=False,
                      PAGED=paged, HAS_SEQLENS=True, APPEND=append, SPLIT=split, RETURN_LSE=False, INT64_INDEX=False,
                      DOT_PRECISION="tf32", HAS_ALIBI=alibi, HAS_SINKS=sinks, K_SCALE=scale_mode, V_SCALE=scale_mode,
                      K_FP8_MAX=largest, V_FP8_MAX=largest,
                      V_TOKEN_HEADROOM=token_scale_headroom(fp8) if fp8 and scale_mode == 2 else 1.0)
    return build(module._decode_kernel, types, constexprs, num_warps, num_stages)


def backward(head_dim, causal, dtype, tiles=None):
    """The two backward kernels (dK/dV, dQ) with their H100 tiles, or ``tiles`` = (dK/dV tile, dQ tile)."""
    from tileattn.kernels import backward as module

    types = dict(Q=dtype, K=dtype, V=dtype, DOut=dtype, Lse="fp32", Delta="fp32", DQ=dtype, DK=dtype, DV=dtype,
                 Mask="i8")
    usage = {}
    for name, fn, tile in zip(("dkdv", "dq"), (module._dkdv_kernel, module._dq_kernel),
                              tiles or module._CONFIGS[head_dim]):
        block_m, block_n, num_warps, num_stages = tile
        constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, HAS_LEFT=False,
                          HAS_RIGHT=causal, MASK_KIND=0, HAS_SOFTCAP=False, INT64_INDEX=False, DOT_PRECISION="tf32")
        usage[name] = dict(tile=tile, **build(fn, types, constexprs, num_warps, num_stages))
    return usage


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernel", choices=["prefill", "decode", "backward"])
    parser.add_argument("--head-dim", type=int, default=128, help="q/k head dim (forward: up to 576; backward: 16, "
                        "32, 64, 128 or 256)")
    parser.add_argument("--head-dim-v", type=int, help="v head dim, forward kernels only (default: --head-dim)")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dtype", default="bf16", choices=["fp16", "bf16"])
    parser.add_argument("--alibi", action="store_true")
    parser.add_argument("--sinks", action="store_true")
    parser.add_argument("--kv-dtype", choices=["fp8e4nv", "fp8e5"], help="decode only: an fp8 cache")
    parser.add_argument("--scale-mode", type=int, default=1, choices=[1, 2],
                        help="decode over an fp8 cache: 1 = a scale per program (tensor, KV head), 2 = per token")
    parser.add_argument("--append", action="store_true", help="decode only: with the fused write of new tokens")
    parser.add_argument("--paged", type=int, default=0, choices=[0, 1, 2], help="decode only: common.PAGED_*")
    args = parser.parse_args()
    if args.kernel == "backward":
        print(backward(args.head_dim, args.causal, args.dtype))
    elif args.kernel == "decode":
        print(decode(args.head_dim, args.causal, args.dtype, alibi=args.alibi, sinks=args.sinks,
                     head_dim_v=args.head_dim_v, kv_dtype=args.kv_dtype,
                     scale_mode=args.scale_mode if args.kv_dtype else 0, append=args.append, paged=args.paged))
    else:
        print(prefill(args.head_dim, args.causal, args.dtype, alibi=args.alibi, sinks=args.sinks,
                      head_dim_v=args.head_dim_v))
