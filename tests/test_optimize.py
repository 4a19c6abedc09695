"""optimize(): every transformers class, in place, state_dict untouched, our forwards bound."""

import copy

import pytest
import torch
from conftest import FP32_ATOL
from model_helpers import max_diff_on_valid, ragged_batch, transformers_model

import w2vbert_fast
from w2vbert_fast import modeling
from w2vbert_fast.patch import is_optimized

LENGTHS = [23, 17, 5]
CLASSES = {
    "Wav2Vec2BertModel": dict(),
    "Wav2Vec2BertForCTC": dict(vocab_size=13),
    "Wav2Vec2BertForSequenceClassification": dict(num_labels=4),
    "Wav2Vec2BertForAudioFrameClassification": dict(num_labels=3),
    "Wav2Vec2BertForXVector": dict(num_labels=5, tdnn_dim=(16, 16, 24), tdnn_kernel=(3, 1, 1), tdnn_dilation=(1, 2, 1),
                                   xvector_output_dim=12),
}


def main_output(output):
    for name in ("last_hidden_state", "logits"):
        if getattr(output, name, None) is not None:
            return output, name
    raise AssertionError("no output tensor")


@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_optimized_model_matches_the_original(cls_name):
    hf = transformers_model(cls_name, **CLASSES[cls_name])
    reference = copy.deepcopy(hf)
    features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim)
    assert w2vbert_fast.optimize(hf) is hf
    with torch.no_grad():
        ref = reference(features, attention_mask=mask, output_hidden_states=True)
        out = hf(features, attention_mask=mask, output_hidden_states=True)
    _, name = main_output(ref)
    ref_t, out_t = getattr(ref, name), getattr(out, name)
    if ref_t.dim() == 3:  # per-frame outputs: compare the real frames
        assert max_diff_on_valid(out_t, ref_t, LENGTHS) <= FP32_ATOL
    else:  # pooled outputs only see real frames
        assert (out_t - ref_t).abs().max().item() <= FP32_ATOL
    assert len(out.hidden_states) == len(ref.hidden_states)
    for o, r in zip(out.hidden_states, ref.hidden_states):
        assert max_diff_on_valid(o, r, LENGTHS) <= FP32_ATOL


def test_optimize_binds_our_forwards_to_every_submodule():
    hf = transformers_model(add_adapter=True)
    w2vbert_fast.optimize(hf)
    layer = hf.encoder.layers[0]
    assert hf.encoder.forward.__func__ is modeling.Wav2Vec2BertEncoder.forward
    assert layer.forward.__func__ is modeling.Wav2Vec2BertEncoderLayer.forward
    assert layer.self_attn.forward.__func__ is modeling.Wav2Vec2BertSelfAttention.forward
    assert layer.conv_module.forward.__func__ is modeling.Wav2Vec2BertConvolutionModule.forward
    assert hf.feature_projection.forward.__func__ is modeling.Wav2Vec2BertFeatureProjection.forward
    assert hf.adapter.forward.__func__ is modeling.Wav2Vec2BertAdapter.forward
    assert hf.adapter.layers[0].forward.__func__ is modeling.Wav2Vec2BertAdapterLayer.forward
    assert all(is_optimized(m) for m in (hf.encoder, layer, layer.self_attn, layer.conv_module))
    assert not is_optimized(layer.ffn1)  # a plain FFN needs nothing of ours


def test_optimize_leaves_the_state_dict_identical():
    hf = transformers_model("Wav2Vec2BertForCTC", vocab_size=13)
    before = {k: (v.data_ptr(), v.clone()) for k, v in hf.state_dict().items()}
    w2vbert_fast.optimize(hf)
    after = hf.state_dict()
    assert list(after) == list(before)
    for key, (ptr, value) in before.items():
        assert after[key].data_ptr() == ptr and torch.equal(after[key], value), key


def test_optimize_twice_is_harmless():
    hf = transformers_model()
    features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim)
    w2vbert_fast.optimize(hf)
    with torch.no_grad():
        once = hf(features, attention_mask=mask).last_hidden_state
    assert w2vbert_fast.optimize(hf) is hf
    with torch.no_grad():
        twice = hf(features, attention_mask=mask).last_hidden_state
    assert torch.equal(once, twice)


@pytest.mark.parametrize("thing", [object(), torch.nn.Linear(2, 2), "Wav2Vec2BertModel", None],
                         ids=["object", "other-module", "string", "none"])
def test_optimize_rejects_anything_else_with_a_type_error(thing):
    with pytest.raises(TypeError, match="optimize"):
        w2vbert_fast.optimize(thing)


def test_optimize_returns_our_own_model_unchanged():
    ours = w2vbert_fast.Wav2Vec2BertModel(w2vbert_fast.Wav2Vec2BertConfig(hidden_size=48, num_attention_heads=3,
                                                                          num_hidden_layers=1))
    assert w2vbert_fast.optimize(ours) is ours


def test_optimized_model_rejects_bad_features_with_a_value_error():
    hf = w2vbert_fast.optimize(transformers_model())
    with pytest.raises(ValueError, match="input_features"):
        hf(torch.randn(2, 9, 7))


def test_optimized_model_masks_holes_as_transformers_does():
    hf = transformers_model()
    reference = copy.deepcopy(hf)
    w2vbert_fast.optimize(hf)
    features, _ = ragged_batch([21, 21], hf.config.feature_projection_input_dim)
    holed = torch.ones(2, 21, dtype=torch.long)
    holed[1, 2:5] = 0
    with torch.no_grad():
        out = hf(features, attention_mask=holed).last_hidden_state
        ref = reference(features, attention_mask=holed).last_hidden_state
    real = holed.bool()
    assert (out - ref).abs()[real].max().item() <= FP32_ATOL
