"""from_pretrained: folders written by transformers' save_pretrained, single-file and sharded, without transformers."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FP32_ATOL
from model_helpers import max_diff_on_valid, ragged_batch, transformers_model
from safetensors.torch import save_file

import w2vbert_fast

LENGTHS = [19, 12]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def saved(tmp_path, cls_name="Wav2Vec2BertModel", **save_kwargs):
    extra = dict(vocab_size=9) if cls_name.endswith("CTC") else {}
    hf = transformers_model(cls_name, **extra)
    hf.save_pretrained(tmp_path, **save_kwargs)
    return hf


def test_standalone_load_runs_without_importing_transformers(tmp_path):
    hf = saved(tmp_path)
    features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim)
    with torch.no_grad():
        expected = hf(features, attention_mask=mask).last_hidden_state
    torch.save({"features": features, "mask": mask}, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        sys.modules["transformers"] = None  # any import of transformers now fails loudly
        import w2vbert_fast
        model = w2vbert_fast.Wav2Vec2BertModel.from_pretrained({str(tmp_path)!r})
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        with torch.no_grad():
            out = model(inputs["features"], attention_mask=inputs["mask"]).last_hidden_state
        torch.save(out, {str(tmp_path / 'out.pt')!r})
        assert not any(name == "transformers" or name.startswith("transformers.") for name, m in sys.modules.items()
                       if m is not None), "transformers was imported"
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})
    assert max_diff_on_valid(torch.load(tmp_path / "out.pt"), expected, LENGTHS) <= FP32_ATOL


def test_sharded_checkpoint_loads(tmp_path):
    hf = saved(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    model = w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path)
    for name, value in hf.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("cls_name", ["Wav2Vec2BertForCTC", "Wav2Vec2BertForSequenceClassification"])
def test_base_model_loads_from_any_head_checkpoint(tmp_path, cls_name):
    hf = saved(tmp_path, cls_name)
    model = w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path)
    for name, value in hf.wav2vec2_bert.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


def test_ctc_model_loads_its_checkpoint_and_matches(tmp_path):
    hf = saved(tmp_path, "Wav2Vec2BertForCTC")
    model = w2vbert_fast.Wav2Vec2BertForCTC.from_pretrained(tmp_path)
    features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim)
    with torch.no_grad():
        assert max_diff_on_valid(model(features, attention_mask=mask).logits,
                                 hf(features, attention_mask=mask).logits, LENGTHS) <= FP32_ATOL


def test_ctc_model_from_a_base_checkpoint_names_the_missing_head(tmp_path):
    saved(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vocab_size"] = 9
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing weights \['lm_head.bias', 'lm_head.weight'\]"):
        w2vbert_fast.Wav2Vec2BertForCTC.from_pretrained(tmp_path)


def test_unexpected_and_missing_keys_are_named(tmp_path):
    hf = saved(tmp_path)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    state["encoder.layers.0.ffn1.surprise"] = torch.zeros(2)
    del state["encoder.layers.1.final_layer_norm.bias"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError) as err:
        w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path)
    assert "encoder.layers.0.ffn1.surprise" in str(err.value)
    assert "encoder.layers.1.final_layer_norm.bias" in str(err.value)


def test_folder_without_weights_names_the_folder(tmp_path):
    w2vbert_fast.Wav2Vec2BertConfig(hidden_size=48, num_attention_heads=3).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path / "nowhere")


def test_dtype_and_device_are_applied(tmp_path):
    saved(tmp_path)
    model = w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())
    assert not model.training
    with pytest.raises(ValueError, match="dtype"):
        w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path, dtype=torch.int8)


@pytest.mark.parametrize("position_type", ["rotary", "relative"])
def test_position_tables_are_rebuilt_after_loading(tmp_path, position_type):
    hf = transformers_model(position_embeddings_type=position_type)
    hf.save_pretrained(tmp_path)
    model = w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path)
    features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim)
    with torch.no_grad():
        assert max_diff_on_valid(model(features, attention_mask=mask).last_hidden_state,
                                 hf(features, attention_mask=mask).last_hidden_state, LENGTHS) <= FP32_ATOL


def test_a_non_floating_weight_is_refused_at_load_naming_the_tensor(tmp_path):
    saved(tmp_path)
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    name = "encoder.layers.0.ffn1.intermediate_dense.weight"
    state[name] = state[name].to(torch.int32)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"tensor {name} is stored as int32, expected a floating-point weight"):
        w2vbert_fast.Wav2Vec2BertModel.from_pretrained(tmp_path)
