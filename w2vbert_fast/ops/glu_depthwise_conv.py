"""The conformer convolution module's middle: GLU → causal depthwise conv → LayerNorm → swish, channel-last.

Input is the (B, T, 2C) output of pointwise_conv1; output (B, T, C) goes to pointwise_conv2.
Reading order: reference → kernel → launcher → dispatch.
"""

import torch
import torch.nn.functional as F

from ._backend import use_triton


# ----------------------------------------------------------------------------------------------- reference
def glu_depthwise_conv_reference(x, conv_weight, ln_weight, ln_bias, eps, lengths=None):
    """PyTorch reference. x: (B, T, 2C); conv_weight: (C, 1, K); ln_weight, ln_bias: (C,); lengths: optional (B,).

    Positions at or past a sequence's length are zero input to the conv; output t reads inputs t-K+1 … t.
    """
    if lengths is not None:
        valid = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]
        x = x.masked_fill(~valid[..., None], 0)
    channels, _, kernel_size = conv_weight.shape
    h = F.glu(x, dim=-1).transpose(1, 2)  # (B, C, T)
    h = F.conv1d(F.pad(h, (kernel_size - 1, 0)), conv_weight.to(h.dtype), groups=channels)
    h = F.layer_norm(h.transpose(1, 2), (channels,), ln_weight.to(h.dtype), ln_bias.to(h.dtype), eps)
    return F.silu(h)


# ------------------------------------------------------------------------------------------------ dispatch
def glu_depthwise_conv(x, conv_weight, ln_weight, ln_bias, eps, lengths=None):
    """swish(LayerNorm(causal_depthwise_conv(GLU(x)))) over the channel-last (B, T, 2C) x; returns (B, T, C)."""
    use_triton(x)  # validates W2VBERT_FAST_BACKEND; the Triton kernel plugs in here
    return glu_depthwise_conv_reference(x, conv_weight, ln_weight, ln_bias, eps, lengths)
