"""Time the split-KV decode kernel over tiles (block_n, num_warps, num_stages) and split counts, on
contiguous and paged caches (CUDA-graph replays, bandwidth of K+V reads). The winners go into
``_DECODE_CONFIG`` / ``choose_num_splits`` in ``tileattn/kernels/decode.py``; see ``benchmarks/NOTES.md``.
"""

import argparse
import json

import torch

from tileattn.bench.decode import graph_time_ms, to_pages
from tileattn.kernels.decode import choose_num_splits, decode_attention

CASES = [(1, 16384, 8), (16, 4096, 32), (16, 4096, 8), (100, 2048, 8), (64, 4096, 32)]  # (B, L, Hkv), Hq = 32
CONFIGS = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 4), (128, 4, 2)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--cases", help="B,L,Hkv;B,L,Hkv;... (default: CASES)")
    parser.add_argument("--configs", help="block_n,warps,stages;... (default: CONFIGS)")
    parser.add_argument("--splits", help="split counts to time, e.g. 1,2,4 (default: auto, auto/2, auto*2)")
    parser.add_argument("--layouts", default="contiguous,paged16,paged64")
    args = parser.parse_args()

    def triples(text, default):
        return default if not text else [tuple(int(x) for x in part.split(",")) for part in text.split(";")]

    cases, configs = triples(args.cases, CASES), triples(args.configs, CONFIGS)
    wanted_layouts = args.layouts.split(",")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for b, length, hkv in cases:
        k, v = (torch.randn(b, hkv, length, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q = torch.randn(b, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        seqlens = torch.full((b,), length, dtype=torch.int32, device="cuda")
        layouts = {"contiguous": (k, v, None)}
        for page in (16, 64):
            if f"paged{page}" in wanted_layouts:
                order = torch.randperm(b * length // page, device="cuda")
                layouts[f"paged{page}"] = (to_pages(k, page, order), to_pages(v, page, order),
                                           order.view(b, -1).to(torch.int32))
        gbytes = 2 * k.numel() * 2 / 1e9
        for layout, (kc, vc, table) in layouts.items():
            if layout not in wanted_layouts:
                continue
            timed = []
            for cfg in configs:
                auto = choose_num_splits(b, hkv, 1, length, sms, cfg[0], table is not None)  # for this tile
                split_counts = ([int(x) for x in args.splits.split(",")] if args.splits
                                else sorted({auto, max(1, auto // 2), min(64, auto * 2)}))
                for splits in split_counts:
                    fn = lambda: decode_attention(q, kc, vc, seqlens, new_tokens=0, block_table=table,
                                                  window=(-1, 0), scale=128**-0.5, num_splits=splits, config=cfg)
                    ms = graph_time_ms(fn)
                    if ms is None:
                        continue
                    tbs = gbytes / ms
                    results.append(dict(batch=b, seqlen=length, kv_heads=hkv, layout=layout, config=cfg,
                                        splits=splits, auto_splits=auto, us=ms * 1e3, tb_per_s=tbs))
                    timed.append((tbs, cfg, splits, splits == auto))
            timed.sort(reverse=True)
            default = [t for t in timed if t[1] == configs[0] and t[3]]
            print(f"B={b} L={length} Hkv={hkv} {layout:>10}: best " +
                  ", ".join(f"{c} s={s} {t:.2f}" for t, c, s, _ in timed[:3]) +
                  (f" | current default {default[0][0]:.2f} TB/s" if default else ""), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
