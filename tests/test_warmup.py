"""tileattn.warmup and `tileattn warmup`: the calls it runs, its refusals, and on the GPU that a model's generate()
after it compiles no Triton kernel."""

import pytest
import torch

from conftest import DEVICE, HAS_CUDA
from tileattn import cli
from tileattn.kernels import launch
from tileattn.warmup import warmup


def _kernel_name(fn):
    return getattr(fn, "__name__", None) or fn.fn.__name__  # a JITFunction, or the interpreter's wrapper


def test_warmup_runs_each_call_of_a_model_on_the_triton_kernels(monkeypatch):
    launched = []
    through_triton = launch.Launcher._launch_through_triton

    def recording(self, prepared, tensors):
        launched.append(_kernel_name(self.fn))
        return through_triton(self, prepared, tensors)

    monkeypatch.setattr(launch.Launcher, "_launch_through_triton", recording)
    warmed = warmup(4, 2, 32, dtype=torch.float16, device=DEVICE, batch_sizes=(2,), prompt_lengths=(40, 47),
                    max_new_tokens=3, paged_block_size=16, backend="triton")
    assert [w.call for w in warmed] == [
        "prefill B=2 S=40", "prefill B=2 S=40, padded batch", "decode B=2 S=40, cache 41..43",
        "paged decode B=2 S=40, pages of 16 (table for 43)",
        "prefill B=2 S=47", "prefill B=2 S=47, padded batch", "decode B=2 S=47, cache 48..50",
        "paged decode B=2 S=47, pages of 16 (table for 50)",
    ]
    assert all(w.backend == "triton" and w.first_s > 0 and w.warm_s > 0 for w in warmed)
    assert "_decode_kernel" in launched
    assert {"_prefill_kernel", "_hopper_attention_kernel"} & set(launched)  # 40 rows per K/V head: a prefill kernel


def test_warmup_reports_the_backend_each_call_ran_on():
    import tileattn

    warmed = warmup(2, 1, 16, dtype=torch.float32, device="cpu", prompt_lengths=(3,), max_new_tokens=2)
    assert [w.call for w in warmed] == ["prefill B=1 S=3", "decode B=1 S=3, cache 4..5"]
    q, k = torch.zeros(1, 2, 1, 16), torch.zeros(1, 1, 5, 16)
    assert warmed[1].backend == tileattn.explain(q, k, k).backend  # a single query row: not causal, as Transformers
    assert [w.call for w in warmup(2, 1, 16, device="cpu", prompt_lengths=(3,), max_new_tokens=0)] == ["prefill B=1 S=3"]
    assert {w.backend for w in warmup(2, 1, 16, device="cpu", prompt_lengths=(3,), max_new_tokens=1,
                                      backend="torch")} == {"torch"}


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=0), "num_heads must be a positive int"),
    (dict(num_kv_heads=3), "must be a multiple of num_kv_heads"),
    (dict(head_dim=16.0), "head_dim must be a positive int"),
    (dict(head_dim_v=-1), "head_dim_v must be a positive int"),
    (dict(batch_sizes=()), "batch_sizes must be a non-empty sequence"),
    (dict(prompt_lengths=(8, 0)), "prompt_lengths must be a non-empty sequence"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
    (dict(paged_block_size=0), "paged_block_size must be a positive int"),
])
def test_warmup_refuses_bad_arguments_naming_them(kwargs, message):
    arguments = dict(num_heads=4, num_kv_heads=2, head_dim=16, device="cpu") | kwargs
    with pytest.raises(ValueError, match=message):
        warmup(**arguments)


@pytest.mark.skipif(HAS_CUDA, reason="the message for machines without a CUDA GPU")
def test_the_command_says_there_is_nothing_to_compile_without_a_gpu(capsys):
    assert cli.main(["warmup", "--heads", "4"]) == 2
    assert "CUDA GPU" in capsys.readouterr().out


def test_the_command_reads_the_shape_from_a_model_config(tmp_path):
    import argparse

    transformers = pytest.importorskip("transformers")
    transformers.LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=2).save_pretrained(tmp_path)

    def shape(model=None, heads=None, kv_heads=None, head_dim=None):
        return cli._warmup_shape(argparse.Namespace(model=model, heads=heads, kv_heads=kv_heads, head_dim=head_dim))

    assert shape(str(tmp_path)) == (6, 2, 16)
    assert shape(str(tmp_path), head_dim=32) == (6, 2, 32)  # a flag given wins over the config
    assert shape(heads=4, head_dim=64) == (4, 4, 64)  # no --kv-heads: as many as query heads
    with pytest.raises(ValueError, match="give --model, or --heads and --head-dim"):
        shape(heads=4)
    with pytest.raises(ValueError, match="cannot read the config"):
        shape(str(tmp_path / "missing"))


def _forget_compiled_kernels():
    """Drop this process's compiled tileattn kernels (Triton's in-memory caches, our launchers' and the prepared
    calls), so that the next launch of each goes through Triton's compile step (which loads from its on-disk cache
    or compiles)."""
    from tileattn import dispatch
    from tileattn.kernels import backward, decode, hopper, prefill

    for module in (prefill, decode, hopper, backward):
        for obj in vars(module).values():
            if isinstance(obj, launch.Launcher):
                obj._kernels.clear()
            if isinstance(getattr(obj, "device_caches", None), dict):
                obj.device_caches.clear()
    dispatch.reset()


@pytest.mark.gpu
def test_generate_after_the_command_compiles_nothing(capsys):
    """The command warms a tiny Llama's shapes (GQA 4/2, head_dim 32, bf16), compiling (or loading) its kernels;
    generate() then compiles none (Triton's post-compile hook sees every compile, loads from the on-disk cache
    included)."""
    transformers = pytest.importorskip("transformers")
    from triton import knobs

    import tileattn.integrations.transformers as integration

    integration.register()
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=128)
    model = transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("tileattn")
    prompt, new_tokens = 37, 40
    compiled = []
    previous = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = lambda *args, **kwargs: compiled.append(kwargs.get("repr", args))
    try:
        _forget_compiled_kernels()
        assert cli.main(["warmup", "--heads", "4", "--kv-heads", "2", "--head-dim", "32", "--prompt-lengths",
                         str(prompt), "--max-new-tokens", str(new_tokens)]) == 0
        assert compiled, "the warmup compiled nothing: the hook does not see compiles, so this test cannot fail"
        assert "decode B=1 S=37, cache 38..77" in capsys.readouterr().out
        compiled.clear()
        ids = torch.randint(0, config.vocab_size, (1, prompt), device="cuda")
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    finally:
        knobs.runtime.jit_post_compile_hook = previous
    assert compiled == []
