"""transformers-format checkpoints → our modules: config.json + model.safetensors, or a sharded index.

No transformers import on this path. The model is built on the meta device and the checkpoint's tensors are
assigned straight into it (cast to ``dtype``, moved to ``device``), so a 600M-parameter model loads without a
random initialisation it would throw away.
"""

import json
import os

import torch
from safetensors import safe_open

from .config import Wav2Vec2BertConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(folder) -> list:
    """The safetensors files of a checkpoint folder, or FileNotFoundError naming the folder."""
    single, index = os.path.join(folder, SINGLE_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index!r} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise FileNotFoundError(f"{index!r} names shard(s) not in {folder!r}: {missing}")
        return [os.path.join(folder, name) for name in files]
    if any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(folder)):
        raise FileNotFoundError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {folder!r}: only PyTorch pickles were found; re-save the model "
            f"with transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise FileNotFoundError(f"no weights in {folder!r}: expected {SINGLE_FILE} or {INDEX_FILE}")


def read_state_dict(files, dtype=None, device=None) -> dict:
    state = {}
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[name] = tensor.to(device) if device is not None else tensor
    return state


def match_keys(model, checkpoint: dict) -> dict:
    """Map checkpoint names onto ``model``'s. A base model takes the ``wav2vec2_bert.`` part of a head model's
    checkpoint (the head's own weights are not its concern); a head model takes a checkpoint saved with the prefix.
    Missing or unexpected weights are a ValueError that lists them."""
    prefix = model.base_model_prefix + "."
    expected = set(model.state_dict().keys())
    is_base = not any(name.startswith(prefix) for name in expected)
    has_prefix = any(name.startswith(prefix) for name in checkpoint)
    if is_base and has_prefix:
        checkpoint = {name[len(prefix):]: t for name, t in checkpoint.items() if name.startswith(prefix)}
    elif not is_base and not has_prefix:
        checkpoint = {(name if name.split(".")[0] in _head_roots(model) else prefix + name): t
                      for name, t in checkpoint.items()}
    missing = sorted(expected - checkpoint.keys())
    unexpected = sorted(checkpoint.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected}")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    return checkpoint


def _head_roots(model) -> set:
    return {name for name, _ in model.named_children() if name != model.base_model_prefix}


def load_pretrained(cls, folder, dtype=None, device=None):
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    config = Wav2Vec2BertConfig.from_pretrained(folder)
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = cls(config)
    state = match_keys(model, read_state_dict(files, dtype, device))
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers(device)
    return model.eval()
