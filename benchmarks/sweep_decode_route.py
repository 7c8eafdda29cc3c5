"""Which Triton kernel should run an ``attention`` call with few query rows: the prefill kernel (one 128-row
tile per query head) or the split-KV decode kernel (the G x Sq rows of a K/V head in one tile, keys split
across programs)? Times both on the same inputs (bf16, D = 128, CUDA-graph replays), with and without a
left-padding mask read as a ``[B, 1, 1, Sk]`` view, and SDPA's best kernel where it can run the call.
The crossover sets ``DECODE_MAX_ROWS`` in ``tileattn/dispatch.py``; see ``benchmarks/NOTES.md``.
"""

import argparse
import json

import torch

from tileattn.bench.decode import graph_time_ms
from tileattn.kernels.decode import decode_attention
from tileattn.kernels.prefill import prefill_attention

# (B, Hq, Hkv, Sq, Sk): decode (Sq = 1), speculative / chunked shapes, MHA and GQA, small and full grids.
CASES = [
    (1, 32, 8, 1, 16384), (1, 32, 32, 1, 16384), (8, 32, 8, 1, 4096), (8, 32, 32, 1, 4096),
    (64, 32, 8, 1, 2048), (64, 32, 32, 1, 2048),
    (1, 32, 8, 4, 8192), (8, 32, 8, 4, 4096), (1, 32, 8, 8, 8192), (8, 32, 8, 8, 4096), (64, 32, 8, 8, 2048),
    (1, 32, 32, 16, 8192), (8, 32, 32, 16, 4096), (1, 32, 32, 64, 8192), (8, 32, 32, 64, 4096),
    (64, 32, 32, 64, 2048),
    (1, 32, 8, 16, 8192), (8, 32, 8, 16, 4096), (1, 32, 32, 128, 8192), (8, 32, 32, 128, 4096),
]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    args = parser.parse_args()
    d, dtype, scale = 128, torch.bfloat16, 128 ** -0.5
    results = []
    for b, hq, hkv, sq, sk in CASES:
        q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype) for _ in range(2))
        lengths = torch.full((b,), sk, dtype=torch.int32, device="cuda")
        pad = torch.arange(b, device="cuda") * 37 % 256  # left padding of 0..255 tokens
        keep = (torch.arange(sk, device="cuda")[None, :] >= pad[:, None])[:, None, None, :].expand(b, hq, sq, sk)
        row = dict(batch=b, q_heads=hq, kv_heads=hkv, q_len=sq, kv_len=sk, rows_per_kv_head=sq * hq // hkv)
        for masked in (False, True):
            mask = keep if masked else None
            tag = "masked_" if masked else ""
            row[tag + "prefill_ms"] = graph_time_ms(lambda: prefill_attention(
                q, k, v, window=(-1, 0), scale=scale, mask=mask))
            row[tag + "decode_ms"] = graph_time_ms(lambda: decode_attention(
                q, k, v, lengths, new_tokens=0, window=(-1, 0), scale=scale, mask=mask))
        if hq == hkv and sq == 1:  # SDPA runs plain MHA decode exactly (one query sees every key)
            for name, backend in (("sdpa_cudnn_ms", "CUDNN_ATTENTION"), ("sdpa_flash_ms", "FLASH_ATTENTION")):
                kernel = getattr(torch.nn.attention.SDPBackend, backend)

                def sdpa(kernel=kernel):
                    with torch.nn.attention.sdpa_kernel(kernel):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v)

                row[name] = graph_time_ms(sdpa)
        gbytes = 2 * k.numel() * k.element_size() / 1e9
        row["decode_tbps"] = gbytes / row["decode_ms"] if row["decode_ms"] else None
        print(json.dumps(row), flush=True)
        results.append(row)
    if args.out:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__)
        with open(args.out, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)


if __name__ == "__main__":
    main()
