"""``tileattn bench e2e``: the article's table, measured. A LLaMA-shaped model (random weights) through
Transformers with ``attn_implementation`` eager / sdpa / tileattn:

- prefill latency and peak extra memory at B = 1 and each prompt length (512, 2048 and, on a GPU, 4096 tokens);
- "100 concurrent requests": 100 prompts of 512 tokens prefilled together, then greedy-decoded for a fixed
  number of tokens with the KV cache; time, generated tokens per second and peak extra memory;
- on a GPU also greedy decoding of a left-padded batch compared token by token with sdpa (and
  teacher-forced, where the bf16 noise floor is eager's own agreement with sdpa).

``tileattn`` runs the integration with ``backend="auto"`` (what users get; plain prefill calls may go to
an SDPA kernel where the calibration says it is faster) and ``tileattn-triton`` forces our kernels.
Models: ``llama-7b`` (the default on a GPU; 32 layers, hidden 4096, bf16) and ``llama-tiny`` (the default
without a GPU: a small CPU configuration, fp32, 16 requests of 256 tokens). Random weights: the figures
are about attention's share of a forward, not text quality. One model is built and its attention
implementation switched in place, so all implementations run the same weights, interleaved round-robin
in every repeat (``report.interleaved_timings``). Peak memory is measured on each implementation's first
call: from the CUDA allocator on a GPU; on CPU in a fresh process per implementation, so that the
resident-memory high-water mark measures that run alone.
"""

from __future__ import annotations

import inspect
import os
import statistics
import time

import torch

from .report import (Interruptible, Progress, ResidentPeak, environment, flag_notes, implausible, in_fresh_process,
                     interleaved_timings, markdown_table, speedup_limit, timing_cell, wall_ms, write_results)

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
LLAMA_TINY = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=4000, max_position_embeddings=4096)
MODELS = {
    "llama-7b": dict(shape=LLAMA_7B, dtype=torch.bfloat16, prefill=(512, 2048, 4096), requests=100, prompt=512,
                     new_tokens=32, label="LLaMA-7B shape, bf16"),
    "llama-tiny": dict(shape=LLAMA_TINY, dtype=torch.float32, prefill=(512, 2048), requests=16, prompt=256,
                       new_tokens=8, label="CPU small configuration: a 2-layer LLaMA-shaped model "
                                           "(hidden 256, 4 heads of 64), fp32, 16 requests of 256 tokens"),
}
IMPLEMENTATIONS = ("eager", "sdpa", "tileattn", "tileattn-triton")
REPEATS = 5  # timed calls per implementation and phase (each implementation is also called once untimed first)
CPU_TIME_LIMIT_S = 30 * 60  # a suite estimated to take longer on a CPU is refused


class TooLargeError(RuntimeError):
    """The model cannot run on this device in its memory, or on a CPU in reasonable time (the message has
    the estimate)."""


def parameter_count(shape) -> int:
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i) + 2 * v * h  # layers, input embedding and LM head (untied)


def parameter_bytes(shape, dtype) -> int:
    return parameter_count(shape) * torch.finfo(dtype).bits // 8


def kv_cache_bytes(shape, dtype, tokens) -> int:
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * tokens * torch.finfo(dtype).bits // 8


def forward_flops(shape, tokens: int, context: int) -> tuple[float, float]:
    """(attention FLOPs, other FLOPs) of ``tokens`` new tokens of one sequence attending to ``context``
    keys: scores and weighted sum ``4 * tokens * context * hidden`` per layer, not halved for causal (an upper
    bound), against ``2 * tokens`` per weight that multiplies (all but the input embedding)."""
    h = shape["hidden_size"]
    attention = 4 * tokens * context * h * shape["num_hidden_layers"]
    return attention, 2 * tokens * (parameter_count(shape) - shape["vocab_size"] * h)


def suite_flops(spec) -> float:
    """All the model FLOPs one implementation does in the suite (warm-up, repeats, the memory run)."""
    calls = REPEATS + 2
    prefill = sum(sum(forward_flops(spec["shape"], s, s)) for s in spec["prefill"])
    p, n = spec["prompt"], spec["new_tokens"]
    serve = sum(forward_flops(spec["shape"], p, p)) + sum(sum(forward_flops(spec["shape"], 1, p + t)) for t in range(n))
    return calls * (prefill + spec["requests"] * serve)


def cpu_matmul_flops(dtype) -> float:
    """FLOP/s this CPU reaches on a matrix product of ``dtype`` (best of three), for time estimates."""
    a, b = torch.randn(256, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    seconds = min(wall_ms(lambda: a @ b) for _ in range(3)) / 1e3
    return 2 * 256 * 2048 * 2048 / seconds


def check_fits(spec, device, implementations=IMPLEMENTATIONS) -> None:
    """Raise :class:`TooLargeError` with the figures when the model and its largest phase cannot fit in the
    device's memory, or (on a CPU) when the suite would take more than :data:`CPU_TIME_LIMIT_S`."""
    need = (parameter_bytes(spec["shape"], spec["dtype"])
            + kv_cache_bytes(spec["shape"], spec["dtype"], spec["requests"] * (spec["prompt"] + spec["new_tokens"])))
    need = int(need * 1.25)  # activations, the allocator's slack
    what = f"weights and the KV cache of {spec['requests']} requests"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        if need > free:
            raise TooLargeError(f"this model needs about {need / 2**30:.0f} GiB ({what}); "
                                f"{torch.cuda.get_device_name(device)} has {free / 2**30:.0f} of "
                                f"{total / 2**30:.0f} GiB free. Try `--model llama-tiny`.")
        return
    implementations = [i for i in implementations if i != "tileattn-triton"]  # not run on CPU
    rate = cpu_matmul_flops(spec["dtype"])
    seconds = len(implementations) * suite_flops(spec) / rate
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if seconds > CPU_TIME_LIMIT_S or need > available:
        name = str(spec["dtype"]).removeprefix("torch.")
        raise TooLargeError(
            f"{spec['label']}: on this CPU the suite would take at least {_duration(seconds)} "
            f"({suite_flops(spec) / 1e15:.2g} PFLOP per implementation at the {rate / 1e9:.0f} GFLOP/s this CPU "
            f"reaches on {name} matrix products) and about {need / 2**30:.0f} GiB of memory ({what}; "
            f"{available / 2**30:.0f} GiB available). Run it on a CUDA GPU, or run `tileattn bench` without "
            "--model for the small CPU configuration (a minute or two).")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} minutes" if seconds < 7200 else f"{seconds / 3600:.0f} hours"


def _transformers():
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"the e2e suite needs Transformers (pip install 'tileattn[bench]'): {exc}") from None
    return transformers


def build_model(spec, device, implementation="sdpa"):
    transformers = _transformers()

    from ..integrations import transformers as tileattn_hf

    tileattn_hf.register()
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(**spec["shape"]), dtype=spec["dtype"], attn_implementation=implementation)
    return model.eval()


def use(model, impl) -> None:
    """Switch the model's attention to ``impl`` (one of :data:`IMPLEMENTATIONS`)."""
    from ..integrations import transformers as tileattn_hf

    if impl.startswith("tileattn"):
        tileattn_hf.register(backend="triton" if impl == "tileattn-triton" else "auto")
        model.set_attn_implementation("tileattn")
    else:
        model.set_attn_implementation(impl)


def cache_argument(model) -> str:
    """The keyword under which this Transformers version's ``forward`` takes the KV cache: ``cache`` (5.24
    renamed it and deprecates ``past_key_values``, with a FutureWarning per call), else ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Peak:
    """Peak extra memory of a block, ``gib`` after exit: CUDA allocator stats, or on CPU the resident-memory
    high-water mark (``report.ResidentPeak``: meaningful in a fresh process, which is how the CPU suites use it)."""

    def __init__(self, device):
        self.device, self.gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.resident = ResidentPeak().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gib = (torch.cuda.max_memory_allocated() - self.base) / 2**30
        else:
            self.resident.__exit__(*exc)
            self.gib = self.resident.mib / 1024


def workload(model, spec, phase, device, splits=None):
    """A callable running one phase with the model's current attention: ``("prefill", S)``, a forward of one
    S-token prompt, or ``("requests",)``, all prompts prefilled then greedy-decoded with the KV cache;
    the latter appends ``(prefill_ms, decode_ms)`` of each call to ``splits``."""
    vocab = spec["shape"]["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    if phase[0] == "prefill":
        ids = torch.randint(0, vocab, (1, phase[1]), generator=gen).to(device)
        return lambda: model(input_ids=ids, use_cache=False)
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (spec["requests"], spec["prompt"]), generator=gen).to(device)
    cache_kw = cache_argument(model)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def serve():
        cache = DynamicCache()
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, **{cache_kw: cache}).logits[:, -1]
        sync()
        prefilled = time.perf_counter()
        for _ in range(spec["new_tokens"]):
            token = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=token, use_cache=True, **{cache_kw: cache}).logits[:, -1]
        sync()
        if splits is not None:
            splits.append(((prefilled - start) * 1e3, (time.perf_counter() - prefilled) * 1e3))

    return serve


def _peak_in_fresh_process(model_name, impl, phase):
    spec, device = MODELS[model_name], torch.device("cpu")
    model = build_model(spec, device)
    use(model, impl)
    call = workload(model, spec, phase, device)
    with torch.no_grad(), Peak(device) as peak:
        call()
    return peak.gib


def peak_gib(model, model_name, impl, phase, device) -> float | None:
    """Peak extra GiB of ``impl``'s first call of ``phase`` (None if it runs out of GPU memory). On a GPU
    this is also the implementation's warm-up; on CPU it runs in a fresh process."""
    if device.type != "cuda":
        return in_fresh_process(_peak_in_fresh_process, model_name, impl, phase)
    use(model, impl)
    try:
        with torch.no_grad(), Peak(device) as peak:
            workload(model, MODELS[model_name], phase, device)()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    return peak.gib


def measure_phase(model, model_name, phase, device, implementations, progress) -> list[dict]:
    """Rows of one phase: each implementation's peak memory, then all of them timed interleaved."""
    spec = MODELS[model_name]
    label = f"{phase[0]} " + (f"1x{phase[1]}" if phase[0] == "prefill" else f"{spec['requests']}x{spec['prompt']}")
    peaks = {}
    for impl in implementations:
        peaks[impl] = peak_gib(model, model_name, impl, phase, device)
        progress.step(f"{label} {impl}: " + ("out of memory" if peaks[impl] is None else f"+{peaks[impl]:.2f} GiB"))
    runnable = [i for i in implementations if peaks[i] is not None]
    splits = {impl: [] for impl in runnable}
    calls = {impl: workload(model, spec, phase, device, splits[impl]) for impl in runnable}
    with torch.no_grad():
        timings = interleaved_timings(calls, REPEATS, before=lambda impl: use(model, impl),
                                      warmup=0 if device.type == "cuda" else 1)
    progress.step(f"{label} timed: " + ", ".join(f"{i} {t.median:.1f} ms" + (" (noisy)" if t.noisy else "")
                                                 for i, t in timings.items()))
    return phase_rows(spec, phase, peaks, timings, splits)


def phase_rows(spec, phase, peaks, timings, splits) -> list[dict]:
    """One row per implementation of ``peaks`` (peak GiB, None when out of memory): its timing fields (see
    ``report.Timing.fields``) and, for the requests phase, the medians of the prefill / decode ``splits`` of
    its timed calls and the decode's generated tokens per second."""
    batch, seqlen = (1, phase[1]) if phase[0] == "prefill" else (spec["requests"], spec["prompt"])
    rows = []
    for impl, peak in peaks.items():
        row = dict(kind=phase[0], impl=impl, batch=batch, seqlen=seqlen, peak_extra_gib=peak)
        if impl in timings:
            row.update(timings[impl].fields("ms"))
            if phase[0] == "requests":
                timed = splits[impl][-len(timings[impl].samples):]  # not the warm-up
                row.update(prefill_ms=statistics.median(p for p, _ in timed),
                           decode_ms=statistics.median(d for _, d in timed))
                row["tokens_per_s"] = spec["requests"] * spec["new_tokens"] / (row["decode_ms"] / 1e3)
        else:
            row.update(ms=None, error="out of memory")
        rows.append(row)
    return rows


def run(out_dir, *, model_name=None, implementations=IMPLEMENTATIONS, agreement=None, progress=None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_name = model_name or ("llama-7b" if device.type == "cuda" else "llama-tiny")
    spec = MODELS[model_name]
    _transformers()  # before any measurement
    if device.type != "cuda":  # the Triton kernels need a GPU (the interpreter is a test tool)
        implementations = tuple(i for i in implementations if i != "tileattn-triton")
    check_fits(spec, device, implementations)
    env = environment()
    phases = [("prefill", s) for s in spec["prefill"]] + [("requests",)]
    agreement = device.type == "cuda" if agreement is None else agreement
    progress = progress or Progress(len(phases) * (len(implementations) + 1) + agreement, "e2e")
    progress.note(f"e2e: {model_name} ({spec['label']}) on {env['device']}")
    model = build_model(spec, device)
    rows = []
    with Interruptible() as run_state:  # Ctrl-C keeps what was measured
        for phase in phases:
            rows += measure_phase(model, model_name, phase, device, implementations, progress)
        if agreement:
            rows += greedy_agreement(model, spec, device)
            progress.step("greedy agreement with sdpa")
    mark_implausible(rows, spec)
    return write_results(out_dir, "e2e", env, rows, summarize(rows, spec, model_name), run_state.interrupted)


def greedy_agreement(model, spec, device, batch=8, new_tokens=32) -> list[dict]:
    """Greedy decoding of left-padded prompts, each implementation's tokens against sdpa's. Free-running
    decoding compounds any rounding difference once a near-tie flips, so every implementation also runs
    teacher-forced on sdpa's sequence and its argmax is compared position by position."""
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 65, (batch,), generator=gen).tolist()
    longest = max(lengths)
    ids = torch.randint(3, spec["shape"]["vocab_size"], (batch, longest), generator=gen).to(device)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, longest - n:] = 1
    impls = ("sdpa", "eager", "tileattn", "tileattn-triton")

    def generate():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    tokens, logits = {}, {}
    with torch.no_grad():
        for impl in impls:  # also each implementation's warm-up for the timings
            use(model, impl)
            tokens[impl] = generate()[:, longest:]
        generate_ms = interleaved_timings(dict.fromkeys(impls, generate), 3, before=lambda impl: use(model, impl),
                                          warmup=0)
    sequence = torch.cat([ids, tokens["sdpa"]], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens["sdpa"])], 1)
    for impl in impls:
        use(model, impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=sequence, attention_mask=full_mask, use_cache=False).logits[:, longest - 1:-1]
    rows = []
    for impl in impls[1:]:
        rows.append(dict(kind="generate", impl=f"{impl} vs sdpa", batch=batch, new_tokens=new_tokens,
                         prompt_lengths=lengths, **generate_ms[impl].fields("generate_ms"),
                         sdpa_generate_ms=generate_ms["sdpa"].median,
                         free_running_same=(tokens[impl] == tokens["sdpa"]).float().mean().item(),
                         teacher_forced_argmax_same=(logits[impl].argmax(-1) == logits["sdpa"].argmax(-1))
                         .float().mean().item(),
                         teacher_forced_max_abs_logit_diff=(logits[impl].float() - logits["sdpa"].float())
                         .abs().max().item()))
    return rows


def mark_implausible(rows, spec) -> None:
    """Set ``implausible`` (the baselines concerned) on each tileattn row whose speedup over eager or sdpa is,
    either way, beyond what a change of attention can explain at that size (``report.speedup_limit``)."""
    by = {(r["kind"], r["seqlen"], r["impl"]): r for r in rows if r["kind"] != "generate"}
    for (kind, seqlen, impl), ours in by.items():
        if impl != "tileattn" or not ours.get("ms"):
            continue
        limit = speedup_limit(*forward_flops(spec["shape"], seqlen, seqlen))
        baseline_ms = {b: by.get((kind, seqlen, b), {}).get("ms") for b in ("eager", "sdpa")}
        baselines = [b for b, theirs in baseline_ms.items() if theirs and implausible(theirs / ours["ms"], limit)]
        if baselines:
            ours.update(implausible=baselines, speedup_limit=limit)


def summarize(rows, spec, model_name) -> str:
    """The markdown: the article's table (median and interquartile range of each implementation, tileattn's
    speedups, peak memory), the serving split, the agreement table. Noisy timings and implausible speedups
    (see :func:`mark_implausible`) are marked in the table and explained under it."""
    measured = [r for r in rows if r["kind"] != "generate"]
    impls = list(dict.fromkeys(r["impl"] for r in measured))
    by = {(r["kind"], r["seqlen"], r["impl"]): r for r in measured}

    def speedup(ours, baseline):
        theirs = by.get((ours["kind"], ours["seqlen"], baseline), {}).get("ms")
        if not theirs or not ours.get("ms"):
            return None
        flag = f" (implausible: > {ours['speedup_limit']:.1f}x)" if baseline in ours.get("implausible", ()) else ""
        return f"{theirs / ours['ms']:.3g}{flag}"

    table = []
    for kind, s in dict.fromkeys((r["kind"], r["seqlen"]) for r in measured):
        get = {i: by.get((kind, s, i), {}) for i in impls}
        what = f"prefill, 1 x {s} tokens" if kind == "prefill" else (
            f"{spec['requests']} requests x {s} tokens + {spec['new_tokens']} decoded")
        ours = get.get("tileattn") or {"kind": kind, "seqlen": s}
        table.append([what, *(timing_cell(get[i].get("ms"), get[i].get("ms_q1"), get[i].get("ms_q3"),
                                          get[i].get("noisy", False)) for i in impls),
                      speedup(ours, "eager"), speedup(ours, "sdpa"), *(get[i].get("peak_extra_gib") for i in impls)])
    headers = ["workload", *(f"{i} ms" for i in impls), "tileattn speedup vs eager", "tileattn speedup vs sdpa",
               *(f"{i} +GiB" for i in impls)]
    parts = [f"Model: {model_name} ({spec['label']}), random weights. ms: wall time; +GiB: peak memory beyond "
             "the weights (and inputs) during the run.\n\n" + markdown_table(headers, table)
             + "\n" + flag_notes(rows, "tileattn bench e2e", REPEATS)]
    serving = [[r["impl"], r.get("prefill_ms"), r.get("decode_ms"), r.get("tokens_per_s")]
               for r in measured if r["kind"] == "requests"]
    if serving:
        parts.append(f"Concurrent requests: prefill of all prompts, then {spec['new_tokens']} greedy decode steps "
                     "with the KV cache (medians of the same repeats; generated tokens per second of decode):\n\n"
                     + markdown_table(["implementation", "prefill ms", "decode ms", "tokens/s"], serving))
    gen = [r for r in rows if r["kind"] == "generate"]
    if gen:
        parts.append(f"Greedy decoding of {gen[0]['batch']} left-padded prompts (lengths {gen[0]['prompt_lengths']}), "
                     f"{gen[0]['new_tokens']} new tokens, against sdpa; eager's agreement is the rounding noise floor:\n\n"
                     + markdown_table(["vs sdpa", "free-running greedy tokens same", "teacher-forced argmax same",
                                       "teacher-forced max |logit diff|", "generate() ms", "sdpa generate() ms"],
                                      [[r["impl"], r["free_running_same"], r["teacher_forced_argmax_same"],
                                        r["teacher_forced_max_abs_logit_diff"],
                                        timing_cell(r["generate_ms"], r["generate_ms_q1"], r["generate_ms_q3"],
                                                    r["noisy"]), r["sdpa_generate_ms"]] for r in gen]))
    return "\n".join(parts)
