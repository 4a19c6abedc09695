"""Bad input at the public boundary is a ValueError that names the argument and what was expected."""

import pytest
import torch

import w2vbert_fast

CONFIG = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=40,
              feature_projection_input_dim=20, conv_depthwise_kernel_size=5)


@pytest.fixture(scope="module")
def model():
    return w2vbert_fast.Wav2Vec2BertModel(w2vbert_fast.Wav2Vec2BertConfig(**CONFIG)).eval()


@pytest.mark.parametrize(
    "features, mask, message",
    [
        (torch.randn(2, 9, 7), None, "20 features in the last dimension"),
        (torch.randn(9, 20), None, r"shape \(batch, frames, 20\)"),
        (torch.randn(1, 2, 9, 20), None, r"shape \(batch, frames, 20\)"),
        (torch.randint(0, 5, (2, 9, 20)), None, "floating-point"),
        (torch.randn(2, 0, 20), None, "at least one frame"),
        (torch.randn(2, 9, 20), torch.ones(2, 8, dtype=torch.long), r"attention_mask must have shape"),
        (torch.randn(2, 9, 20), torch.ones(9, dtype=torch.long), r"attention_mask must have shape"),
        (torch.randn(2, 9, 20), torch.tensor([[1] * 9, [0] * 9]), r"no real frame in batch row\(s\) \[1\]"),
        (torch.randn(2, 9, 20), torch.full((2, 9), 0.5), "only 0 and 1"),
    ],
    ids=["feature-dim", "rank-2", "rank-4", "integer-features", "no-frames", "mask-length", "mask-rank",
         "empty-row", "fractional-mask"],
)
def test_bad_input_is_a_value_error_naming_the_argument(model, features, mask, message):
    with pytest.raises(ValueError, match=message):
        model(features, attention_mask=mask)


def test_non_tensor_features_are_rejected(model):
    with pytest.raises(ValueError, match="input_features must be a torch.Tensor"):
        model([[0.0] * 20])


def test_ctc_needs_a_vocabulary_size():
    with pytest.raises(ValueError, match="vocab_size"):
        w2vbert_fast.Wav2Vec2BertForCTC(w2vbert_fast.Wav2Vec2BertConfig(**CONFIG))


def test_ctc_labels_past_the_vocabulary_are_rejected():
    model = w2vbert_fast.Wav2Vec2BertForCTC(w2vbert_fast.Wav2Vec2BertConfig(vocab_size=5, **CONFIG)).eval()
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.randn(1, 9, 20), labels=torch.tensor([[1, 7]]))


def test_unknown_backend_is_rejected(monkeypatch, model):
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="W2VBERT_FAST_BACKEND"):
        model(torch.randn(1, 9, 20))
