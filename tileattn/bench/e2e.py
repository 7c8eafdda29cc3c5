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
implementation switched in place, so all implementations run the same weights. On CPU each measurement
runs in a fresh process, so that the resident-memory high-water mark measures that run alone.
"""

from __future__ import annotations

import contextlib
import resource
import time

import torch

from .report import Progress, environment, in_fresh_process, markdown_table, write_results

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


class TooLargeError(RuntimeError):
    """The model does not fit on the device (the message says how much it needs)."""


def parameter_bytes(shape, dtype) -> int:
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i
    return (n * per_layer + 2 * v * h) * torch.finfo(dtype).bits // 8


def kv_cache_bytes(shape, dtype, tokens) -> int:
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * tokens * torch.finfo(dtype).bits // 8


def check_fits(spec, device) -> None:
    """Raise :class:`TooLargeError` with the figures when the model and its largest phase cannot fit."""
    if device.type != "cuda":
        return
    need = (parameter_bytes(spec["shape"], spec["dtype"])
            + kv_cache_bytes(spec["shape"], spec["dtype"], spec["requests"] * (spec["prompt"] + spec["new_tokens"])))
    need = int(need * 1.25)  # activations, the allocator's slack
    free, total = torch.cuda.mem_get_info(device)
    if need > free:
        raise TooLargeError(f"this model needs about {need / 2**30:.0f} GiB (weights and the KV cache of "
                            f"{spec['requests']} requests); {torch.cuda.get_device_name(device)} has "
                            f"{free / 2**30:.0f} of {total / 2**30:.0f} GiB free. Try `--model llama-tiny`.")


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


class Peak:
    """Peak extra memory of a block: CUDA allocator stats, or on CPU the resident-set high-water mark
    (meaningful in a fresh process only, which is how the CPU suite runs)."""

    def __init__(self, device):
        self.device, self.gib = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/statm") as f:
                self.base = int(f.read().split()[1]) * resource.getpagesize()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gib = (torch.cuda.max_memory_allocated() - self.base) / 2**30
        else:
            self.gib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base) / 2**30


def timed(fn, device, repeats):
    """Median ms of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def measure(model, spec, phase, device) -> dict:
    """One phase for the model's current attention: ``("prefill", S)`` or ``("requests",)``."""
    vocab = spec["shape"]["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    repeats = 5 if device.type == "cuda" else 2
    if phase[0] == "prefill":
        ids = torch.randint(0, vocab, (1, phase[1]), generator=gen).to(device)
        with torch.no_grad(), Peak(device) as peak:
            ms = timed(lambda: model(input_ids=ids, use_cache=False), device, repeats)
        return dict(ms=ms, peak_extra_gib=peak.gib)
    from transformers import DynamicCache

    ids = torch.randint(0, vocab, (spec["requests"], spec["prompt"]), generator=gen).to(device)
    times = {}

    def serve():  # prefill all prompts, then greedy-decode new_tokens with the KV cache
        cache = DynamicCache()
        start = time.perf_counter()
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        prefilled = time.perf_counter()
        for _ in range(spec["new_tokens"]):
            token = logits.argmax(-1, keepdim=True)
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.update(prefill_ms=(prefilled - start) * 1e3, decode_ms=(time.perf_counter() - prefilled) * 1e3)

    with torch.no_grad(), Peak(device) as peak:
        serve()  # warm-up (and the peak: one serve holds the whole cache)
        serve()
    generated = spec["requests"] * spec["new_tokens"]
    return dict(ms=times["prefill_ms"] + times["decode_ms"], **times,
                tokens_per_s=generated / (times["decode_ms"] / 1e3), peak_extra_gib=peak.gib)


def _measure_fresh_model(model_name, impl, phase):
    spec, device = MODELS[model_name], torch.device("cpu")
    model = build_model(spec, device)
    use(model, impl)
    return measure(model, spec, phase, device)


def measure_fresh(model_name, impl, phase) -> dict:
    """``measure`` on a freshly built model in a fresh process (CPU: so ``ru_maxrss`` is this run's peak)."""
    return in_fresh_process(_measure_fresh_model, model_name, impl, phase)


def run(out_dir, *, model_name=None, implementations=IMPLEMENTATIONS, agreement=None, progress=None):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model_name = model_name or ("llama-7b" if device.type == "cuda" else "llama-tiny")
    spec = MODELS[model_name]
    _transformers()  # before any measurement (on CPU the models are built in child processes)
    check_fits(spec, device)
    if device.type != "cuda":  # the Triton kernels need a GPU (the interpreter is a test tool)
        implementations = tuple(i for i in implementations if i != "tileattn-triton")
    env = environment()
    phases = [("prefill", s) for s in spec["prefill"]] + [("requests",)]
    agreement = device.type == "cuda" if agreement is None else agreement
    progress = progress or Progress(len(phases) * len(implementations) + agreement, "e2e")
    model = build_model(spec, device) if device.type == "cuda" else None
    rows = []
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C keeps what was measured
        for phase in phases:
            for impl in implementations:
                try:
                    if model is not None:
                        use(model, impl)
                        row = measure(model, spec, phase, device)
                    else:
                        row = measure_fresh(model_name, impl, phase)
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    row = dict(ms=None, peak_extra_gib=None, error="out of memory")
                row.update(kind=phase[0], impl=impl, batch=1 if phase[0] == "prefill" else spec["requests"],
                           seqlen=phase[1] if phase[0] == "prefill" else spec["prompt"])
                rows.append(row)
                progress.step(f"{phase[0]} {row['batch']}x{row['seqlen']} {impl}: "
                              + (f"{row['ms']:.1f} ms, +{row['peak_extra_gib']:.2f} GiB" if row["ms"] else "OOM"))
        if agreement:
            rows += greedy_agreement(model, spec, device)
            progress.step("greedy agreement with sdpa")
    return write_results(out_dir, "e2e", env, rows, summarize(rows, spec, model_name))


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
    tokens, logits, generate_ms = {}, {}, {}
    impls = ("sdpa", "eager", "tileattn", "tileattn-triton")
    for impl in impls:
        use(model, impl)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            generate_ms[impl] = timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                                                             do_sample=False, pad_token_id=0), device, 3)
        tokens[impl] = out[:, longest:]
    sequence = torch.cat([ids, tokens["sdpa"]], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens["sdpa"])], 1)
    for impl in impls:
        use(model, impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=sequence, attention_mask=full_mask, use_cache=False).logits[:, longest - 1:-1]
    rows = []
    for impl in impls[1:]:
        rows.append(dict(kind="generate", impl=f"{impl} vs sdpa", batch=batch, new_tokens=new_tokens,
                         prompt_lengths=lengths, generate_ms=generate_ms[impl], sdpa_generate_ms=generate_ms["sdpa"],
                         free_running_same=(tokens[impl] == tokens["sdpa"]).float().mean().item(),
                         teacher_forced_argmax_same=(logits[impl].argmax(-1) == logits["sdpa"].argmax(-1))
                         .float().mean().item(),
                         teacher_forced_max_abs_logit_diff=(logits[impl].float() - logits["sdpa"].float())
                         .abs().max().item()))
    return rows


def summarize(rows, spec, model_name) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in rows if r["kind"] != "generate"))
    by = {(r["kind"], r["seqlen"], r["impl"]): r for r in rows if r["kind"] != "generate"}

    def ratio(a, b):
        return None if not a or not b else a / b

    table = []
    for kind, s in dict.fromkeys((r["kind"], r["seqlen"]) for r in rows if r["kind"] != "generate"):
        get = {i: by.get((kind, s, i), {}) for i in impls}
        what = f"prefill, 1 x {s} tokens" if kind == "prefill" else (
            f"{spec['requests']} requests x {s} tokens + {spec['new_tokens']} decoded")
        ours = get.get("tileattn", {}).get("ms")
        table.append([what, *(get[i].get("ms") for i in impls), ratio(get.get("eager", {}).get("ms"), ours),
                      ratio(get.get("sdpa", {}).get("ms"), ours), *(get[i].get("peak_extra_gib") for i in impls)])
    headers = ["workload", *(f"{i} ms" for i in impls), "tileattn speedup vs eager", "tileattn speedup vs sdpa",
               *(f"{i} +GiB" for i in impls)]
    parts = [f"Model: {model_name} ({spec['label']}), random weights. ms: median wall time; +GiB: peak memory "
             "beyond the weights (and inputs) during the run.\n\n" + markdown_table(headers, table)]
    serving = [[r["impl"], r.get("prefill_ms"), r.get("decode_ms"), r.get("tokens_per_s")]
               for r in rows if r["kind"] == "requests"]
    if serving:
        parts.append(f"Concurrent requests: prefill of all prompts, then {spec['new_tokens']} greedy decode steps "
                     "with the KV cache (generated tokens per second of decode):\n\n"
                     + markdown_table(["implementation", "prefill ms", "decode ms", "tokens/s"], serving))
    gen = [r for r in rows if r["kind"] == "generate"]
    if gen:
        parts.append(f"Greedy decoding of {gen[0]['batch']} left-padded prompts (lengths {gen[0]['prompt_lengths']}), "
                     f"{gen[0]['new_tokens']} new tokens, against sdpa; eager's agreement is the rounding noise floor:\n\n"
                     + markdown_table(["vs sdpa", "free-running greedy tokens same", "teacher-forced argmax same",
                                       "teacher-forced max |logit diff|", "generate() ms", "sdpa generate() ms"],
                                      [[r["impl"], r["free_running_same"], r["teacher_forced_argmax_same"],
                                        r["teacher_forced_max_abs_logit_diff"], r.get("generate_ms"),
                                        r.get("sdpa_generate_ms")] for r in gen]))
    return "\n".join(parts)
