"""torch.compile(fullgraph=True) through every entry point (the Triton launches are custom ops with fake
implementations), and CUDA-graph capture of a decode step on the GPU."""

import pytest
import torch

import tileattn
from tileattn.testing import capture_graph, random_qkv

from conftest import DEVICE

# aot_eager keeps CPU CI fast; the GPU test below compiles with Inductor.
COMPILE_BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=COMPILE_BACKEND)


def test_attention_compiles_without_graph_breaks():
    q, k, v = random_qkv(2, 4, 2, 40, 56, 32, dtype=torch.float16, device=DEVICE)
    mask = torch.rand(2, 1, 40, 56, device=DEVICE) > 0.1

    def f(q, k, v):
        out, lse = tileattn.attention(q, k, v, causal=True, mask=mask, softcap=4.0, return_lse=True, backend="triton")
        return out.float() * 2, lse

    (out, lse), (ref, ref_lse) = compiled(f)(q, k, v), f(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


@pytest.mark.parametrize("sq", [8, 70], ids=["decode_kernel", "prefill_kernel"])
def test_alibi_and_sinks_compile(sq):
    q, k, v = random_qkv(2, 4, 2, sq, 80, 32, dtype=torch.float16, device=DEVICE)
    slopes, sinks = torch.rand(2, 4, device=DEVICE), torch.randn(4, device=DEVICE)

    def f(q, k, v):
        return tileattn.attention(q, k, v, causal=True, alibi_slopes=slopes, sinks=sinks, return_lse=True,
                                  backend="triton")

    (out, lse), (ref, ref_lse) = compiled(f)(q, k, v), f(q, k, v)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def test_varlen_compiles():
    cu = torch.tensor([0, 7, 30, 31], dtype=torch.int32, device=DEVICE)
    q, k, v = (torch.randn(31, h, 32, device=DEVICE).half() for h in (4, 2, 2))

    def f(q, k, v):
        return tileattn.attention_varlen(q, k, v, cu, cu, 23, 23, causal=True, backend="triton")

    torch.testing.assert_close(compiled(f)(q, k, v), f(q, k, v))


def test_decode_step_with_cache_append_compiles():
    k_cache = torch.randn(2, 2, 64, 32, device=DEVICE).half()
    v_cache = torch.randn(2, 2, 64, 32, device=DEVICE).half()
    seqlens = torch.tensor([10, 40], dtype=torch.int32, device=DEVICE)
    q, k_new, v_new = random_qkv(2, 8, 2, 1, 1, 32, dtype=torch.float16, device=DEVICE)

    def step(q, k_new, v_new, k_cache, v_cache):
        return tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens, k_new=k_new, v_new=v_new,
                                               backend="triton")

    eager_k, eager_v = k_cache.clone(), v_cache.clone()
    expected = step(q, k_new, v_new, eager_k, eager_v)
    got = compiled(step)(q, k_new, v_new, k_cache, v_cache)
    torch.testing.assert_close(got, expected)
    assert torch.equal(k_cache, eager_k) and torch.equal(v_cache, eager_v)  # the append happened once, the same


@pytest.mark.gpu
def test_decode_step_cuda_graph_replay():
    k_cache = torch.randn(4, 8, 1024, 128, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    seqlens = torch.tensor([100, 500, 900, 1000], dtype=torch.int32, device="cuda")
    q = torch.randn(4, 32, 1, 128, device="cuda", dtype=torch.bfloat16)
    step = lambda: tileattn.attention_with_kvcache(q, k_cache, v_cache, seqlens)  # noqa: E731
    expected = step().clone()
    graph, out = capture_graph(step)
    q.copy_(torch.randn_like(q))  # new inputs, same buffers
    graph.replay()
    torch.testing.assert_close(out, step())
    assert not torch.equal(out, expected)


def test_transformers_model_compiles_fullgraph():
    """A whole (tiny) Llama with attn_implementation="tileattn" compiles with fullgraph=True: no break at attention."""
    transformers = pytest.importorskip("transformers")
    import tileattn.integrations.transformers as tileattn_hf

    tileattn_hf.register()
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=97, initializer_range=0.5)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="tileattn").to(DEVICE).eval()
    ids = torch.randint(0, 97, (2, 24), device=DEVICE)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        got = compiled(lambda ids: model(input_ids=ids, use_cache=False).logits)(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
