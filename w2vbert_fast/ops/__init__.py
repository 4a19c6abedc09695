"""The kernels as functions. Each dispatches per call (``_backend.dispatch``): on CUDA tensors the Triton kernels or
the op's portable PyTorch path, per GPU arch and dtype from one table (``describe()`` says which and why); the fast
PyTorch path on CPU tensors; the literal reference (the ``*_reference`` functions here, the tests' oracle) with
``W2VBERT_FAST_BACKEND=torch``."""

from ._backend import describe
from .glu_depthwise_conv import glu_depthwise_conv, glu_depthwise_conv_reference
from .log_mel_fbank import log_mel_fbank, log_mel_fbank_reference
from .rel_key_attention import rel_key_attention, rel_key_attention_reference

__all__ = [
    "describe",
    "glu_depthwise_conv",
    "glu_depthwise_conv_reference",
    "log_mel_fbank",
    "log_mel_fbank_reference",
    "rel_key_attention",
    "rel_key_attention_reference",
]
