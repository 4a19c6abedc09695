"""Our model against transformers, fp32 on CPU, at every non-padded position (≤ FP32_ATOL)."""

import copy

import pytest
import torch
from conftest import FP32_ATOL
from model_helpers import DEVICE, max_diff_on_valid, our_model_like, ragged_batch, transformers_model

import w2vbert_fast
from w2vbert_fast.modeling import Padding

LENGTHS = [23, 17, 5]  # ragged, not multiples of 8, one short sequence


def compare(hf, ours, lengths=LENGTHS, mask=True, hidden_states=True, device="cpu"):
    """transformers on the CPU against ours on ``device``; outputs compared on the CPU."""
    features, attention_mask = ragged_batch(lengths, hf.config.feature_projection_input_dim)
    attention_mask = attention_mask if mask else None
    with torch.no_grad():
        ref = hf(features, attention_mask=attention_mask, output_hidden_states=hidden_states)
        ours = ours.to(device)
        out = ours(features.to(device), attention_mask=None if attention_mask is None else attention_mask.to(device),
                   output_hidden_states=hidden_states)
        out.last_hidden_state = out.last_hidden_state.cpu()
        if hidden_states:
            out.hidden_states = tuple(h.cpu() for h in out.hidden_states)
    out_lengths = lengths
    if hf.config.add_adapter:
        out_lengths = hf._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
    assert torch.isfinite(out.last_hidden_state).all()
    assert max_diff_on_valid(out.last_hidden_state, ref.last_hidden_state, out_lengths) <= FP32_ATOL
    if hidden_states:
        assert len(out.hidden_states) == len(ref.hidden_states) == hf.config.num_hidden_layers + 1
        for ours_h, ref_h in zip(out.hidden_states, ref.hidden_states):
            assert max_diff_on_valid(ours_h, ref_h, lengths) <= FP32_ATOL


@pytest.mark.parametrize("position_type", ["relative_key", "relative", "rotary", None],
                         ids=["relative_key", "relative", "rotary", "none"])
def test_every_position_type_matches_transformers_on_a_ragged_batch(position_type):
    hf = transformers_model(position_embeddings_type=position_type)
    compare(hf, our_model_like(hf))


@pytest.mark.parametrize("position_type", ["relative_key", "rotary"])
def test_unpadded_batch_without_attention_mask_matches(position_type):
    hf = transformers_model(position_embeddings_type=position_type)
    compare(hf, our_model_like(hf), lengths=[19, 19], mask=False)


@pytest.mark.parametrize(
    "adapter",
    [
        dict(num_adapter_layers=1),
        dict(num_adapter_layers=2),
        dict(num_adapter_layers=1, output_hidden_size=36),
        dict(num_adapter_layers=2, use_intermediate_ffn_before_adapter=True, adapter_act="gelu"),
        dict(num_adapter_layers=1, adapter_kernel_size=5, adapter_stride=3),
    ],
    ids=["one-layer", "two-layers", "down-projected", "intermediate-ffn", "kernel5-stride3"],
)
def test_adapter_variants_match_transformers(adapter):
    # Odd lengths: the adapter's strided conv reads one padded row, so padded rows must be computed as transformers does.
    hf = transformers_model(add_adapter=True, **adapter)
    compare(hf, our_model_like(hf), lengths=[23, 17, 6])


def test_non_swish_activation_uses_the_unfused_conv_path_and_matches():
    hf = transformers_model(hidden_act="gelu")
    compare(hf, our_model_like(hf))


def test_unknown_validate_mode_is_a_value_error(monkeypatch):
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "sometimes")
    hf = transformers_model()
    features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim)
    with pytest.raises(ValueError, match="W2VBERT_FAST_VALIDATE must be one of"):
        our_model_like(hf)(features, attention_mask=mask)


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
@pytest.mark.parametrize("dtype", [torch.long, torch.bool, torch.float32], ids=["long", "bool", "float"])
def test_mask_with_nothing_padded_takes_lengths_equal_to_the_length_and_matches(backend, backend_name, dtype):
    # no special case for an all-ones mask: the kernels get lengths that all equal L
    backend(backend_name)
    hf = transformers_model(num_hidden_layers=1)
    ours = our_model_like(hf).to(DEVICE)
    features, mask = ragged_batch([19, 19], hf.config.feature_projection_input_dim)
    with torch.no_grad():
        out = ours(features.to(DEVICE), attention_mask=mask.to(DEVICE, dtype)).last_hidden_state.cpu()
        ref = hf(features, attention_mask=mask).last_hidden_state
    assert (out - ref).abs().max().item() <= FP32_ATOL


def test_padding_is_built_on_the_mask_device_without_reading_it(monkeypatch):
    """With checks off, building Padding never reads the mask on the host (a torch.Tensor.item/tolist/__bool__
    call would be a device sync on a GPU)."""
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "0")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, _name=name: pytest.fail(f"Tensor.{_name} called"))
    padding = Padding.from_attention_mask(mask, 4, 2)
    monkeypatch.undo()
    assert padding.lengths.dtype == torch.int32 and padding.lengths.tolist() == [3, 4]
    assert padding.mask.tolist() == [[True, True, True, False], [True] * 4]


def test_one_layer_at_the_real_w2v_bert_2_sizes_matches():
    hf = transformers_model(
        hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=1,
        left_max_position_embeddings=64, right_max_position_embeddings=8, conv_depthwise_kernel_size=31,
        feature_projection_input_dim=160,
    )
    compare(hf, our_model_like(hf), lengths=[83, 70])


def test_ctc_logits_and_loss_match_transformers():
    hf = transformers_model("Wav2Vec2BertForCTC", vocab_size=11)
    ours = our_model_like(hf)
    features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim)
    labels = torch.tensor([[3, 4, 5, 6], [7, 8, -100, -100], [9, -100, -100, -100]])
    with torch.no_grad():
        ref = hf(features, attention_mask=mask, labels=labels)
        out = ours(features, attention_mask=mask, labels=labels)
    assert max_diff_on_valid(out.logits, ref.logits, LENGTHS) <= FP32_ATOL
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-3 * max(1.0, abs(ref.loss.item()))


def test_padded_rows_are_finite():
    hf = transformers_model()
    ours = our_model_like(hf)
    features, mask = ragged_batch([23, 1], hf.config.feature_projection_input_dim)
    with torch.no_grad():
        out = ours(features, attention_mask=mask, output_hidden_states=True)
    assert all(torch.isfinite(h).all() for h in out.hidden_states)


def test_triton_backend_model_matches_transformers(backend):
    """The whole model with the real kernels (interpreted on CPU in CI) on a ragged batch."""
    backend("triton")
    hf = transformers_model(num_hidden_layers=1)
    compare(hf, our_model_like(hf), lengths=[19, 11], device=DEVICE)


def test_whole_model_compiles_in_one_graph_through_the_kernels(backend):
    """torch.compile traces the standalone model through both custom ops without a graph break."""
    backend("triton")
    hf = transformers_model(num_hidden_layers=1)
    ours = our_model_like(hf).to(DEVICE)
    features, _ = ragged_batch([19, 19], hf.config.feature_projection_input_dim)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        out = compiled(features.to(DEVICE)).last_hidden_state.cpu()
        ref = hf(features).last_hidden_state
    assert (out - ref).abs().max().item() <= FP32_ATOL
