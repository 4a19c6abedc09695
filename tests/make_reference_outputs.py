"""Regenerate tests/data/reference_outputs.safetensors: inputs, weights and transformers' outputs for a few tiny
configurations, so our parity check survives a transformers release that changes behaviour.

    python tests/make_reference_outputs.py      # needs transformers; records its version in the file's metadata
"""

import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_helpers import ragged_batch, transformers_model  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "reference_outputs.safetensors")
CASES = {
    "relative_key": dict(),
    "relative_key_real_clip": dict(left_max_position_embeddings=64, right_max_position_embeddings=8,
                                   conv_depthwise_kernel_size=7),
    "relative": dict(position_embeddings_type="relative"),
    "rotary": dict(position_embeddings_type="rotary"),
    "adapter": dict(add_adapter=True, num_adapter_layers=2, output_hidden_size=36),
}
LENGTHS = [23, 17, 6]


def main():
    import transformers

    tensors, configs = {}, {}
    for seed, (case, overrides) in enumerate(CASES.items()):
        hf = transformers_model(seed=seed, **overrides)
        features, mask = ragged_batch(LENGTHS, hf.config.feature_projection_input_dim, seed=seed)
        with torch.no_grad():
            out = hf(features, attention_mask=mask, output_hidden_states=True)
        configs[case] = hf.config.to_dict()
        tensors[f"{case}/input_features"] = features
        tensors[f"{case}/attention_mask"] = mask
        tensors[f"{case}/last_hidden_state"] = out.last_hidden_state
        for i, h in enumerate(out.hidden_states):
            tensors[f"{case}/hidden_states/{i}"] = h
        for name, value in hf.state_dict().items():
            tensors[f"{case}/weights/{name}"] = value
    tensors = {k: v.contiguous().clone() for k, v in tensors.items()}
    metadata = {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                "configs": json.dumps(configs, default=list)}
    save_file(tensors, OUT, metadata=metadata)
    print(f"wrote {OUT}: {len(tensors)} tensors, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
