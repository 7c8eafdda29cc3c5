"""``tileattn bench e2e``: a LLaMA-7B-shaped model (random weights, bf16) through Transformers with
``attn_implementation`` eager / sdpa / tileattn on one GPU: prefill latency and peak memory at B = 1,
S = 2048 and 4096, and greedy decoding of a left-padded batch compared token by token with sdpa.

Random weights: the figures are about attention's share of a 7B forward, not about text quality. One
model is built and its attention implementation switched in place, so all three run the same weights.
"""

from __future__ import annotations

import torch

from .report import environment, markdown_table, write_results

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
IMPLEMENTATIONS = ("eager", "sdpa", "tileattn")


def build_model(shape=LLAMA_7B):
    import transformers

    from ..integrations import transformers as tileattn_hf

    tileattn_hf.register()
    config = transformers.LlamaConfig(**shape)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval()


def prefill_ms(model, ids, repeats=5):
    """Median ms and peak extra GiB of one forward over ``ids`` (no cache), after a warm-up."""
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            model(input_ids=ids, use_cache=False)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def run(out_dir, *, seqlens=(2048, 4096), generate_batch=8, new_tokens=32, progress=print):
    env = environment()
    model = build_model()
    rows = []
    for s in seqlens:
        ids = torch.randint(0, LLAMA_7B["vocab_size"], (1, s), device="cuda")
        for impl in IMPLEMENTATIONS:
            model.set_attn_implementation(impl)
            ms, gib = prefill_ms(model, ids)
            rows.append(dict(kind="prefill", impl=impl, batch=1, seqlen=s, ms=ms, peak_extra_gib=gib))
            progress(f"prefill S={s} {impl:>8}: {ms:.1f} ms, +{gib:.2f} GiB")
    # Greedy decoding of left-padded prompts: tileattn's tokens against sdpa's.
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(16, 65, (generate_batch,), generator=gen).tolist()
    longest = max(lengths)
    ids = torch.randint(3, LLAMA_7B["vocab_size"], (generate_batch, longest), generator=gen).cuda()
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, longest - n:] = 1
    tokens = {}
    for impl in IMPLEMENTATIONS:
        model.set_attn_implementation(impl)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        tokens[impl] = out[:, longest:]
    # Free-running greedy decoding compounds any rounding difference once a near-tie flips, so also run every
    # implementation teacher-forced on sdpa's sequence and compare its logits and argmax position by position.
    sequence = torch.cat([ids, tokens["sdpa"]], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens["sdpa"])], 1)
    logits = {}
    for impl in IMPLEMENTATIONS:
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits[impl] = model(input_ids=sequence, attention_mask=full_mask, use_cache=False).logits[:, longest - 1:-1]
    for impl in ("eager", "tileattn"):
        free = (tokens[impl] == tokens["sdpa"]).float().mean().item()
        forced = (logits[impl].argmax(-1) == logits["sdpa"].argmax(-1)).float().mean().item()
        diff = (logits[impl].float() - logits["sdpa"].float()).abs().max().item()
        rows.append(dict(kind="generate", impl=f"{impl} vs sdpa", batch=generate_batch, new_tokens=new_tokens,
                         prompt_lengths=lengths, free_running_same=free, teacher_forced_argmax_same=forced,
                         teacher_forced_max_abs_logit_diff=diff))
        progress(f"{impl} vs sdpa: free-running tokens same {free:.1%}; teacher-forced argmax same {forced:.1%}, "
                 f"max |logit diff| {diff:.3g}")
    by = {(r["impl"], r["seqlen"]): r for r in rows if r["kind"] == "prefill"}
    table = markdown_table(
        ["S", *(f"{i} ms" for i in IMPLEMENTATIONS), "speedup vs sdpa", "speedup vs eager",
         *(f"{i} +GiB" for i in IMPLEMENTATIONS)],
        [[s, *(by[i, s]["ms"] for i in IMPLEMENTATIONS), by["sdpa", s]["ms"] / by["tileattn", s]["ms"],
          by["eager", s]["ms"] / by["tileattn", s]["ms"], *(by[i, s]["peak_extra_gib"] for i in IMPLEMENTATIONS)]
         for s in seqlens])
    agreement = markdown_table(
        ["vs sdpa", "free-running greedy tokens same", "teacher-forced argmax same", "teacher-forced max |logit diff|"],
        [[r["impl"], r["free_running_same"], r["teacher_forced_argmax_same"], r["teacher_forced_max_abs_logit_diff"]]
         for r in rows if r["kind"] == "generate"])
    note = (f"LLaMA-7B shape (32 layers, 32 heads, hidden 4096), random weights, bf16, B = 1 prefill, median of 5.\n\n"
            f"Greedy decoding of {generate_batch} left-padded prompts (lengths {lengths}), {new_tokens} new tokens, "
            "compared with sdpa; eager's agreement with sdpa is the noise floor of bf16 rounding on this model:\n\n"
            + agreement + "\n")
    return write_results(out_dir, "e2e", env, rows, note + table)
