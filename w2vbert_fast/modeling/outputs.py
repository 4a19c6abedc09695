"""The models' output dataclasses (transformers' field names, so callers read them the same way)."""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(kw_only=True)
class _PerLayer:
    """What every output may carry per encoder layer, when asked (keyword-only: after each output's own fields)."""

    hidden_states: Optional[tuple] = None  # num_hidden_layers + 1 tensors: the first layer's input, then each output
    attentions: Optional[tuple] = None  # num_hidden_layers (B, heads, T, T) weights


@dataclass
class EncoderOutput(_PerLayer):
    last_hidden_state: torch.Tensor

    def __getitem__(self, key):  # transformers code reads ``outputs[0]`` as often as ``.last_hidden_state``
        return self.last_hidden_state if key == 0 else getattr(self, key)


@dataclass
class Wav2Vec2BertModelOutput(_PerLayer):
    last_hidden_state: torch.Tensor
    extract_features: Optional[torch.Tensor] = None


@dataclass
class CTCOutput(_PerLayer):
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
