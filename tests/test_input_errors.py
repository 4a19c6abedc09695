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


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30], ids=["nan", "inf", "-inf", "1e30"])
def test_non_finite_or_huge_features_are_a_value_error_naming_them(model, bad):
    features = torch.randn(2, 9, 20)
    features[1, 4, 7] = bad
    with pytest.raises(ValueError, match="input_features hold"):
        model(features)


def test_non_finite_features_are_refused_by_a_patched_model_too():
    import sys

    sys.path.insert(0, __import__("os").path.dirname(__file__))
    from model_helpers import transformers_model

    patched = w2vbert_fast.optimize(transformers_model())
    features = torch.randn(1, 9, 20)
    features[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="input_features hold NaN or Inf"):
        patched(features)


def test_unchecked_features_are_not_read_on_the_host(monkeypatch, model):
    """W2VBERT_FAST_VALIDATE=0: no value check (the policy a CUDA tensor gets by default: no sync)."""
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "0")
    features = torch.randn(1, 9, 20)
    features[0, 0, 0] = float("nan")
    assert torch.isnan(model(features).last_hidden_state).any()


@pytest.mark.parametrize("features_dtype, model_dtype", [(torch.float64, torch.float32), (torch.float16, torch.float32),
                                                          (torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_features_in_another_dtype_than_the_model_name_both(features_dtype, model_dtype):
    model = w2vbert_fast.Wav2Vec2BertModel(w2vbert_fast.Wav2Vec2BertConfig(**CONFIG)).to(model_dtype).eval()
    with pytest.raises(ValueError, match=rf"input_features are {str(features_dtype)[6:]} but the model's weights are "
                                         rf"{str(model_dtype)[6:]}"):
        model(torch.randn(1, 9, 20, dtype=features_dtype))


def test_features_in_another_dtype_run_under_autocast(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 9, 20, dtype=torch.bfloat16))
    assert torch.isfinite(out.last_hidden_state).all()
