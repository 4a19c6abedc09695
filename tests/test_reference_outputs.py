"""Our model against recorded transformers outputs (tests/data/reference_outputs.safetensors), with no
transformers at all: the parity check survives a transformers release that changes behaviour."""

import json
import os
import sys

import pytest
import torch
from conftest import FP32_ATOL
from model_helpers import max_diff_on_valid
from safetensors import safe_open

import w2vbert_fast

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference_outputs.safetensors")


def load_cases():
    with safe_open(PATH, framework="pt") as f:
        metadata = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return metadata, json.loads(metadata["configs"]), tensors


METADATA, CONFIGS, TENSORS = load_cases()


def test_reference_file_records_its_transformers_version():
    assert METADATA["transformers_version"]


@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_matches_recorded_transformers_outputs(case, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of transformers would now fail
    config = w2vbert_fast.Wav2Vec2BertConfig.from_dict(CONFIGS[case])
    model = w2vbert_fast.Wav2Vec2BertModel(config).eval()
    prefix = f"{case}/weights/"
    model.load_state_dict({k[len(prefix):]: v for k, v in TENSORS.items() if k.startswith(prefix)}, strict=True)
    mask = TENSORS[f"{case}/attention_mask"]
    with torch.no_grad():
        out = model(TENSORS[f"{case}/input_features"], attention_mask=mask, output_hidden_states=True)
    lengths = mask.sum(1)
    out_lengths = model.output_lengths(lengths).tolist()
    assert max_diff_on_valid(out.last_hidden_state, TENSORS[f"{case}/last_hidden_state"], out_lengths) <= FP32_ATOL
    for i, hidden in enumerate(out.hidden_states):
        assert max_diff_on_valid(hidden, TENSORS[f"{case}/hidden_states/{i}"], lengths.tolist()) <= FP32_ATOL
