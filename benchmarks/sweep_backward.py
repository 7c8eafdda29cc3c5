"""Time the backward kernels over candidate tiles on this GPU, beside SDPA's FlashAttention-2 and cuDNN backward.

Each tile is (block_m, block_n, num_warps, num_stages); the dK/dV kernel's candidates are timed with the default dQ
tile, then the dQ kernel's with the best dK/dV tile (the two kernels are independent launches, so their times add).
The winners go into ``_CONFIGS`` in ``tileattn/kernels/backward.py``; each run is noted in ``benchmarks/NOTES.md``.
FLOPs of a backward are 2.5x the forward's (five ``S x S x D`` products against two): ``10 * B * H * S^2 * D``,
halved when causal, as flash-attn counts them.

    python benchmarks/sweep_backward.py [--dtype bf16] [--head-dims 64 128] [--out file.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from tileattn.kernels.backward import _CONFIGS, attention_backward
from tileattn.kernels.prefill import prefill_attention

DKDV_CANDIDATES = {
    64: [(64, 128, 8, 2), (64, 128, 8, 3), (32, 128, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2)],
    128: [(64, 64, 4, 2), (64, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 4, 2)],
    256: [(32, 64, 8, 2), (16, 64, 4, 2), (32, 64, 8, 1), (32, 64, 4, 1), (64, 64, 8, 1)],
}
DQ_CANDIDATES = {
    64: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2)],
    256: [(64, 32, 8, 2), (64, 32, 4, 1), (128, 32, 8, 1), (64, 64, 8, 1)],
}


def sdpa_backward_ms(backend, q, k, v, grad_out, causal):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return do_bench(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True), warmup=10, rep=40,
                    return_mode="median")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    s, h = args.seqlen, args.heads
    b = max(1, args.tokens // s)
    results, summary = [], []
    for d in args.head_dims:
        q, k, v, grad_out = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(4))
        for causal in (False, True):
            window = (-1, 0 if causal else -1)
            flops = 10 * b * h * s * s * d / (2 if causal else 1)
            out, lse = prefill_attention(q, k, v, window=window, scale=d**-0.5, return_lse=True)

            def time_tiles(tiles):
                try:
                    ms = do_bench(lambda: attention_backward(grad_out, q, k, v, out, lse, window=window,
                                                             scale=d**-0.5, config=tiles),
                                  warmup=10, rep=40, return_mode="median")
                except Exception as exc:  # a tile that does not fit in shared memory
                    print(f"D={d} causal={causal} {tiles}: failed ({type(exc).__name__}: {str(exc)[:80]})")
                    return None
                tflops = flops / ms / 1e9
                print(f"D={d} causal={causal} dkdv {tiles[0]} dq {tiles[1]}: {ms:.3f} ms, {tflops:.0f} TFLOP/s",
                      flush=True)
                results.append(dict(head_dim=d, causal=causal, dkdv=tiles[0], dq=tiles[1], ms=ms, tflops=tflops))
                return tflops

            timed = [(time_tiles((t, _CONFIGS[d][1])), t) for t in DKDV_CANDIDATES[d]]
            best_dkdv = max((x for x in timed if x[0]), default=(None, _CONFIGS[d][0]))[1]
            timed = [(time_tiles((best_dkdv, t)), t) for t in DQ_CANDIDATES[d]]
            best_tflops, best_dq = max((x for x in timed if x[0]), default=(0.0, _CONFIGS[d][1]))
            peers = {}
            for name, backend in (("FA2", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
                try:
                    peers[name] = flops / sdpa_backward_ms(backend, q, k, v, grad_out, causal) / 1e9
                except RuntimeError as exc:
                    print(f"{name} backward unavailable: {str(exc)[:80]}")
            results.append(dict(head_dim=d, causal=causal, peers=peers))
            summary.append((d, causal, best_dkdv, best_dq, best_tflops, peers))
            del out, lse
    print("\n| D | causal | best dK/dV tile | best dQ tile | tileattn TFLOP/s | FA2 | cuDNN | / FA2 | / cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for d, causal, dkdv, dq, tflops, peers in summary:
        fa2, cudnn = peers.get("FA2"), peers.get("cuDNN")
        print(f"| {d} | {causal} | {dkdv} | {dq} | {tflops:.0f} | {fa2 or 0:.0f} | {cudnn or 0:.0f} | "
              f"{tflops / fa2 if fa2 else 0:.2f} | {tflops / cudnn if cudnn else 0:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                           batch=b, heads=h, seqlen=s, results=results), f, indent=1)


if __name__ == "__main__":
    main()
