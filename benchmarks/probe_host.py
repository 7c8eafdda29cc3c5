"""GPU probes for issue 10 (host cost), printed as short tables:

1. GQA on SDPA's fused kernels, called through their ATen ops with K/V heads NOT repeated: does each kernel take
   Hq != Hkv, is its result right (against tileattn's Triton kernel, itself checked against the float64 oracle in
   the tests), and how fast is it beside the Triton kernel at the LLaMA-7B prefill shape (B = 1, GQA 32/8, D = 128,
   bf16, causal)? This decides whether ``auto`` may send plain GQA prefill to SDPA.
2. cProfile of the host path of a few hot entry points (tiny GPU work), top functions by own time.
3. ``--generate``: where a LLaMA-7B-shaped ``generate()`` step spends its host time with sdpa and with tileattn:
   the attention-interface functions timed on the arguments the model really passes (decode step and 512-token
   prefill), the backend ``auto`` picks for them, and cProfile of whole decode steps.
4. ``--prefill-host``: host time per prefill forward and in its attention calls, and the device syncs in it.
5. ``--prefill-gpu``: the LLaMA-7B 512-token prefill, sdpa against tileattn: wall time and GPU time per kernel.

Usage (GPU): python3 benchmarks/probe_host.py [--profile] [--generate] [--no-gqa] [--prefill-gpu] [--prefill-host]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch
import triton

import tileattn

aten = torch.ops.aten


def sdpa_gqa(kernel, q, k, v, causal):
    scale = q.shape[-1] ** -0.5
    if kernel == "cudnn":
        return aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False, scale=scale)[0]
    if kernel == "flash":
        return aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
    return aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, causal, scale=scale)[0]


def probe_gqa():
    from torch.backends import cuda as sdp

    print("| S | causal | kernel | can_use(enable_gqa) | max err vs triton | ms | triton ms | kernel/triton time |")
    print("|---|---|---|---|---|---|---|---|")
    for s in (512, 2048):
        for causal in (True, False):
            q = torch.randn(1, 32, s, 128, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            ref = tileattn.attention(q, k, v, causal=causal, backend="triton")
            t_triton = triton.testing.do_bench(lambda: tileattn.attention(q, k, v, causal=causal, backend="triton"),
                                               return_mode="median")
            for kernel in ("cudnn", "flash", "efficient"):
                params = sdp.SDPAParams(q, k, v, None, 0.0, causal, True)
                can = getattr(sdp, {"cudnn": "can_use_cudnn_attention", "flash": "can_use_flash_attention",
                                    "efficient": "can_use_efficient_attention"}[kernel])(params, False)
                try:
                    out = sdpa_gqa(kernel, q, k, v, causal)
                    err = (out.float() - ref.float()).abs().max().item()
                    ms = triton.testing.do_bench(lambda: sdpa_gqa(kernel, q, k, v, causal), return_mode="median")
                    print(f"| {s} | {causal} | {kernel} | {can} | {err:.3g} | {ms:.4f} | {t_triton:.4f} | "
                          f"{ms / t_triton:.2f} |")
                except Exception as exc:  # noqa: BLE001 - the probe reports what each kernel does
                    print(f"| {s} | {causal} | {kernel} | {can} | {type(exc).__name__}: {str(exc)[:80]} | | "
                          f"{t_triton:.4f} | |")
    # What F.scaled_dot_product_attention(enable_gqa=True) runs (Transformers' sdpa path for a causal prefill).
    q = torch.randn(1, 32, 512, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 8, 512, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        torch.cuda.synchronize()
    print("F.sdpa(enable_gqa=True) kernels:", sorted({e.name[:90] for e in prof.events() if e.device_type.name == "CUDA"}))


def profile_host():
    from tileattn import flash_attn_compat

    dtype, dev = torch.bfloat16, "cuda"
    q = torch.randn(1, 32, 16, 128, device=dev, dtype=dtype)
    qd = torch.randn(1, 32, 1, 128, device=dev, dtype=dtype)
    kc, vc = (torch.randn(1, 8, 2048, 128, device=dev, dtype=dtype) for _ in range(2))
    kn, vn = (torch.randn(1, 8, 1, 128, device=dev, dtype=dtype) for _ in range(2))
    lengths = torch.full((1,), 1024, dtype=torch.int32, device=dev)
    cases = {
        "prefill [1, 32, 16, 128] triton": lambda: tileattn.attention(q, q, q, causal=True, backend="triton"),
        "attention_with_kvcache(check_bounds=False)": lambda: tileattn.attention_with_kvcache(
            qd, kc, vc, lengths, check_bounds=False),
        "flash_attn_with_kvcache + k/v": lambda: flash_attn_compat.flash_attn_with_kvcache(
            qd.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), kn.transpose(1, 2), vn.transpose(1, 2),
            cache_seqlens=lengths, causal=True),
    }
    for name, fn in cases.items():
        for _ in range(50):
            fn()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(2000):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
        print(f"== {name} (2000 calls)")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:2600])


def probe_generate():
    import time

    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers import AttentionInterface

    from tileattn.bench import e2e
    from tileattn.integrations import transformers as tileattn_hf

    spec = dict(e2e.MODELS["llama-7b"])
    spec["shape"] = dict(spec["shape"], num_key_value_heads=8)
    model = e2e.build_model(spec, torch.device("cuda"))
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    captured = {}

    def recording(module, query, key, value, attention_mask, **kwargs):
        phase = "decode" if query.shape[2] == 1 else "prefill"
        captured.setdefault(phase, (module, query, key, value, attention_mask, kwargs))
        return tileattn_hf.tileattn_attention_forward(module, query, key, value, attention_mask, **kwargs)

    e2e.use(model, "tileattn")
    AttentionInterface.register("tileattn", recording)  # after use(), which registers the plain function
    ids = torch.randint(3, 32000, (1, 512), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    tileattn_hf.register()
    print("| phase | function | host us/call (2000 calls) | GPU ms/call (do_bench) | auto's backend |")
    print("|---|---|---|---|---|")
    for phase, (module, q, k, v, mask, kwargs) in captured.items():
        print(f"{phase}: q {tuple(q.shape)} {q.stride()} k {tuple(k.shape)} {k.stride()} mask "
              f"{None if mask is None else (tuple(mask.shape), mask.dtype)} kwargs {sorted(kwargs)}")
        backend = tileattn.explain(q, k, v, causal=q.shape[2] > 1).backend
        for name, fn in (("sdpa", sdpa_attention_forward), ("tileattn", tileattn_hf.tileattn_attention_forward)):
            def call():
                return fn(module, q, k, v, mask, **kwargs)
            for _ in range(20):
                call()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(2000 if phase == "decode" else 200):
                call()
            host = (time.perf_counter() - start) / (2000 if phase == "decode" else 200) * 1e6
            torch.cuda.synchronize()
            gpu = triton.testing.do_bench(call, return_mode="median")
            print(f"| {phase} | {name} | {host:.1f} | {gpu:.4f} | {backend if name == 'tileattn' else ''} |")
    def timed(tokens):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    steps = {"eager": [], "sdpa": [], "tileattn": []}
    with torch.no_grad():
        for _ in range(4):
            for impl, found in steps.items():
                e2e.use(model, impl)
                found.append((timed(33) - timed(1)) / 32 * 1e3)
    print("generate ms/step, 4 interleaved rounds:", {i: [round(t, 2) for t in found] for i, found in steps.items()})
    for impl in ("sdpa", "tileattn"):
        e2e.use(model, impl)
        with torch.no_grad():
            model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False)
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            model.generate(ids, max_new_tokens=9, min_new_tokens=9, do_sample=False)
            prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(22)
        print(f"== generate 9 tokens, {impl}")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:4000])


def probe_decode_gpu():
    """GPU time of one decode call (B = 1, GQA 32/8, D = 128, bf16) per kernel, tileattn against SDPA, from the
    profiler's kernel durations (warm L2: the cache of a small decode step stays in L2 between layers anyway)."""
    print("| keys | implementation | kernels (us each) | total us |")
    print("|---|---|---|---|")
    for keys in (513, 1024, 4096, 16384):
        q = torch.randn(1, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, 8, keys, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for name, fn in (("sdpa", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)),
                         ("tileattn", lambda: tileattn.attention(q, k, v))):
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            kernels = {}
            for e in prof.events():
                if e.device_type.name == "CUDA":
                    kernels.setdefault(e.name[:60], []).append(e.device_time)
            parts = {n: sum(t) / 20 for n, t in kernels.items()}
            print(f"| {keys} | {name} | {'; '.join(f'{n} {t:.1f}' for n, t in parts.items())} | "
                  f"{sum(parts.values()):.1f} |")


def probe_routes():
    """Host us per call of each way to reach SDPA's cuDNN kernel, and of tileattn's, at the LLaMA-7B shapes as the
    model passes them (q a [B, S, H, D] buffer seen as [B, H, S, D]); median of 7 interleaved rounds of 1000 calls."""
    import statistics
    import time

    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tileattn.integrations import transformers as tileattn_hf

    aten = torch.ops.aten
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups, module.training = True, 4, False
    sdpa = torch.nn.functional.scaled_dot_product_attention
    for phase, sq, sk in (("prefill", 512, 512), ("decode", 1, 513)):
        q = torch.randn(1, sq, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.randn(1, 8, sk, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        causal = sq > 1
        routes = {
            "F.sdpa(enable_gqa)": lambda: sdpa(q, k, v, is_causal=causal, enable_gqa=True),
            "aten cudnn (packet)": lambda: aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, False, 0.0, causal, False, scale=0.08838834764831845),
            "aten cudnn .default": lambda: aten._scaled_dot_product_cudnn_attention.default(
                q, k, v, None, False, 0.0, causal, False, scale=0.08838834764831845),
            "tileattn.attention auto": lambda: tileattn.attention(q, k, v, causal=causal),
            "tileattn.attention triton": lambda: tileattn.attention(q, k, v, causal=causal, backend="triton"),
            "hf sdpa_attention_forward": lambda: sdpa_attention_forward(module, q, k, v, None, scaling=None),
            "hf tileattn_attention_forward": lambda: tileattn_hf.tileattn_attention_forward(module, q, k, v, None),
        }
        times = {name: [] for name in routes}
        for fn in routes.values():
            for _ in range(50):
                fn()
        for _ in range(7):
            for name, fn in routes.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(1000):
                    fn()
                times[name].append((time.perf_counter() - start) * 1e3)
                torch.cuda.synchronize()
        print(f"{phase}: " + ", ".join(f"{n} {statistics.median(t):.1f}" for n, t in times.items()))


def probe_generate_variants(prompt=512, rounds=5):
    """Where generate()'s decode steps (B = 1, LLaMA-7B shape, GQA 32/8) differ between sdpa and tileattn: each
    implementation's attention function and mask function are timed inside the model (host time summed per step),
    beside the whole step; median of interleaved rounds."""
    import statistics
    import time

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from tileattn.bench import e2e
    from tileattn.integrations import transformers as tileattn_hf

    spec = dict(e2e.MODELS["llama-7b"])
    spec["shape"] = dict(spec["shape"], num_key_value_heads=8)
    model = e2e.build_model(spec, torch.device("cuda"))
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    ids = torch.randint(3, 32000, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()
    spent = {"hf attention": 0.0, "mask": 0.0, "attention misses": 0.0, "misses": 0}

    def timed_fn(fn, what):
        seen = set()  # the shapes this implementation's function was called with

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            took = time.perf_counter() - start
            spent[what] += took
            if what == "hf attention":
                shape = (args[1].shape, args[2].shape)
                if shape not in seen:
                    seen.add(shape)
                    spent["attention misses"] += took
                    spent["misses"] += 1
            return result
        return wrapper

    import tileattn.api
    import tileattn.kernels.decode
    import tileattn.sdpa

    def timed_attr(owner, name, label):  # inclusive host time of owner.name, summed per step
        fn = getattr(owner, name)
        spent[label] = 0.0

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            spent[label] += time.perf_counter() - start
            return result
        setattr(owner, name, wrapper)

    timed_attr(tileattn.api, "attention", "tileattn.attention")
    timed_attr(tileattn.kernels.decode.DecodePlan, "run", "DecodePlan.run")
    timed_attr(tileattn.kernels.decode._decode, "launch", "Launcher.launch")
    timed_attr(tileattn.sdpa.SdpaPlan, "run", "SdpaPlan.run")
    timed_attr(torch.nn.functional, "scaled_dot_product_attention", "F.sdpa")
    AttentionInterface.register("p_sdpa", timed_fn(sdpa_attention_forward, "hf attention"))
    AttentionMaskInterface.register("p_sdpa", timed_fn(sdpa_mask, "mask"))
    AttentionInterface.register("p_tileattn", timed_fn(tileattn_hf.tileattn_attention_forward, "hf attention"))
    AttentionMaskInterface.register("p_tileattn", timed_fn(tileattn_hf.padding_mask, "mask"))

    def step(tokens):
        for key in spent:
            spent[key] = 0
        torch.cuda.synchronize()
        wall = time.perf_counter()
        model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - wall, dict(spent)

    found = {v: [] for v in ("p_sdpa", "p_tileattn")}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for impl, rows in found.items():
                model.set_attn_implementation(impl)
                (long, in_long), (short, in_short) = step(33), step(1)
                if round_:
                    rows.append({"step": (long - short) / 32e-3,
                                 **{k: (in_long[k] - in_short[k]) / 32 * (1 if k == "misses" else 1e6)
                                    for k in in_long}})
    print(f"generate B=1 prompt={prompt}, per decode step (median of {rounds} interleaved rounds): step ms; "
          "us (32 layers) in the attention function, in the mask function, in the attention function's calls of new "
          "shapes, and inclusive us in each function below it")
    for impl, rows in found.items():
        print(f"  {impl}: " + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f}" for k in rows[0]))


def probe_prefill_gpu(prompt=512):
    """LLaMA-7B prefill (B = 1, GQA 32/8, bf16, no cache) with sdpa and with tileattn: wall ms (median of 7
    interleaved rounds), and from the profiler the GPU time per kernel name and in total, so a gap between the two
    reads as GPU work (another kernel, an extra copy) or as host time (same kernels, longer wall)."""
    import statistics
    import time

    from tileattn.bench import e2e

    spec = dict(e2e.MODELS["llama-7b"])
    spec["shape"] = dict(spec["shape"], num_key_value_heads=8)
    model = e2e.build_model(spec, torch.device("cuda"))
    ids = torch.randint(3, 32000, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()

    def forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    walls = {"sdpa": [], "tileattn": []}
    for round_ in range(8):
        for impl in walls:
            e2e.use(model, impl)
            torch.cuda.synchronize()
            start = time.perf_counter()
            forward()
            torch.cuda.synchronize()
            if round_:
                walls[impl].append((time.perf_counter() - start) * 1e3)
    for impl in walls:
        e2e.use(model, impl)
        forward()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
        kernels = {}
        for e in prof.events():
            if e.device_type.name == "CUDA":
                kernels[e.name[:70]] = kernels.get(e.name[:70], 0.0) + e.device_time
        total = sum(kernels.values())
        top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
        print(f"prefill {prompt} {impl}: wall {statistics.median(walls[impl]):.2f} ms (rounds "
              f"{', '.join(f'{w:.1f}' for w in walls[impl])}), GPU kernels {total / 1e3:.2f} ms in "
              f"{len(kernels)} names")
        for name, us in top:
            print(f"    {us / 1e3:7.3f} ms  {name}")


def probe_prefill_host(prompt=512, rounds=7):
    """LLaMA-7B prefill (B = 1, GQA 32/8, bf16, no cache), sdpa against tileattn: per forward, the host time until
    ``forward`` returns (no sync), the wall time to the GPU's end, and the host time inside the attention and mask
    functions (summed over the 32 layers); median of interleaved rounds. Then one tileattn forward under
    ``torch.cuda.set_sync_debug_mode("warn")``, which names any operation that synchronizes the device."""
    import statistics
    import time
    import warnings

    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from tileattn.bench import e2e
    from tileattn.integrations import transformers as tileattn_hf

    spec = dict(e2e.MODELS["llama-7b"])
    spec["shape"] = dict(spec["shape"], num_key_value_heads=8)
    model = e2e.build_model(spec, torch.device("cuda"))
    ids = torch.randint(3, 32000, (1, prompt), generator=torch.Generator().manual_seed(0)).cuda()
    spent = {}

    def timed(fn, what):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            spent[what] = spent.get(what, 0.0) + time.perf_counter() - start
            return result
        return wrapper

    AttentionInterface.register("p_sdpa", timed(sdpa_attention_forward, "attention"))
    AttentionMaskInterface.register("p_sdpa", timed(sdpa_mask, "mask"))
    AttentionInterface.register("p_tileattn", timed(tileattn_hf.tileattn_attention_forward, "attention"))
    AttentionMaskInterface.register("p_tileattn", timed(tileattn_hf.padding_mask, "mask"))
    import tileattn.api
    import tileattn.sdpa

    # Variant: SdpaPlan calling cuDNN's kernel through its torch builtin (a C binding, no SDPA backend selection).
    plan_run = tileattn.sdpa.SdpaPlan.run
    runs = {"p_tileattn": plan_run}

    def direct_run(self, q, k, v, mask=None):
        if self.kernel != "sdpa_cudnn":
            return plan_run(self, q, k, v, mask)
        return torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, self.causal, False,
                                                         scale=self.scale)[0], None
    runs["p_tileattn_direct"] = direct_run
    AttentionInterface.register("p_tileattn_direct", timed(tileattn_hf.tileattn_attention_forward, "attention"))
    AttentionMaskInterface.register("p_tileattn_direct", timed(tileattn_hf.padding_mask, "mask"))
    chosen_run = [plan_run]
    tileattn.sdpa.SdpaPlan.run = lambda self, *a: chosen_run[0](self, *a)
    # Inclusive host time of the functions below the attention function (module attributes, looked up per call).
    for owner, name in ((tileattn.api, "attention"), (tileattn.api, "_prepare_attention"),
                        (tileattn.sdpa.SdpaPlan, "run"), (torch.nn.functional, "scaled_dot_product_attention"),
                        (torch, "_scaled_dot_product_cudnn_attention"), (torch.Tensor, "contiguous")):
        setattr(owner, name, timed(getattr(owner, name), f"{getattr(owner, '__name__', 'Tensor')}.{name}"))
    q = torch.randn(1, prompt, 32, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(1, prompt, 8, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    chosen_run[0] = direct_run
    direct = tileattn.attention(q, k, v, causal=True)
    chosen_run[0] = plan_run
    print(f"prefill {prompt}: auto's choice {tileattn.explain(q, k, v, causal=True)}; direct cuDNN builtin vs "
          f"F.sdpa max |diff| {(direct.float() - tileattn.attention(q, k, v, causal=True).float()).abs().max():.3g}, "
          f"strides {direct.stride()}")
    found = {"p_sdpa": [], "p_tileattn": [], "p_tileattn_direct": []}
    with torch.no_grad():
        for round_ in range(rounds + 1):
            for impl, rows in found.items():
                model.set_attn_implementation(impl)
                chosen_run[0] = runs.get(impl, plan_run)
                spent.clear()
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(input_ids=ids, use_cache=False)
                host = time.perf_counter() - start
                torch.cuda.synchronize()
                wall = time.perf_counter() - start
                if round_:
                    rows.append({"wall ms": wall * 1e3, "host ms": host * 1e3,
                                 **{f"{k} us": v * 1e6 for k, v in spent.items()}})
        print(f"prefill {prompt}, per forward (median of {rounds} interleaved rounds; us summed over the layers)")
        for impl, rows in found.items():
            keys = sorted({k for r in rows for k in r}, key=lambda k: ("ms" not in k, k))
            print(f"  {impl}: " + ", ".join(f"{k} {statistics.median(r.get(k, 0.0) for r in rows):.1f}"
                                            for k in keys))
        calls = {"F.sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                     enable_gqa=True),
                 "cudnn builtin": lambda: torch._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, True,
                                                                                    False)[0],
                 "cudnn aten op": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False,
                                                                                            0.0, True, False)[0]}
        for _ in range(2):
            for name, fn in calls.items():
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(200):
                    fn()
                print(f"  tight loop, host us per call, {name}: {(time.perf_counter() - start) / 200 * 1e6:.1f}")
        model.set_attn_implementation("p_tileattn")
        chosen_run[0] = plan_run
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(input_ids=ids, use_cache=False)
        torch.cuda.set_sync_debug_mode(0)
        print(f"  syncs in a tileattn prefill forward: {len(caught)}", *{str(w.message)[:200] for w in caught})


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--generate", action="store_true")
    parser.add_argument("--no-gqa", action="store_true")
    parser.add_argument("--decode-gpu", action="store_true")
    parser.add_argument("--routes", action="store_true")
    parser.add_argument("--generate-variants", action="store_true")
    parser.add_argument("--prefill-gpu", action="store_true")
    parser.add_argument("--prefill-host", action="store_true")
    args = parser.parse_args()
    print(torch.__version__, triton.__version__, torch.cuda.get_device_name())
    if not args.no_gqa:
        probe_gqa()
    if args.profile:
        profile_host()
    if args.generate_variants:
        probe_generate_variants()
    if args.routes:
        probe_routes()
    if args.decode_gpu:
        probe_decode_gpu()
    if args.generate:
        probe_generate()
    if args.prefill_gpu:
        probe_prefill_gpu()
    if args.prefill_host:
        probe_prefill_host()
