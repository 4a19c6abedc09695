"""output_layer=N: hidden state N alone (hidden_states' numbering), computed by layers 1 … N only, on the
standalone model and an optimize()d transformers model."""

import copy

import pytest
import torch
from conftest import assert_fp32_close
from model_helpers import our_model_like, ragged_batch, transformers_model

import w2vbert_fast

LENGTHS = [13, 8]


def layers_run(model):
    """A list that records which encoder layers ran, by index."""
    ran = []
    encoder = model.encoder if hasattr(model, "encoder") else model.wav2vec2_bert.encoder
    for index, layer in enumerate(encoder.layers):
        layer.register_forward_hook(lambda *args, index=index: ran.append(index))
    return ran


@pytest.mark.parametrize("add_adapter", [False, True], ids=["plain", "adapter"])
def test_standalone_output_layer_is_that_hidden_state_and_runs_no_later_layer(add_adapter):
    hf = transformers_model(num_hidden_layers=3, add_adapter=add_adapter, num_adapter_layers=1)
    ours = our_model_like(hf)
    features, mask = ragged_batch(LENGTHS, 20)
    with torch.no_grad():
        everything = hf(features, attention_mask=mask, output_hidden_states=True).hidden_states
        for n in range(4):
            ran = layers_run(ours) if n == 1 else None
            out = ours(features, attention_mask=mask, output_layer=n)
            assert out.hidden_states is None
            for row, length in enumerate(LENGTHS):
                assert_fp32_close(out.last_hidden_state[row, :length], everything[n][row, :length])
            if ran is not None:
                assert ran == [0], f"layers {ran} ran for output_layer=1"


def test_patched_model_takes_output_layer_through_transformers_forward():
    hf = transformers_model(num_hidden_layers=3)
    patched = w2vbert_fast.optimize(copy.deepcopy(hf))
    features, mask = ragged_batch(LENGTHS, 20)
    ran = layers_run(patched)
    with torch.no_grad():
        want = hf(features, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        got = patched(features, attention_mask=mask, output_layer=2).last_hidden_state
    assert ran == [0, 1]
    for row, length in enumerate(LENGTHS):
        assert_fp32_close(got[row, :length], want[row, :length])


def test_patched_model_with_an_adapter_refuses_output_layer():
    """transformers' own forward would run the adapter on hidden state N: an error, not a silently other answer."""
    patched = w2vbert_fast.optimize(transformers_model(num_hidden_layers=2, add_adapter=True, num_adapter_layers=1))
    features, mask = ragged_batch(LENGTHS, 20)
    with pytest.raises(ValueError, match="output_layer on an optimize"):
        patched(features, attention_mask=mask, output_layer=1)


@pytest.mark.parametrize("bad", [-1, 4, 1.5, True, "17"])
def test_output_layer_out_of_range_is_a_value_error(bad):
    ours = our_model_like(transformers_model(num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"output_layer must be an int in \[0, 3\]"):
        ours(torch.randn(1, 5, 20), output_layer=bad)
