"""``tileattn bench decode``: one query token per sequence over a full KV cache, on a GPU.

Decoding is memory-bound: the figure of merit is the bandwidth of reading K and V,
``2 * B * Hkv * L * D * bytes`` over the time. Every implementation is captured in a CUDA graph and
timed by its replays (how serving engines run decode; it removes Python launch overhead from all of
them alike). tileattn runs on the contiguous cache and on paged copies (pages of 16 and 64 tokens,
shuffled block tables); SDPA's flash and cuDNN backends on the same contiguous data.

``tileattn bench varlen``: 100 prompts of random lengths 64..1024 prefilled together, packed
(tileattn varlen) against padding the batch to the longest prompt and calling SDPA.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .report import Progress, environment, markdown_table, write_results

SHAPES = ((1, 16384), (16, 4096), (64, 4096), (100, 2048), (8, 32768))


def graph_time_ms(fn) -> float | None:
    """Median ms of replaying ``fn`` captured in a CUDA graph; None if it fails or runs out of memory."""
    from triton.testing import do_bench

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:  # e.g. an SDPA backend refusing the shape
        print(f"    skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        torch.cuda.synchronize()
        return None


def to_pages(cache, page_size, order):
    """``cache [B, H, L, D]`` re-stored as token-major pages ``[P, page, H, D]`` in the shuffled ``order``
    (page j of sequence b goes to ``order[b * L / page + j]``), returned as the ``[P, H, page, D]`` view."""
    b, h, length, d = cache.shape
    chunks = cache.view(b, h, length // page_size, page_size, d).permute(0, 2, 3, 1, 4).reshape(-1, page_size, h, d)
    pool = torch.empty_like(chunks)
    pool[order] = chunks
    return pool.transpose(1, 2)


def run(out_dir, *, shapes=SHAPES, q_heads=32, kv_heads=(32, 8), head_dim=128, dtype=torch.bfloat16,
        page_sizes=(16, 64), progress=None):
    import tileattn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    env = environment()
    gen = torch.Generator().manual_seed(0)
    progress = progress or Progress(len(kv_heads) * len(shapes) * (3 + len(page_sizes)), "decode")
    rows = []
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C keeps what was measured
        for hkv in kv_heads:
            for b, length in shapes:
                k, v = (torch.randn(b, hkv, length, head_dim, device="cuda", dtype=dtype) for _ in range(2))
                q = torch.randn(b, q_heads, 1, head_dim, device="cuda", dtype=dtype)
                seqlens = torch.full((b,), length, dtype=torch.int32, device="cuda")
                kv_bytes = 2 * k.numel() * k.element_size()
                impls = {"tileattn": lambda: tileattn.attention_with_kvcache(q, k, v, seqlens, check_bounds=False)}
                reference = impls["tileattn"]()
                for page_size in page_sizes:
                    order = torch.randperm(b * length // page_size, generator=gen).cuda()
                    kp, vp = to_pages(k, page_size, order), to_pages(v, page_size, order)
                    table = order.view(b, -1).to(torch.int32)
                    impls[f"tileattn paged {page_size}"] = (
                        lambda kp=kp, vp=vp, table=table: tileattn.attention_with_kvcache(
                            q, kp, vp, seqlens, block_table=table, check_bounds=False))
                    diff = (impls[f"tileattn paged {page_size}"]().float() - reference.float()).abs().max().item()
                    if diff > 1e-2:
                        raise AssertionError(f"paged {page_size} differs from contiguous by {diff}")
                for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    def sdpa(backend=backend):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != q_heads)
                    impls[name] = sdpa
                check = (impls["sdpa_flash"]().float() - reference.float()).abs().max().item()
                for name, fn in impls.items():
                    ms = graph_time_ms(fn)
                    row = dict(impl=name, batch=b, seqlen=length, q_heads=q_heads, kv_heads=hkv, head_dim=head_dim,
                               dtype=str(dtype).removeprefix("torch."), us=None if ms is None else ms * 1e3,
                               tb_per_s=None if ms is None else kv_bytes / ms / 1e9,
                               max_abs_diff_tileattn_vs_sdpa_flash=check)
                    rows.append(row)
                    progress.step(f"Hkv={hkv} B={b} L={length} {name:>20}: "
                             + ("-" if ms is None else f"{row['us']:.1f} us, {row['tb_per_s']:.2f} TB/s"))
                del k, v, impls
    return write_results(out_dir, "decode", env, rows, summarize(rows))


def summarize(rows) -> str:
    names = list(dict.fromkeys(r["impl"] for r in rows))
    table = []
    for hkv, b, length in dict.fromkeys((r["kv_heads"], r["batch"], r["seqlen"]) for r in rows):
        sel = {r["impl"]: r for r in rows if (r["kv_heads"], r["batch"], r["seqlen"]) == (hkv, b, length)}
        tb = [sel[n]["tb_per_s"] if n in sel else None for n in names]
        ours, cudnn = sel.get("tileattn", {}).get("us"), sel.get("sdpa_cudnn", {}).get("us")
        table.append([f"{rows[0]['q_heads']}/{hkv}", b, length, *tb,
                      None if not ours or not cudnn else cudnn / ours])
    headers = ["Hq/Hkv", "B", "L", *(f"{n} TB/s" for n in names), "speedup vs cuDNN (time)"]
    return ("K+V bytes read / time, CUDA-graph replays, one query token per sequence.\n\n"
            + markdown_table(headers, table))


def run_varlen(out_dir, *, num_seqs=100, min_len=64, max_len=1024, heads=32, head_dim=128, dtype=torch.bfloat16,
               progress=None):
    """Packed prefill of ``num_seqs`` causal prompts against padding them and calling SDPA."""
    import tileattn
    from triton.testing import do_bench

    env = environment()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(min_len, max_len + 1, (num_seqs,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).cuda()
    total, longest = int(lengths.sum()), int(lengths.max())
    q, k, v = (torch.randn(total, heads, head_dim, device="cuda", dtype=dtype) for _ in range(3))

    def pad(x):  # [total, H, D] -> [B, H, longest, D], zeros after each prompt (right padding)
        out = x.new_zeros(num_seqs, longest, heads, head_dim)
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            out[i, : b - a] = x[a:b]
        return out.transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    # Right padding + causal: each real row sees only real keys, so SDPA's top-left is_causal is exact there.
    impls = {
        "tileattn varlen (packed)": lambda: tileattn.attention_varlen(q, k, v, cu, cu, longest, longest, causal=True),
        "sdpa on padded batch": lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True),
    }
    packed = impls["tileattn varlen (packed)"]()
    padded = impls["sdpa on padded batch"]()
    diff = max((packed[a:b].float() - padded[i, :, : b - a].transpose(0, 1).float()).abs().max().item()
               for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())))
    useful_flops = sum(4 * heads * n * n * head_dim / 2 for n in lengths.tolist())
    rows = []
    progress = progress or Progress(len(impls), "varlen")
    for name, fn in impls.items():
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        rows.append(dict(impl=name, num_seqs=num_seqs, total_tokens=total, padded_tokens=num_seqs * longest, ms=ms,
                         useful_tflops=useful_flops / ms / 1e9, max_abs_diff=diff))
        progress.step(f"{name}: {ms:.3f} ms, {useful_flops / ms / 1e9:.0f} useful TFLOP/s")
    table = markdown_table(["implementation", "sequences", "real tokens", "padded tokens", "ms", "useful TFLOP/s"],
                           [[r["impl"], r["num_seqs"], r["total_tokens"], r["padded_tokens"], r["ms"],
                             r["useful_tflops"]] for r in rows])
    note = (f"Causal prefill of {num_seqs} prompts of random lengths {min_len}..{max_len} (seed 0), H={heads}, "
            f"D={head_dim}, {str(dtype).removeprefix('torch.')}; SDPA's time excludes building the padded batch. "
            f"Max |packed - padded| over real tokens: {diff:.3g}.\n\n")
    return write_results(out_dir, "varlen", env, rows, note + table)
