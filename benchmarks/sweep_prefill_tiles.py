"""Time the prefill kernel over candidate tiles (block_m, block_n, num_warps, num_stages) on this GPU.

The winners go into ``_CONFIGS`` in ``tileattn/kernels/prefill.py``; each run is noted in
``benchmarks/NOTES.md``. Usage: ``python benchmarks/sweep_prefill_tiles.py [--dtype bf16] [--out file.json]``.
"""

import argparse
import json

import torch
from triton.testing import do_bench

from tileattn.kernels.prefill import prefill_attention

# (block_m, block_n) x num_warps x num_stages; all are timed non-causal, the best few again causal.
CANDIDATES = {
    64: [(m, n, w, s) for (m, n) in [(128, 64), (128, 128), (64, 64)] for w in (4, 8) for s in (2, 3, 4)],
    128: [(m, n, w, s) for (m, n) in [(128, 64), (128, 128), (64, 64), (128, 32)] for w in (4, 8) for s in (2, 3)],
    256: [(m, n, w, s) for (m, n) in [(64, 32), (64, 64), (128, 32), (128, 64)] for w in (4, 8) for s in (1, 2)],
}
CAUSAL_FINALISTS = 4


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
    results = []
    for d in args.head_dims:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype) for _ in range(3))
        candidates = CANDIDATES[d]
        for causal in (False, True):
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            timed = []
            for cfg in candidates:
                try:
                    fn = lambda: prefill_attention(q, k, v, window=(-1, 0 if causal else -1), scale=d**-0.5,
                                                   config=cfg)
                    ms = do_bench(fn, warmup=10, rep=40, return_mode="median")
                except Exception as exc:  # tiles that do not fit in shared memory / registers
                    print(f"D={d} causal={causal} {cfg}: failed ({type(exc).__name__})")
                    continue
                tflops = flops / ms / 1e9
                print(f"D={d} causal={causal} {cfg}: {tflops:.0f} TFLOP/s", flush=True)
                results.append(dict(head_dim=d, causal=causal, config=cfg, ms=ms, tflops=tflops))
                timed.append((tflops, cfg))
            timed.sort(reverse=True)
            print(f"BEST D={d} causal={causal}: " + ", ".join(f"{c} {t:.0f}" for t, c in timed[:3]), flush=True)
            candidates = [c for _, c in timed[:CAUSAL_FINALISTS]]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
