"""The models' output dataclasses (transformers' field names, so callers read them the same way)."""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None

    def __getitem__(self, key):  # transformers code reads ``outputs[0]`` as often as ``.last_hidden_state``
        return self.last_hidden_state if key == 0 else getattr(self, key)


@dataclass
class Wav2Vec2BertModelOutput:
    last_hidden_state: torch.Tensor
    extract_features: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None


@dataclass
class CTCOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None
    attentions: Optional[tuple] = None
