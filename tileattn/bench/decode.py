"""``tileattn bench decode``: one query token per sequence over a full KV cache, on a GPU.

Decoding is memory-bound: the figure of merit is the bandwidth of reading K and V,
``2 * B * Hkv * L * D * bytes`` over the time. Every implementation is captured in a CUDA graph and
timed by its replays (how serving engines run decode; it removes Python launch overhead from all of
them alike), the implementations interleaved round-robin in each of :data:`REPEATS` repeats. tileattn runs on the contiguous cache and on paged copies (pages of 16 and 64 tokens,
shuffled block tables); SDPA's flash and cuDNN backends on the same contiguous data.

``tileattn bench varlen``: 100 prompts of random lengths 64..1024 prefilled together, packed
(tileattn varlen) against padding the batch to the longest prompt and calling SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import gpu_ms
from .report import (Interruptible, Progress, environment, flag_notes, interleaved_timings, markdown_table,
                     rate_cell, timing_cell, write_results)

SHAPES = ((1, 16384), (16, 4096), (64, 4096), (100, 2048), (8, 32768))
REPEATS = 5


def capture(fn):
    """``fn`` captured in a CUDA graph (after warm-up on a side stream); None if it fails or runs out of memory."""
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
        return graph
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
    progress = progress or Progress(len(kv_heads) * len(shapes), "decode")
    rows = []
    with Interruptible() as run_state:  # Ctrl-C keeps what was measured
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
                graphs = {name: capture(fn) for name, fn in impls.items()}
                timings = interleaved_timings({name: g.replay for name, g in graphs.items() if g is not None},
                                              REPEATS, time_one=gpu_ms, warmup=0)
                for name in impls:
                    row = dict(impl=name, batch=b, seqlen=length, q_heads=q_heads, kv_heads=hkv, head_dim=head_dim,
                               dtype=str(dtype).removeprefix("torch."), us=None, tb_per_s=None, kv_bytes=kv_bytes,
                               max_abs_diff_tileattn_vs_sdpa_flash=check)
                    if name in timings:
                        us = timings[name].scaled(1e3)
                        row.update(us.fields("us"), tb_per_s=kv_bytes / us.median / 1e6)
                    rows.append(row)
                progress.step(f"Hkv={hkv} B={b} L={length}: " + ", ".join(
                    f"{r['impl']} " + ("-" if r["us"] is None else f"{r['tb_per_s']:.2f}" + (" (noisy)" if r["noisy"] else ""))
                    for r in rows[-len(impls):]) + " TB/s")
                del k, v, impls, graphs
    return write_results(out_dir, "decode", env, rows, summarize(rows), run_state.interrupted)


def summarize(rows) -> str:
    """TB/s of each implementation per shape (median and interquartile range), and tileattn's time against cuDNN's."""
    names = list(dict.fromkeys(r["impl"] for r in rows))
    table = []
    for hkv, b, length in dict.fromkeys((r["kv_heads"], r["batch"], r["seqlen"]) for r in rows):
        sel = {r["impl"]: r for r in rows if (r["kv_heads"], r["batch"], r["seqlen"]) == (hkv, b, length)}
        tb = [rate_cell(sel[n]["kv_bytes"] / 1e6, sel[n], "us") if n in sel else None for n in names]
        ours, cudnn = sel.get("tileattn", {}).get("us"), sel.get("sdpa_cudnn", {}).get("us")
        table.append([f"{rows[0]['q_heads']}/{hkv}", b, length, *tb,
                      None if not ours or not cudnn else cudnn / ours])
    headers = ["Hq/Hkv", "B", "L", *(f"{n} TB/s" for n in names), "speedup vs cuDNN (time)"]
    return ("K+V bytes read / time, CUDA-graph replays, one query token per sequence.\n\n"
            + markdown_table(headers, table) + "\n" + flag_notes(rows, "tileattn bench decode", REPEATS))


def run_varlen(out_dir, *, num_seqs=100, min_len=64, max_len=1024, heads=32, head_dim=128, dtype=torch.bfloat16,
               progress=None):
    """Packed prefill of ``num_seqs`` causal prompts against padding them and calling SDPA, interleaved."""
    import tileattn

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
    progress = progress or Progress(1, "varlen")
    with Interruptible() as run_state:
        timings = interleaved_timings(impls, REPEATS, time_one=gpu_ms, warmup=0)
    rows = [dict(impl=name, num_seqs=num_seqs, total_tokens=total, padded_tokens=num_seqs * longest,
                 **t.fields("ms"), useful_tflops=useful_flops / t.median / 1e9, max_abs_diff=diff)
            for name, t in (timings.items() if not run_state.interrupted else ())]
    progress.step(", ".join(f"{r['impl']}: {r['ms']:.3f} ms" for r in rows))
    table = markdown_table(["implementation", "sequences", "real tokens", "padded tokens", "ms", "useful TFLOP/s"],
                           [[r["impl"], r["num_seqs"], r["total_tokens"], r["padded_tokens"],
                             timing_cell(r["ms"], r["ms_q1"], r["ms_q3"], r["noisy"]),
                             rate_cell(useful_flops / 1e9, r)] for r in rows])
    note = (f"Causal prefill of {num_seqs} prompts of random lengths {min_len}..{max_len} (seed 0), H={heads}, "
            f"D={head_dim}, {str(dtype).removeprefix('torch.')}; SDPA's time excludes building the padded batch. "
            f"Max |packed - padded| over real tokens: {diff:.3g}.\n\n")
    return write_results(out_dir, "varlen", env, rows, note + table + "\n" + flag_notes(rows, "tileattn bench varlen", REPEATS),
                         run_state.interrupted)
