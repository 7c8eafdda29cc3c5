"""A training step through attn_implementation="tileattn": the loss and every parameter's gradient of a tiny Llama
(GQA, padded batches) and a tiny BERT equal those of the same model with attn_implementation="eager" (same
weights, same inputs); attention dropout in training mode stays a clear error.

Tolerance: eager attention runs its softmax in fp32 whatever the model's dtype (and a float64 eager model turns the
fully masked rows of left padding into NaN), so no float64 eager model can serve as the oracle. The two
implementations are compared in fp32 instead, each gradient to within 1e-4 of its own largest entry (about 840 fp32
ulps), plus one fp32 ulp of the model's largest gradient for the gradients that are 0 in exact arithmetic and
rounding noise in both (BERT's key biases: adding one vector to every key shifts a row's scores by a constant, to
which softmax is blind). Correct implementations differ here by up to ~120 ulps (fp32 rounding through two layers,
forward and backward); a wrong mask, a padding row leaking into real ones or GQA heads summed wrongly moves
gradients by a good fraction of their scale.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import tileattn.integrations.transformers as tt  # noqa: E402
from tileattn import dispatch  # noqa: E402

from test_transformers import DECODERS, build, padded_batch  # noqa: E402  (its import registers "tileattn")

RELATIVE_TOLERANCE = 1e-4  # of each gradient's largest entry
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def bert_config(dropout=0.0):
    return transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                   vocab_size=97, hidden_dropout_prob=0.0, attention_probs_dropout_prob=dropout)


@pytest.fixture(params=["auto", "triton"])
def integration_backend(request, monkeypatch):
    """The backend the integration hands every tileattn call (``register(backend=...)``): ``auto``'s choice, or the
    Triton kernels and their FlashAttention backward (on CPU through the interpreter)."""
    monkeypatch.setattr(tt, "_backend", request.param)
    return request.param


def skip_unless_runnable(device, backend):
    if device == "cpu" and backend == "triton" and not dispatch.interpreter_enabled():
        pytest.skip("the Triton kernels run on CPU only through the interpreter (TRITON_INTERPRET=1)")


def causal_lm_batch(vocab, side, device):
    """A padded batch (rows of 13, 9 and 4 tokens) with its labels: every real token except those predicted from a
    padding position. The first token of a left-padded row is (labels are shifted by one), and a padding query
    under causal masking sees no key: tileattn's output there is 0, eager's an average over masked keys, and
    neither means anything."""
    ids, mask = padded_batch([13, 9, 4], vocab, side)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100
    assert (mask == 0).any() and (labels != -100).any()
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))


def masked_lm_batch(vocab, device):
    """A right-padded batch (12, 5 and 9 tokens) whose labels are its real tokens."""
    ids, mask = padded_batch([12, 5, 9], vocab, "right")
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=ids.masked_fill(mask == 0, -100).to(device))


def training_step(config, implementation, auto_class, batch, device):
    """``(loss, {parameter name: gradient})`` of one forward and backward in train mode."""
    model = build(config, implementation, auto_class).to(device).train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_training_step_matches_eager(config, auto_class, batch, device):
    expected_loss, expected = training_step(config, "eager", auto_class, batch, device)
    loss, got = training_step(config, "tileattn", auto_class, batch, device)
    torch.testing.assert_close(loss, expected_loss)
    assert got.keys() == expected.keys()
    assert all(grad is not None for grad in expected.values())
    noise = torch.finfo(torch.float32).eps * max(grad.abs().max().item() for grad in expected.values())
    for name, grad in expected.items():
        assert got[name] is not None, f"{name}: no gradient"
        torch.testing.assert_close(got[name], grad, rtol=0, atol=RELATIVE_TOLERANCE * grad.abs().max().item() + noise,
                                   msg=lambda message: f"{name}: {message}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_llama_training_step_matches_eager(side, device, integration_backend):
    """GQA (4 query heads, 2 K/V heads), a padded batch: the padding mask and causality in the backward."""
    skip_unless_runnable(device, integration_backend)
    config = DECODERS["llama"]()
    assert_training_step_matches_eager(config, transformers.AutoModelForCausalLM,
                                       causal_lm_batch(config.vocab_size, side, device), device)


@pytest.mark.parametrize("device", DEVICES)
def test_bert_training_step_matches_eager(device, integration_backend):
    """Bidirectional attention over a right-padded batch: padding queries see every real key."""
    skip_unless_runnable(device, integration_backend)
    config = bert_config()
    assert_training_step_matches_eager(config, transformers.AutoModelForMaskedLM,
                                       masked_lm_batch(config.vocab_size, device), device)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_attention_dropout_in_training_is_a_clear_error(name):
    """Dropout is not part of tileattn: a model that asks for it in training mode gets an error saying what to set;
    in eval mode (no dropout) the same model runs."""
    if name == "llama":
        config, auto_class = DECODERS["llama"](), transformers.AutoModelForCausalLM
        config.attention_dropout = 0.1
        batch = causal_lm_batch(config.vocab_size, "left", "cpu")
    else:
        config, auto_class = bert_config(dropout=0.1), transformers.AutoModelForMaskedLM
        batch = masked_lm_batch(config.vocab_size, "cpu")
    model = build(config, "tileattn", auto_class).cpu().train()
    with pytest.raises(ValueError, match="no attention dropout.*p=0.1.*set the config's attention dropout to 0"):
        model(**batch)
    with torch.no_grad():
        assert torch.isfinite(model.eval()(**batch).loss)
