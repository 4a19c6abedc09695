"""The conformer: feature projection, feed-forward, convolution module, encoder layer, encoder and adapter, as plain
nn.Modules with transformers' parameter and attribute names.

Channel-last (B, T, C) everywhere; the pointwise convs run as linear maps over their Conv1d weights, and the conv
module's middle goes through ``ops.glu_depthwise_conv``. Each ``forward`` reads only attributes that transformers'
module of the same name also has, and calls helpers as module-level functions, so ``optimize()`` can bind it to a
loaded transformers model as is.
"""

import contextlib
import math
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops._backend import checks_values
from .activations import activation, is_silu
from .attention import (Wav2Vec2BertRelPositionalEmbedding, Wav2Vec2BertRotaryPositionalEmbedding,
                        Wav2Vec2BertSelfAttention, attention_weights_requested)
from .masks import Padding
from .outputs import EncoderOutput


# ---------------------------------------------------------------------------------------------- blocks
class Wav2Vec2BertFeatureProjection(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.feature_projection_input_dim, eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.feature_projection_input_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, hidden_states):
        check_input_features(hidden_states, self.layer_norm.normalized_shape[0], self.layer_norm.weight.dtype)
        norm_hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(self.projection(norm_hidden_states))
        return hidden_states, norm_hidden_states


# The largest |feature| accepted: the feature projection's LayerNorm squares deviations, so 1e19 already overflows
# fp32 into NaN; normalised log-mel features are of order 1, unnormalised ones below 100.
MAX_ABS_FEATURE = 1e9


def check_input_features(input_features, feature_dim, model_dtype=None):
    """The public boundary: features must be a floating (batch, frames, feature_dim) tensor in the model's dtype,
    finite and of sane magnitude.

    The dtype must match (outside autocast) rather than being cast: transformers refuses the mismatch too (deep
    inside, as "mat1 and mat2 must have the same dtype"), and a silent cast would hide a bf16 model fed fp32
    features, or fp16 features losing precision into an fp32 model. Finiteness needs the host to read the values,
    so it is checked where that is free (``ops._backend.checks_values``: CPU tensors outside torch.compile, or
    ``W2VBERT_FAST_VALIDATE=1``), the same policy as masks.
    """
    if not isinstance(input_features, torch.Tensor):
        raise ValueError(f"input_features must be a torch.Tensor, got {type(input_features).__name__}")
    if input_features.dim() != 3:
        raise ValueError(
            f"input_features must have shape (batch, frames, {feature_dim}), got {input_features.dim()} dimensions "
            f"{tuple(input_features.shape)}"
        )
    if input_features.shape[-1] != feature_dim:
        raise ValueError(
            f"input_features must have {feature_dim} features in the last dimension (stacked log-mel, see "
            f"FbankExtractor), got shape {tuple(input_features.shape)}"
        )
    if not input_features.dtype.is_floating_point:
        raise ValueError(f"input_features must be a floating-point tensor, got {input_features.dtype}")
    if input_features.shape[0] == 0 or input_features.shape[1] == 0:
        raise ValueError(f"input_features must hold at least one frame per sequence, got shape {tuple(input_features.shape)}")
    if (model_dtype is not None and input_features.dtype != model_dtype
            and not torch.is_autocast_enabled(input_features.device.type)):
        raise ValueError(
            f"input_features are {str(input_features.dtype)[6:]} but the model's weights are {str(model_dtype)[6:]}: "
            f"cast them (input_features.to({model_dtype})) or run under torch.autocast"
        )
    if checks_values(input_features):
        low, high = torch.aminmax(input_features.detach())  # one pass, one sync; NaN anywhere makes both NaN
        peak = float(torch.maximum(-low, high))
        if not peak <= MAX_ABS_FEATURE:
            raise ValueError(
                f"input_features hold {'NaN or Inf values' if not math.isfinite(peak) else f'a value of magnitude {peak:.3g}'}"
                f" (at most {MAX_ABS_FEATURE:.0e} expected; normalised log-mel features are of order 1): every "
                "output would be NaN. Check the audio and the feature extraction that made them"
            )


class Wav2Vec2BertFeedForward(nn.Module):
    def __init__(self, config, act_fn=None, hidden_size=None):
        super().__init__()
        act_fn = act_fn if act_fn is not None else config.hidden_act
        hidden_size = hidden_size if hidden_size is not None else config.hidden_size
        self.intermediate_dropout = nn.Dropout(config.activation_dropout)
        self.intermediate_dense = nn.Linear(hidden_size, config.intermediate_size)
        self.intermediate_act_fn = activation(act_fn)
        self.output_dense = nn.Linear(config.intermediate_size, hidden_size)
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states):
        hidden_states = self.intermediate_dropout(self.intermediate_act_fn(self.intermediate_dense(hidden_states)))
        return self.output_dropout(self.output_dense(hidden_states))


class Wav2Vec2BertConvolutionModule(nn.Module):
    """LayerNorm → pointwise_conv1 (as a linear map) → [GLU → causal depthwise conv → LayerNorm → swish, fused] →
    pointwise_conv2, all channel-last."""

    def __init__(self, config):
        super().__init__()
        channels = config.hidden_size
        self.layer_norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.pointwise_conv1 = nn.Conv1d(channels, 2 * channels, kernel_size=1, bias=False)
        self.glu = nn.GLU(dim=1)
        self.depthwise_conv = nn.Conv1d(
            channels, channels, config.conv_depthwise_kernel_size, groups=channels, bias=False
        )
        self.depthwise_layer_norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.activation = activation(config.hidden_act)
        self.pointwise_conv2 = nn.Conv1d(channels, channels, kernel_size=1, bias=False)
        self.dropout = nn.Dropout(config.conformer_conv_dropout)

    def forward(self, hidden_states, padding: Optional[Padding] = None):
        hidden_states = self.layer_norm(hidden_states)
        lengths = padding.lengths if padding is not None else None
        hidden_states = F.linear(hidden_states, self.pointwise_conv1.weight[:, :, 0], self.pointwise_conv1.bias)
        norm = self.depthwise_layer_norm
        if is_silu(self.activation) and self.depthwise_conv.bias is None:
            hidden_states = ops.glu_depthwise_conv(
                hidden_states, self.depthwise_conv.weight, norm.weight, norm.bias, norm.eps, lengths,
                frame_mask=padding.frame_mask if padding is not None else None,
            )
        else:  # an activation the kernel does not fuse: the same steps, unfused
            if padding is not None:
                hidden_states = hidden_states.masked_fill(~padding.mask[..., None], 0.0)
            kernel_size = self.depthwise_conv.kernel_size[0]
            hidden_states = F.glu(hidden_states, dim=-1).transpose(1, 2)
            hidden_states = self.depthwise_conv(F.pad(hidden_states, (kernel_size - 1, 0))).transpose(1, 2)
            hidden_states = self.activation(norm(hidden_states))
        hidden_states = F.linear(hidden_states, self.pointwise_conv2.weight[:, :, 0], self.pointwise_conv2.bias)
        return self.dropout(hidden_states)


class Wav2Vec2BertEncoderLayer(nn.Module):
    """Conformer block: half FFN → self-attention → convolution module → half FFN → LayerNorm.

    Gradient checkpointing follows transformers' protocol, so ``gradient_checkpointing_enable()`` of either model
    drives it: ``gradient_checkpointing`` and ``_gradient_checkpointing_func`` set on the instance.
    """

    gradient_checkpointing = False

    def __init__(self, config):
        super().__init__()
        embed_dim = config.hidden_size
        self.ffn1_layer_norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.ffn1 = Wav2Vec2BertFeedForward(config)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.self_attn_dropout = nn.Dropout(config.attention_dropout)
        self.self_attn = Wav2Vec2BertSelfAttention(config)
        self.conv_module = Wav2Vec2BertConvolutionModule(config)
        self.ffn2_layer_norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.ffn2 = Wav2Vec2BertFeedForward(config)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)

    def forward(self, hidden_states, padding: Optional[Padding] = None, relative_position_embeddings=None,
                output_attentions=False):
        # Checkpointed here, inside forward, as transformers 5.2x does (its wrapper on the class's forward never
        # runs once optimize() binds this one to the instance): module hooks stay outside the recompute.
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(partial(conformer_block, self), hidden_states, padding,
                                                     relative_position_embeddings, output_attentions)
        return conformer_block(self, hidden_states, padding, relative_position_embeddings, output_attentions)


def conformer_block(layer, hidden_states, padding, relative_position_embeddings, output_attentions=False):
    """The encoder layer's computation (``layer``: ours or transformers' Wav2Vec2BertEncoderLayer)."""
    residual = hidden_states
    hidden_states = layer.ffn1(layer.ffn1_layer_norm(hidden_states)) * 0.5 + residual
    residual = hidden_states
    hidden_states, _ = layer.self_attn(layer.self_attn_layer_norm(hidden_states), padding, relative_position_embeddings,
                                       output_attentions)
    hidden_states = layer.self_attn_dropout(hidden_states) + residual
    hidden_states = hidden_states + layer.conv_module(hidden_states, padding)
    residual = hidden_states
    hidden_states = layer.ffn2(layer.ffn2_layer_norm(hidden_states)) * 0.5 + residual
    return layer.final_layer_norm(hidden_states)


class Wav2Vec2BertEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        if config.position_embeddings_type == "relative":
            self.embed_positions = Wav2Vec2BertRelPositionalEmbedding(config)
        elif config.position_embeddings_type == "rotary":
            self.embed_positions = Wav2Vec2BertRotaryPositionalEmbedding(config)
        else:
            self.embed_positions = None
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([Wav2Vec2BertEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False, output_attentions=None,
                output_layer=None, **kwargs):
        """``output_attentions``: None decides as transformers does (see ``attention_weights_requested``); the
        weights are the encoder attentions' second outputs, recorded as transformers' output recorder does.
        ``output_layer``: run layers 1 … N only and return hidden state N as ``last_hidden_state`` (the numbering of
        ``hidden_states``: 0 is this forward's input); the layers after it never run."""
        layers = self.layers[:check_output_layer(output_layer, len(self.layers))] if output_layer is not None \
            else self.layers
        if output_layer is not None and _is_transformers_module(self) and _has_heads_after_encoder(self.config):
            # transformers' Model.forward would run its adapter / intermediate FFN on hidden state N
            raise ValueError("output_layer on an optimize()d transformers model with an adapter or an intermediate "
                             "FFN: take output_hidden_states=True instead, or load the model with "
                             "w2vbert_fast.Wav2Vec2BertModel.from_pretrained, whose output_layer skips them")
        batch, length, _ = hidden_states.shape
        padding = Padding.from_attention_mask(attention_mask, length, batch, keep_padded_rows=self.config.add_adapter)
        if padding is not None:
            hidden_states = hidden_states.masked_fill(~padding.mask[..., None], 0.0)
        hidden_states = self.dropout(hidden_states)
        positions = self.embed_positions(hidden_states) if self.embed_positions is not None else None
        all_hidden_states = []
        layerdrop = self.config.layerdrop if self.training else 0.0
        output_attentions = attention_weights_requested(self.config, output_attentions)
        with _recording_attention_weights(layers, output_attentions) as attentions:
            for layer in layers:
                if output_hidden_states:
                    all_hidden_states.append(hidden_states)
                if layerdrop > 0.0 and torch.rand([]) < layerdrop:
                    continue
                # nn.Module.__call__, not the layer's own: transformers up to 5.1x checkpoints in
                # GradientCheckpointingLayer.__call__, and our forward checkpoints already (twice = two recomputes)
                hidden_states = nn.Module.__call__(layer, hidden_states, padding, positions, output_attentions)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return EncoderOutput(hidden_states, hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
                             attentions=tuple(attentions) if output_attentions else None)


def check_output_layer(output_layer, num_layers) -> int:
    if isinstance(output_layer, bool) or not isinstance(output_layer, int) or not 0 <= output_layer <= num_layers:
        raise ValueError(f"output_layer must be an int in [0, {num_layers}] (0 = the feature projection's output, "
                         f"as hidden_states[0]), got {output_layer!r}")
    return output_layer


def _is_transformers_module(module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _has_heads_after_encoder(config) -> bool:
    return bool(config.add_adapter or getattr(config, "use_intermediate_ffn_before_adapter", False))


@contextlib.contextmanager
def _recording_attention_weights(layers, enabled):
    """Collect each layer's attention weights (its self_attn's second output) during one forward. Hooks, not return
    values, because the layer's forward returns hidden states alone, as transformers' does; removed at the end, so a
    checkpointed layer's recompute in the backward records nothing."""
    recorded = []
    handles = []
    if enabled:
        handles = [layer.self_attn.register_forward_hook(lambda module, args, output: recorded.append(output[1]))
                   for layer in layers]
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------------------------ adapter
# ------------------------------------------------------------------------------------------------ adapter
class Wav2Vec2BertAdapter(nn.Module):
    def __init__(self, config):
        super().__init__()
        if config.output_hidden_size != config.hidden_size:
            self.proj = nn.Linear(config.hidden_size, config.output_hidden_size)
            self.proj_layer_norm = nn.LayerNorm(config.output_hidden_size, eps=config.layer_norm_eps)
        else:
            self.proj = self.proj_layer_norm = None
        self.layers = nn.ModuleList(Wav2Vec2BertAdapterLayer(config) for _ in range(config.num_adapter_layers))
        self.layerdrop = config.layerdrop
        self.kernel_size = config.adapter_kernel_size
        self.stride = config.adapter_stride

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if self.proj is not None and self.proj_layer_norm is not None:
            hidden_states = self.proj_layer_norm(self.proj(hidden_states))
        lengths = None
        if attention_mask is not None:  # real frames per row, as transformers counts them (any mask)
            lengths = (attention_mask != 0).sum(1).to(hidden_states.device)
        for layer in self.layers:
            if lengths is not None:
                # transformers' formula (padding kernel_size // 2, while the conv pads stride // 2): kept for parity
                pad = self.kernel_size // 2
                lengths = (((lengths + 2 * pad - self.kernel_size) / self.stride) + 1).floor()
            if self.training and self.layerdrop > 0.0 and torch.rand([]) <= self.layerdrop:
                continue
            hidden_states = layer(hidden_states, attention_mask=attention_mask, sub_sampled_lengths=lengths)
        return hidden_states


class Wav2Vec2BertAdapterLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        embed_dim = config.output_hidden_size
        self.kernel_size = config.adapter_kernel_size
        self.stride = config.adapter_stride
        self.residual_layer_norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.residual_conv = nn.Conv1d(embed_dim, 2 * embed_dim, self.kernel_size, stride=self.stride,
                                       padding=self.stride // 2)
        self.activation = nn.GLU(dim=1)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.self_attn_conv = nn.Conv1d(embed_dim, 2 * embed_dim, self.kernel_size, stride=self.stride,
                                        padding=self.stride // 2)
        self.self_attn = Wav2Vec2BertSelfAttention(config, is_adapter_attention=True)
        self.self_attn_dropout = nn.Dropout(config.conformer_conv_dropout)
        self.ffn_layer_norm = nn.LayerNorm(embed_dim, eps=config.layer_norm_eps)
        self.ffn = Wav2Vec2BertFeedForward(config, act_fn=config.adapter_act, hidden_size=embed_dim)

    def forward(self, hidden_states, attention_mask=None, sub_sampled_lengths=None, **kwargs):
        # channel-first only around the strided convs, which have no channel-last kernel in PyTorch
        residual = self.residual_layer_norm(hidden_states).transpose(1, 2)
        residual = self.activation(self.residual_conv(residual)).transpose(1, 2)
        hidden_states = self.self_attn_layer_norm(hidden_states).transpose(1, 2)
        hidden_states = self.activation(self.self_attn_conv(hidden_states)).transpose(1, 2)
        padding = None
        if attention_mask is not None and sub_sampled_lengths is not None:
            # transformers' length formula may overshoot the conv's output by a frame: clamped on the device
            length = hidden_states.shape[1]
            padding = Padding.from_lengths(sub_sampled_lengths.clamp(max=length), length)
        hidden_states, _ = self.self_attn(hidden_states, padding)
        hidden_states = self.self_attn_dropout(hidden_states) + residual
        residual = hidden_states
        return self.ffn(self.ffn_layer_norm(hidden_states)) + residual
