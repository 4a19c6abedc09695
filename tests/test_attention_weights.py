"""output_attentions=True gives transformers' attention weights: patched (eager and sdpa models, every head class
that returns them) and standalone, with padding, and they carry gradients."""

import copy
import warnings

import pytest
import torch

import w2vbert_fast
from conftest import assert_fp32_close
from model_helpers import our_model_like, ragged_batch, transformers_model

LENGTHS = [11, 7]


def _inputs():
    return ragged_batch(LENGTHS, feature_dim=20, seed=3)


@pytest.mark.parametrize("cls_name", ["Wav2Vec2BertModel", "Wav2Vec2BertForCTC",
                                      "Wav2Vec2BertForSequenceClassification"])
@pytest.mark.parametrize("position", ["relative_key", "rotary", "relative", None], ids=str)
def test_patched_eager_model_returns_transformers_weights(cls_name, position):
    extra = dict(vocab_size=9) if cls_name.endswith("CTC") else {}
    hf = transformers_model(cls_name, attn_implementation="eager", position_embeddings_type=position, **extra)
    patched = w2vbert_fast.optimize(copy.deepcopy(hf))
    features, mask = _inputs()
    with torch.no_grad():
        want = hf(features, attention_mask=mask, output_attentions=True).attentions
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = patched(features, attention_mask=mask, output_attentions=True).attentions
    assert len(want) == hf.config.num_hidden_layers and len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape == (2, hf.config.num_attention_heads, max(LENGTHS), max(LENGTHS))
        for row, n in enumerate(LENGTHS):  # real query rows: the weights over every key
            assert_fp32_close(a[row, :, :n], b[row, :, :n])


def test_patched_sdpa_model_returns_what_transformers_returns():
    """transformers' sdpa attention returns no weights (it warns so itself): the patched model neither."""
    hf = transformers_model(attn_implementation="sdpa")
    patched = w2vbert_fast.optimize(copy.deepcopy(hf))
    features, mask = _inputs()
    with torch.no_grad():
        assert hf(features, attention_mask=mask, output_attentions=True).attentions == ()
        assert patched(features, attention_mask=mask, output_attentions=True).attentions == ()


def test_config_flag_asks_for_the_weights_too():
    hf = transformers_model(attn_implementation="eager")
    hf.config.output_attentions = True
    patched = w2vbert_fast.optimize(copy.deepcopy(hf))
    features, mask = _inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(patched(features, attention_mask=mask).attentions) == hf.config.num_hidden_layers


def test_standalone_model_returns_transformers_weights_and_hidden_states_are_unchanged():
    hf = transformers_model(attn_implementation="eager")
    ours = our_model_like(hf)
    features, mask = _inputs()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = hf(features, attention_mask=mask, output_attentions=True)
        got = ours(features, attention_mask=mask, output_attentions=True)
        fast = ours(features, attention_mask=mask)
    assert fast.attentions is None
    assert len(got.attentions) == len(want.attentions)
    for a, b in zip(got.attentions, want.attentions):
        for row, n in enumerate(LENGTHS):
            assert_fp32_close(a[row, :, :n], b[row, :, :n])
    for row, n in enumerate(LENGTHS):
        assert_fp32_close(got.last_hidden_state[row, :n], want.last_hidden_state[row, :n])
        assert_fp32_close(fast.last_hidden_state[row, :n], got.last_hidden_state[row, :n])


def test_weights_keep_their_gradient_like_transformers():
    """transformers' test_retain_grad_hidden_states_attentions: the returned weights are part of the graph."""
    hf = transformers_model(attn_implementation="eager")
    ours = our_model_like(hf)
    features, mask = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ours(features, attention_mask=mask, output_attentions=True)
    weights = out.attentions[0]
    weights.retain_grad()
    out.last_hidden_state[0, :LENGTHS[0]].sum().backward()
    assert weights.grad is not None and torch.isfinite(weights.grad).all()


def test_asking_for_weights_warns_once_that_memory_is_quadratic(monkeypatch):
    from w2vbert_fast.modeling import attention

    monkeypatch.setattr(attention, "_warned_quadratic", False)
    ours = our_model_like(transformers_model(attn_implementation="eager"))
    features, mask = _inputs()
    with pytest.warns(UserWarning, match="quadratic"):
        ours(features, attention_mask=mask, output_attentions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(features, attention_mask=mask, output_attentions=True)
