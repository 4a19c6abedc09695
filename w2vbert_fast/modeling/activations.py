"""The one table of activations: transformers' ACT2FN names → modules with the same formulas (config.py validates
names against it)."""

import math

import torch
from torch import nn


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _Lambda(nn.Module):
    def __init__(self, fn, name):
        super().__init__()
        self.fn, self.name = fn, name

    def forward(self, x):
        return self.fn(x)

    def extra_repr(self):
        return self.name


# name → a factory of the module transformers' ACT2FN gives for that name
ACTIVATION_FACTORIES = {
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_new": lambda: _Lambda(_gelu_tanh, "gelu_new"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": lambda: _Lambda(lambda x: x * torch.sigmoid(1.702 * x), "quick_gelu"),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "selu": nn.SELU,
    "mish": nn.Mish,
    "linear": nn.Identity,
}
ACTIVATIONS = tuple(ACTIVATION_FACTORIES)


def activation(name: str) -> nn.Module:
    """The activation transformers' ACT2FN gives for ``name`` (same formulas, so fp32 outputs agree)."""
    if name not in ACTIVATION_FACTORIES:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATION_FACTORIES)}")
    return ACTIVATION_FACTORIES[name]()


def is_silu(module: nn.Module) -> bool:
    """True for nn.SiLU and transformers' SiLUActivation: the activation the fused conv kernel applies."""
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"
