"""Host time of the Transformers attention functions inside a model, with no GPU: Transformers' ``sdpa`` against
``tileattn``, kernels replaced by a stub that returns a preallocated output, so what is timed is the Python around
the kernel call (argument handling, tileattn's signature lookup and prepared plan) in a model's real call sequence,
where caches are colder than in a tight loop.

A tiny LLaMA (32 layers, GQA 8/2, head_dim 128) runs on CPU tensors; tileattn's prepared calls are given the SDPA
plan they get on CUDA (on CPU, ``auto`` runs PyTorch's fused CPU kernel without a plan). Both functions sit
behind the same timing wrapper. The output copy both make (``transpose(1, 2).contiguous()``) is included.

Usage: python benchmarks/probe_host_cpu.py [--tokens 16] [--rounds 4]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM
from transformers.integrations import sdpa_attention
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from tileattn import api, sdpa
from tileattn.integrations import transformers as integration

LAYERS, HQ, HKV, D = 32, 8, 2, 128


def main(tokens: int, rounds: int, forwards: int = 15) -> None:
    integration.register()
    config = LlamaConfig(hidden_size=HQ * D, intermediate_size=256, num_hidden_layers=LAYERS, num_attention_heads=HQ,
                         num_key_value_heads=HKV, head_dim=D, vocab_size=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    stub_out = torch.zeros(1, HQ, tokens, D)
    sdpa._cuda_kernel = lambda *args, **kwargs: stub_out  # what SdpaPlan.run calls
    F.scaled_dot_product_attention = lambda *args, **kwargs: stub_out  # what Transformers' sdpa function calls
    spent = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            spent[0] += time.perf_counter() - start
            return result
        return wrapper

    for name, fn, mask_fn in (("sdpa", sdpa_attention.sdpa_attention_forward, sdpa_mask),
                              ("tileattn", integration.tileattn_attention_forward, integration.padding_mask)):
        AttentionInterface.register(f"timed_{name}", timed(fn))
        AttentionMaskInterface.register(f"timed_{name}", mask_fn)
    ids = torch.randint(0, config.vocab_size, (1, tokens))
    per_layer: dict[str, list[float]] = {}
    with torch.no_grad():
        for name in ("sdpa", "tileattn") * rounds:
            model.set_attn_implementation(f"timed_{name}")
            model(ids)  # tileattn: validates and caches the call's signature
            if name == "tileattn":
                for key, call in list(api._prepared.items()):
                    if call.backend.startswith("sdpa") and call.plan is None:  # the plan a CUDA call gets
                        api._prepared[key] = call._replace(plan=sdpa.SdpaPlan(call.backend, True, call.scale))
            samples = []
            for _ in range(forwards):
                spent[0] = 0.0
                model(ids)
                samples.append(spent[0] / LAYERS * 1e6)
            per_layer.setdefault(name, []).append(sorted(samples)[forwards // 2])
    print(f"us per layer in the attention function (median of {forwards} forwards per round; {tokens} tokens, "
          f"torch {torch.__version__}, CPU)")
    for name, values in per_layer.items():
        print(f"  {name:9s} " + "  ".join(f"{v:6.2f}" for v in values))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    main(args.tokens, args.rounds)
