"""Large and unequal head dims (issue 15) on this GPU: tileattn's Triton kernels beside SDPA's backends.

Shapes, bf16 by default:
  * prefill, D=512 (Gemma-4-style global layers) and D_qk/D_v = 192/128 (DeepSeek MLA prefill), causal and not;
  * decode, D=512 with GQA 16/2 over a contiguous cache;
  * MLA decode in the absorbed form: one KV head of 576 whose value is its first 512 columns
    (``v_cache = k_cache[..., :512]``), 16 and 128 query heads, contiguous and paged (page 64).

Peers: each SDPA backend (cuDNN, FlashAttention-2, memory-efficient, math) that accepts the shape, timed in the same
run. MLA decode's peer runs it as what it is, one head with ``Hq`` query rows (``q [B, 1, Hq, 576]``), so SDPA reads
the latent cache once per sequence. Decode's GQA peers get K/V expanded to Hq heads beforehand (untimed).

FLOPs: ``2 * B * Hq * Sq * Sk * (D_qk + D_v)``, halved when causal. Decode bytes: the cache bytes a kernel must read
(K and V, or the latent cache once for MLA) plus q and out; the MLA figure is in TB/s of those bytes, whatever the
kernel actually reads.

    python benchmarks/head_dims.py [--dtype bf16] [--quick] [--out file.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

import tileattn

SDPA_BACKENDS = (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("FA2", SDPBackend.FLASH_ATTENTION),
                 ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH))


def bench_ms(fn):
    return do_bench(fn, warmup=10, rep=50, return_mode="median")


def sdpa_peers(q, k, v, causal, skip_math):
    """Median ms of every SDPA backend that runs (q, k, v); math is skipped where it would need S x S memory."""
    times = {}
    for name, backend in SDPA_BACKENDS:
        if name == "math" and skip_math:
            continue
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                times[name] = bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
        except (RuntimeError, torch.OutOfMemoryError) as exc:
            times[name] = None
            print(f"  SDPA {name}: not run ({str(exc).splitlines()[0][:90]})")
    return times


def prefill_rows(dtype, quick):
    rows = []
    shapes = [(512, 512, 16, 4096), (192, 128, 16, 4096)]
    for d, dv, heads, seqlen in shapes:
        batch = (8192 if quick else 16384) // seqlen
        q, k = (torch.randn(batch, heads, seqlen, d, device="cuda", dtype=dtype) for _ in range(2))
        v = torch.randn(batch, heads, seqlen, dv, device="cuda", dtype=dtype)
        for causal in (False, True):
            flops = 2 * batch * heads * seqlen * seqlen * (d + dv) / (2 if causal else 1)
            ours = bench_ms(lambda: tileattn.attention(q, k, v, causal=causal, backend="triton"))
            peers = sdpa_peers(q, k, v, causal, skip_math=True)
            rows.append(dict(kind="prefill", d=d, dv=dv, batch=batch, heads=heads, seqlen=seqlen, causal=causal,
                             flops=flops, ours_ms=ours, peers_ms=peers))
            print(f"prefill {d}/{dv} causal={causal}: ours {flops / ours / 1e9:.0f} TFLOP/s; "
                  + ", ".join(f"{n} {flops / t / 1e9:.0f}" for n, t in peers.items() if t), flush=True)
        del q, k, v
    return rows


def decode_rows(dtype, quick):
    rows = []
    # (name, D, D_v, Hq, Hkv, batch, cache, page): MLA shapes use one KV head with v a view of k.
    shapes = [("gqa", 512, 512, 16, 2, 64, 8192, None)]
    for heads in (16, 128):
        for cache in ((4096,) if quick else (4096, 16384)):
            shapes += [("mla", 576, 512, heads, 1, 64, cache, None), ("mla", 576, 512, heads, 1, 64, cache, 64)]
    elem = torch.finfo(dtype).bits // 8
    for name, d, dv, hq, hkv, batch, cache, page in shapes:
        mla = name == "mla"
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=dtype)
        k_cache = torch.randn(batch, hkv, cache, d, device="cuda", dtype=dtype)
        v_cache = k_cache[..., :dv] if mla else torch.randn(batch, hkv, cache, dv, device="cuda", dtype=dtype)
        seqlens = torch.full((batch,), cache, device="cuda", dtype=torch.int32)
        block_table = None
        if page:
            pages = batch * cache // page
            # Pages in a shuffled order, as a serving engine's allocator leaves them.
            order = torch.randperm(pages, device="cuda")
            k_paged = k_cache.transpose(1, 2).reshape(pages, page, hkv, d)[order.argsort()].transpose(1, 2)
            block_table = order.view(batch, cache // page).to(torch.int32)
            k_run, v_run = k_paged, (k_paged[..., :dv] if mla else None)
        else:
            k_run, v_run = k_cache, v_cache
        ours = bench_ms(lambda: tileattn.attention_with_kvcache(q, k_run, v_run, seqlens, block_table=block_table,
                                                                check_bounds=False, backend="triton"))
        cache_bytes = batch * hkv * cache * (d if mla else d + dv) * elem
        moved = cache_bytes + batch * hq * (d + dv) * elem
        flops = 2 * batch * hq * cache * (d + dv)
        if mla:
            # One head, Hq query rows, non-causal: the latent cache is read once per sequence.
            peer_q = q.transpose(1, 2)
            peers = sdpa_peers(peer_q, k_cache, v_cache, False, skip_math=hq * cache * batch > 2**31)
        else:
            k_full = k_cache.repeat_interleave(hq // hkv, dim=1)
            v_full = v_cache.repeat_interleave(hq // hkv, dim=1)
            peers = sdpa_peers(q, k_full, v_full, False, skip_math=False)
            del k_full, v_full
        rows.append(dict(kind=name + "-decode", d=d, dv=dv, heads=hq, kv_heads=hkv, batch=batch, cache=cache,
                         page=page, bytes=moved, flops=flops, ours_ms=ours, peers_ms=peers))
        print(f"{name} decode {d}/{dv} Hq={hq} cache={cache} page={page}: ours {moved / ours / 1e9:.2f} TB/s "
              f"{flops / ours / 1e9:.0f} TFLOP/s; "
              + ", ".join(f"{n} {moved / t / 1e9:.2f} TB/s" for n, t in peers.items() if t), flush=True)
        del q, k_cache, v_cache, k_run, v_run
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--quick", action="store_true", help="half the prefill tokens, the 4k cache only")
    parser.add_argument("--out")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    rows = prefill_rows(dtype, args.quick) + decode_rows(dtype, args.quick)
    print(f"\n{torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}")
    print("| shape | ours | best SDPA peer | ours / peer |")
    print("|---|---|---|---|")
    for row in rows:
        peers = {n: t for n, t in row["peers_ms"].items() if t}
        best = min(peers, key=peers.get) if peers else None
        if row["kind"] == "prefill":
            shape = f"prefill {row['d']}/{row['dv']} B{row['batch']} H{row['heads']} S{row['seqlen']}" \
                    f"{' causal' if row['causal'] else ''}"
            fmt = lambda ms: f"{row['flops'] / ms / 1e9:.0f} TFLOP/s"  # noqa: E731
        else:
            shape = f"{row['kind']} {row['d']}/{row['dv']} Hq{row['heads']}/{row['kv_heads']} B{row['batch']} " \
                    f"cache {row['cache']}{' paged ' + str(row['page']) if row['page'] else ''}"
            fmt = lambda ms: f"{row['bytes'] / ms / 1e9:.2f} TB/s, {row['flops'] / ms / 1e9:.0f} TFLOP/s"  # noqa
        peer = f"{best} {fmt(peers[best])}" if best else "none runs"
        ratio = f"{peers[best] / row['ours_ms']:.2f}" if best else "-"
        print(f"| {shape} | {fmt(row['ours_ms'])} | {peer} | {ratio} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype=args.dtype,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
