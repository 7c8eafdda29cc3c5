"""Transformers generate() with an FP8 KV cache against the bf16 one, through attn_implementation="tileattn" (issue 16).

    PYTHONPATH=. python benchmarks/fp8/generate.py --out DIR [--shapes 1x4096,8x4096,32x1024]

A LLaMA-7B-shaped model (random weights, GQA 32/8, bf16; on a CPU the tiny 2-layer model, fp32) runs greedy
decoding from random prompts. Per (batch, prompt): decode ms per step ((time of N + 1 new tokens - time of 1) / N,
prefill excluded; median of interleaved rounds) with Transformers' DynamicCache and with
:class:`tileattn.integrations.transformers_fp8.FP8KVCache` per token and per tensor; the cache's bytes on the
device after the run; and the teacher-forced top-1 agreement of each fp8 cache with the bf16 one (the bf16 greedy
continuation fed token by token through the fp8 cache). Prints a markdown table, writes ``fp8_generate.md`` and
``fp8_generate.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from tileattn.bench import e2e
from tileattn.bench.overhead import wall_ms
from tileattn.bench.report import environment
from tileattn.integrations.transformers_fp8 import FP8KVCache

NEW_TOKENS = 32
ROUNDS = 3
CACHES = ("bf16", "fp8 token", "fp8 tensor")


def make_cache(name, model):
    if name == "bf16":
        import transformers

        return transformers.DynamicCache(config=model.config)
    return FP8KVCache(model.config, granularity=name.split()[1])


def cache_bytes(cache) -> int:
    if isinstance(cache, FP8KVCache):
        return cache.memory_bytes()
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(model, ids, device, kwarg):
    """``{cache: (ms per step, bytes, agreement)}`` for one batch of prompts."""
    def generate(name, tokens):
        cache = make_cache(name, model)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 **{kwarg: cache}, return_dict_in_generate=True, output_logits=True)
        return out, cache

    steps = {name: [] for name in CACHES}
    for name in CACHES:
        generate(name, 2)  # warm up (compiles the kernels of this shape)
    for _ in range(ROUNDS):
        for name in CACHES:
            long = wall_ms(lambda: generate(name, NEW_TOKENS + 1), device)
            short = wall_ms(lambda: generate(name, 1), device)
            steps[name].append((long - short) / NEW_TOKENS)
    reference, bf16_cache = generate("bf16", NEW_TOKENS)
    results = {"bf16": (statistics.median(steps["bf16"]), cache_bytes(bf16_cache), 1.0)}
    expected = torch.stack(reference.logits).argmax(-1)  # [steps, B]
    for name in CACHES[1:]:
        cache, agree, tokens = make_cache(name, model), [], ids
        with torch.no_grad():
            for step in range(NEW_TOKENS):
                logits = model(input_ids=tokens, **{kwarg: cache}, use_cache=True).logits[:, -1]
                agree.append((logits.argmax(-1) == expected[step]).float().mean().item())
                tokens = reference.sequences[:, ids.shape[1] + step:ids.shape[1] + step + 1]
        results[name] = (statistics.median(steps[name]), cache_bytes(cache), sum(agree) / len(agree))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--shapes", default=None, help="batch x prompt pairs, e.g. 1x4096,8x4096")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = dict(e2e.MODELS["llama-7b" if device.type == "cuda" else "llama-tiny"])
    spec["shape"] = dict(spec["shape"], num_key_value_heads=spec["shape"]["num_attention_heads"] // 4)
    default = "1x4096,8x4096,32x1024" if device.type == "cuda" else "2x64"
    shapes = [tuple(int(x) for x in s.split("x")) for s in (args.shapes or default).split(",")]
    model = e2e.build_model(spec, device, implementation="tileattn")
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None
    kwarg = e2e.cache_argument(model)
    rows = []
    for batch, prompt in shapes:
        ids = torch.randint(3, spec["shape"]["vocab_size"], (batch, prompt),
                            generator=torch.Generator().manual_seed(0)).to(device)
        results = measure(model, ids, device, kwarg)
        base_ms, base_bytes, _ = results["bf16"]
        for name, (ms, nbytes, agree) in results.items():
            rows.append(dict(batch=batch, prompt=prompt, cache=name, ms_per_step=ms, vs_bf16=ms / base_ms,
                             cache_gib=nbytes / 2**30, memory_vs_bf16=nbytes / base_bytes, top1_agreement=agree))
        print(f"B={batch} prompt={prompt}: " + ", ".join(f"{n} {r[0]:.2f} ms" for n, r in results.items()), flush=True)
    env = environment()
    lines = [f"# generate() with an FP8 KV cache, {env.get('device', device.type)}", "",
             f"{'LLaMA-7B shape, GQA 32/8, bf16' if device.type == 'cuda' else 'tiny 2-layer LLaMA shape, fp32'}, "
             f"random weights; {NEW_TOKENS} new tokens, median of {ROUNDS} rounds; torch {torch.__version__}. "
             "bf16: Transformers' DynamicCache in the model's dtype. Cache bytes: what is allocated after the run "
             "(FP8KVCache's capacity grows in 256-token steps; per-token scales included).", "",
             "| B | prompt | cache | ms/step | vs bf16 | cache GiB | memory vs bf16 | top-1 agreement |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['prompt']} | {r['cache']} | {r['ms_per_step']:.2f} | {r['vs_bf16']:.2f}x | "
              f"{r['cache_gib']:.3f} | {r['memory_vs_bf16']:.2f}x | {r['top1_agreement']:.3f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fp8_generate.md").write_text("\n".join(lines) + "\n")
    (args.out / "fp8_generate.json").write_text(json.dumps(dict(environment=env, rows=rows), indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
