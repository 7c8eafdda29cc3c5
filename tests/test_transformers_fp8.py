"""FP8KVCache: Transformers generate() over an fp8 KV cache through attn_implementation="tileattn", on tiny models."""

import gc
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tileattn.integrations.transformers as tt  # noqa: E402
from tileattn import quant  # noqa: E402
from tileattn.integrations import transformers_fp8  # noqa: E402
from tileattn.integrations.transformers_fp8 import FP8KVCache  # noqa: E402

from conftest import DEVICE  # noqa: E402
from test_transformers import DECODERS, build, padded_batch  # noqa: E402

tt.register()
FP8 = torch.float8_e4m3fn
# The cache argument's name: ``cache`` from Transformers 5.2x (``past_key_values`` still works there, with a warning).
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaForCausalLM.forward).parameters else "past_key_values"


def real_tokens(t, mask, row):
    """Row ``row`` of a cache tensor ``[B, Hkv, S, D]`` at its real (unpadded) positions: ``[Hkv, n, D]``."""
    return t[row][:, mask[row].bool()]


def expected_stored(keys, mask, granularity):
    """What FP8KVCache stores for a prompt's keys ``[B, Hkv, S, D]`` (mask ``[B, S]``): per row, the quantized real
    tokens; the scales from the real tokens alone (per token, or calibrated over every row's)."""
    rows = [real_tokens(keys, mask, b)[None] for b in range(keys.shape[0])]
    if granularity == "token":
        return [quant.quantize(r, quant.token_scales(r, FP8), FP8)[0] for r in rows]
    scale = quant.calibrate_scales(torch.cat(rows, dim=2), FP8, granularity)
    return [quant.quantize(r, scale, FP8)[0] for r in rows]


@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
@pytest.mark.parametrize("side", ["left", "right", None])
def test_the_prompt_attends_unquantized_and_is_stored_quantized(granularity, side):
    """Prompt logits equal those with Transformers' own cache; every layer stores exactly quant's bytes of the
    real tokens' keys and values, each row's first, and its length."""
    config = DECODERS["llama"]()
    model = build(config, "tileattn")
    if side is None:
        ids = torch.randint(3, config.vocab_size, (2, 11), device=DEVICE)
        mask = torch.ones_like(ids)
    else:
        ids, mask = padded_batch([13, 9, 4], config.vocab_size, side)
    fp8, dynamic = FP8KVCache(model.config, granularity=granularity), transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, **{CACHE: fp8}, use_cache=True).logits
        expected = model(input_ids=ids, attention_mask=mask, **{CACHE: dynamic}, use_cache=True).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)
    assert fp8.get_seq_length() == ids.shape[1]
    for ours, theirs in zip(fp8.layers, dynamic.layers):
        assert ours.lengths.tolist() == mask.sum(1).tolist()
        for stored, source in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            assert stored.dtype == FP8
            for row, want in enumerate(expected_stored(source, mask, granularity)):
                assert torch.equal(stored[row, :, :want.shape[1]].view(torch.uint8), want.view(torch.uint8))


def test_decode_steps_store_each_new_token_and_keep_rows_independent(monkeypatch):
    """Greedy generate over a left-padded batch: each row gives the tokens (and nearly the logits) that its
    sequence gives alone, so the padding is out of the cache; layer 0's stored new keys are quant's bytes of
    the keys Transformers' own cache holds for the same tokens; the cache grows past its first capacity."""
    monkeypatch.setattr(transformers_fp8, "_ROUND", 16)  # a prompt of 10 gets 32 slots: 30 new tokens grow it
    config = DECODERS["llama"]()
    model = build(config, "tileattn")
    ids, mask = padded_batch([10, 6], config.vocab_size, "left")
    kwargs = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                  output_logits=True)
    with torch.no_grad():
        cache = FP8KVCache(model.config)
        batch = model.generate(ids, attention_mask=mask, **{CACHE: cache}, **kwargs)
        assert cache.layers[0].keys.shape[2] > 32 and cache.get_seq_length() == ids.shape[1] + 29
        assert cache.layers[0].lengths.tolist() == [10 + 29, 6 + 29]
        for row in range(2):
            alone_ids = ids[row:row + 1, mask[row].bool()]
            alone = model.generate(alone_ids, **{CACHE: FP8KVCache(model.config)}, **kwargs)
            assert torch.equal(batch.sequences[row, ids.shape[1]:], alone.sequences[0, alone_ids.shape[1]:])
            # Nearly: the batch and the row alone compute keys that differ by fp32 rounding, and where a key lies
            # near an fp8 rounding midpoint that becomes a whole fp8 step in what is stored (~1e-3 in the logits);
            # attending to the padding would move them by far more.
            for step_batch, step_alone in zip(batch.logits, alone.logits):
                torch.testing.assert_close(step_batch[row], step_alone[0], rtol=1e-2, atol=1e-2)
        # Layer 0's keys depend only on the token and its position: Transformers' cache holds the same ones.
        dynamic = transformers.DynamicCache(config=model.config)
        full = torch.cat([mask, torch.ones_like(batch.sequences[:, ids.shape[1]:-1])], dim=1)
        positions = (full.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers a left-padded batch
        model(input_ids=batch.sequences[:, :-1], attention_mask=full, position_ids=positions, **{CACHE: dynamic},
              use_cache=True)
    for stored, source in ((cache.layers[0].keys, dynamic.layers[0].keys),
                           (cache.layers[0].values, dynamic.layers[0].values)):
        for row, want in enumerate(expected_stored(source, full, "token")):
            assert torch.equal(stored[row, :, :want.shape[1]].view(torch.uint8), want.view(torch.uint8))


class StoredLayer(transformers.cache_utils.DynamicLayer):
    """Transformers' own dynamic cache layer that, from the second step on, attends over what an FP8KVCache layer
    (``source``, updated by the same step of the model under test, run first) stores, dequantized with its scales:
    the prompt attends over its keys as computed. What FP8KVCache means, spelled out with PyTorch and eager
    attention. Taking the stored bytes rather than quantizing this model's own keys keeps the comparison at fp32
    rounding: the two models' keys differ by that rounding, which the fp8 rounding of a value near a midpoint would
    turn into a whole fp8 step (the bytes themselves are checked against quant's rule in the tests above)."""

    def __init__(self, source):
        super().__init__()
        self.source = source

    def update(self, key_states, value_states, *args, **kwargs):
        prompt = not self.is_initialized
        keys, values = super().update(key_states, value_states)
        if prompt:
            return key_states, value_states
        src, length = self.source, keys.shape[2]
        assert src.keys.shape[2] >= length and src.lengths.tolist() == [length] * keys.shape[0]

        def stored(cache, scale):
            scale = scale[:, :, :length] if scale.dim() == 3 else scale
            return quant.dequantize(cache[:, :, :length], scale).to(keys.dtype)

        self.keys, self.values = stored(src.keys, src.k_scale), stored(src.values, src.v_scale)
        return self.keys, self.values


@pytest.mark.parametrize("granularity", quant.GRANULARITIES)
def test_decode_is_exact_attention_over_what_the_cache_stores(granularity):
    """Teacher-forced steps over FP8KVCache, one token or a chunk of three at a time (no attention mask given),
    give the logits of eager attention over the values the cache stores (up to fp32 rounding), at every step; the
    prompt attends over its keys as computed."""
    config = DECODERS["llama"]()
    ours, eager = build(config, "tileattn"), build(config, "eager")
    ids = torch.randint(3, config.vocab_size, (2, 12), device=DEVICE)
    fp8 = FP8KVCache(ours.config, granularity=granularity)
    stored = transformers.cache_utils.Cache(layers=[StoredLayer(layer) for layer in fp8.layers])
    tokens = ids
    with torch.no_grad():
        for step in range(12):
            got = ours(input_ids=tokens, **{CACHE: fp8}, use_cache=True).logits
            expected = eager(input_ids=tokens, **{CACHE: stored}, use_cache=True).logits
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {step}: {m}")
            tokens = torch.randint(3, config.vocab_size, (2, 3 if step % 3 == 1 else 1), device=DEVICE)
    assert fp8.get_seq_length() == stored.get_seq_length()


def test_clear_errors():
    config = DECODERS["llama"]()
    with pytest.raises(ValueError, match="attn_implementation='tileattn'"):
        FP8KVCache(build(config, "eager").config)
    model = build(config, "tileattn")
    with pytest.raises(ValueError, match="granularity"):
        FP8KVCache(model.config, granularity="row")
    with pytest.raises(ValueError, match="dtype"):
        FP8KVCache(model.config, dtype=torch.bfloat16)
    cache = FP8KVCache(model.config)
    k = torch.randn(1, 2, 3, 16, device=DEVICE)
    cache.layers[0].update(k, k)
    assert len(tt._fp8_layers) == 1
    with pytest.raises(RuntimeError, match="never attended by tileattn"):
        cache.layers[0].update(k, k)
    assert len(tt._fp8_layers) == 0  # nothing left behind by the refused call
    cache.layers[1].update(k, k)
    del cache
    gc.collect()
    assert len(tt._fp8_layers) == 0  # a dropped cache leaves no entry
    small = FP8KVCache(model.config, max_cache_len=12)
    ids = torch.randint(3, config.vocab_size, (1, 10), device=DEVICE)
    with torch.no_grad(), pytest.raises(ValueError, match="max_cache_len=12"):
        model.generate(ids, **{CACHE: small}, max_new_tokens=5, do_sample=False, pad_token_id=0)
    for name in ("mistral", "gemma2", "gpt_oss"):  # sliding-window layers: refused up front, not past the window
        with pytest.raises(ValueError, match="sliding-window"):
            FP8KVCache(build(DECODERS[name](), "tileattn").config)
    shared = build(config, "tileattn").config
    shared.num_kv_shared_layers = 1  # as Gemma 3n / 4 configs say it
    with pytest.raises(ValueError, match="num_kv_shared_layers"):
        FP8KVCache(shared)
