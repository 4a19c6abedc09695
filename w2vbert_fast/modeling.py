"""The Wav2Vec2-BERT conformer as plain nn.Modules, with transformers' parameter and attribute names.

Channel-last (B, T, C) everywhere; the pointwise convs run as linear maps over their Conv1d weights. The hot spots
go through ``w2vbert_fast.ops`` (relative-key attention, the conv module's fused middle); everything else is
ordinary PyTorch. Each ``forward`` here reads only attributes that transformers' module of the same name also has,
and calls helpers as module-level functions, so ``optimize()`` can bind it to a loaded transformers model as is.
"""

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from . import ops
from .config import Wav2Vec2BertConfig
from .ops._backend import checks_values


# --------------------------------------------------------------------------------------------- outputs
@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor
    hidden_states: Optional[tuple] = None

    def __getitem__(self, key):  # transformers code reads ``outputs[0]`` as often as ``.last_hidden_state``
        return self.last_hidden_state if key == 0 else getattr(self, key)


@dataclass
class Wav2Vec2BertModelOutput:
    last_hidden_state: torch.Tensor
    extract_features: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None


@dataclass
class CTCOutput:
    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None


# ------------------------------------------------------------------------------------------ activations
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


def activation(name: str) -> nn.Module:
    """The activation transformers' ACT2FN gives for ``name`` (same formulas, so fp32 outputs agree)."""
    table = {
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
    if name not in table:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(table)}")
    return table[name]()


def is_silu(module: nn.Module) -> bool:
    """True for nn.SiLU and transformers' SiLUActivation: the activation the fused conv kernel applies."""
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


# ---------------------------------------------------------------------------------------------- masking
@dataclass
class Padding:
    """Which frames of a batch are real, built once per forward on the mask's device with tensor ops only: no host
    sync and no data-dependent Python branch, so a masked forward compiles in one graph (``fullgraph=True``) and
    captures into a CUDA graph.

    A mask is read as right padding: row b's length is its number of nonzero entries and frames ``[0, length)``
    are the real ones (what transformers' own output-length arithmetic assumes, and what FbankExtractor makes).
    Telling a mask with holes (a 0 before a 1) from right padding needs the host to read the mask, so it is
    checked only when value checks run (see ``ops._backend.checks_values``: by default on CPU tensors outside
    torch.compile, everywhere with ``W2VBERT_FAST_VALIDATE=1``), and then it raises. Unchecked, a mask with holes
    gives the output of the right-padded mask with the same number of ones per row.

    ``lengths`` may all equal T (nothing padded): the kernels take that as is, no special case. ``mask`` is
    derived from ``lengths``. ``keep_padded_rows``: padded rows must be computed as transformers computes them
    (an adapter's strided conv reads one of them).
    """

    mask: torch.Tensor  # (B, T) bool, True = real frame (t < lengths[b])
    lengths: torch.Tensor  # (B,) int32, the kernels' dtype: no per-layer conversion
    keep_padded_rows: bool = False

    @staticmethod
    def from_lengths(lengths, length, keep_padded_rows=False) -> "Padding":
        lengths = lengths.to(torch.int32)
        mask = torch.arange(length, device=lengths.device, dtype=torch.int32)[None, :] < lengths[:, None]
        return Padding(mask=mask, lengths=lengths, keep_padded_rows=keep_padded_rows)

    @staticmethod
    def from_attention_mask(attention_mask, length, batch, keep_padded_rows=False,
                            validate: Optional[bool] = None) -> Optional["Padding"]:
        """``attention_mask``: (batch, length), 1 (or True, or nonzero) = real frame. Shape and dtype errors are
        raised always (no sync); ``validate`` (default: ``ops._backend.checks_values``) also checks the values on
        the host: 0/1 only, at least one real frame per row, right padding."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must have shape (batch, frames) = ({batch}, {length}), got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype.is_complex:
            raise ValueError(f"attention_mask must be a bool, integer or floating 0/1 tensor, got {attention_mask.dtype}")
        real = attention_mask != 0
        padding = Padding.from_lengths(real.sum(dim=1, dtype=torch.int32), length, keep_padded_rows)
        if validate is None:
            validate = checks_values(attention_mask)
        if validate:
            check_mask_values(attention_mask, real, padding)
        return padding


def check_mask_values(attention_mask, real, padding) -> None:
    """The host-side checks of a mask's values, in one device-to-host copy: 0/1 only, no empty row, no hole."""
    not_binary = ((attention_mask != 0) & (attention_mask != 1)).any(dim=1)
    empty = padding.lengths == 0
    holes = (real != padding.mask).any(dim=1)
    not_binary, empty, holes = torch.stack([not_binary, empty, holes]).cpu().tolist()
    rows = lambda flags: [i for i, flag in enumerate(flags) if flag]  # noqa: E731
    if any(not_binary):
        raise ValueError(f"attention_mask must hold only 0 and 1 (1 = real frame, 0 = padding); row(s) {rows(not_binary)} do not")
    if any(empty):
        raise ValueError(f"attention_mask has no real frame in batch row(s) {rows(empty)}: every sequence needs at least one")
    if any(holes):
        raise ValueError(
            f"attention_mask row(s) {rows(holes)} are not right padding (a 0 before a 1): w2vbert_fast reads a mask "
            "as right padding (real frames first, then padding); put each sequence's real frames first"
        )


# ------------------------------------------------------------------------------------ position embeddings
class Wav2Vec2BertRotaryPositionalEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim = config.hidden_size // config.num_attention_heads
        self.base = config.rotary_embedding_base
        self.dim = dim
        self.register_buffer("inv_freq", self._inv_freq(), persistent=False)

    def _inv_freq(self, device=None):
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64, device=device).float() / self.dim))

    def reset_buffers(self, device):
        self.inv_freq = self._inv_freq(device)

    def forward(self, hidden_states):
        length = hidden_states.shape[1]
        time_stamps = torch.arange(length, device=self.inv_freq.device).type_as(self.inv_freq)
        freqs = time_stamps[:, None] * self.inv_freq
        embeddings = torch.cat((freqs, freqs), dim=-1)
        cos = embeddings.cos()[:, None, None, :]
        sin = embeddings.sin()[:, None, None, :]
        return torch.stack([cos, sin]).type_as(hidden_states)


class Wav2Vec2BertRelPositionalEmbedding(nn.Module):
    """Transformer-XL sinusoids for relative positions -(L-1) … (L-1), as transformers builds them."""

    def __init__(self, config):
        super().__init__()
        self.max_len = config.max_source_positions
        self.d_model = config.hidden_size
        self.register_buffer("pe", self.extend_pe(torch.tensor(0.0).expand(1, self.max_len)), persistent=False)

    def reset_buffers(self, device):
        self.pe = self.extend_pe(torch.zeros(1, self.max_len, device=device))

    def extend_pe(self, x, pe=None):
        if pe is not None and pe.size(1) >= x.size(1) * 2 - 1:
            return pe if (pe.dtype == x.dtype and pe.device == x.device) else pe.to(dtype=x.dtype, device=x.device)
        length = x.size(1)
        pe_positive = torch.zeros(length, self.d_model)
        pe_negative = torch.zeros(length, self.d_model)
        position = torch.arange(0, length, dtype=torch.int64).float().unsqueeze(1)
        div_term = torch.exp(
            torch.arange(0, self.d_model, 2, dtype=torch.int64).float() * -(math.log(10000.0) / self.d_model)
        )
        pe_positive[:, 0::2] = torch.sin(position * div_term)
        pe_positive[:, 1::2] = torch.cos(position * div_term)
        pe_negative[:, 0::2] = torch.sin(-1 * position * div_term)
        pe_negative[:, 1::2] = torch.cos(-1 * position * div_term)
        pe_positive = torch.flip(pe_positive, [0]).unsqueeze(0)
        pe_negative = pe_negative[1:].unsqueeze(0)
        return torch.cat([pe_positive, pe_negative], dim=1).to(device=x.device, dtype=x.dtype)

    def forward(self, hidden_states):
        self.pe = self.extend_pe(hidden_states, self.pe)
        start = self.pe.size(1) // 2 - hidden_states.size(1) + 1
        end = self.pe.size(1) // 2 + hidden_states.size(1)
        return self.pe[:, start:end]


# ---------------------------------------------------------------------------------------------- blocks
class Wav2Vec2BertFeatureProjection(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm = nn.LayerNorm(config.feature_projection_input_dim, eps=config.layer_norm_eps)
        self.projection = nn.Linear(config.feature_projection_input_dim, config.hidden_size)
        self.dropout = nn.Dropout(config.feat_proj_dropout)

    def forward(self, hidden_states):
        check_input_features(hidden_states, self.layer_norm.normalized_shape[0])
        norm_hidden_states = self.layer_norm(hidden_states)
        hidden_states = self.dropout(self.projection(norm_hidden_states))
        return hidden_states, norm_hidden_states


def check_input_features(input_features, feature_dim):
    """The public boundary: features must be a floating (batch, frames, feature_dim) tensor, finite."""
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
                hidden_states, self.depthwise_conv.weight, norm.weight, norm.bias, norm.eps, lengths
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


class Wav2Vec2BertSelfAttention(nn.Module):
    """Multi-head self-attention with Shaw relative-key (fused kernel), Transformer-XL relative, rotary or no
    position information."""

    def __init__(self, config, is_adapter_attention=False):
        super().__init__()
        hidden_size = config.hidden_size if not is_adapter_attention else config.output_hidden_size
        self.config = config
        self.head_size = hidden_size // config.num_attention_heads
        self.num_heads = config.num_attention_heads
        self.position_embeddings_type = config.position_embeddings_type if not is_adapter_attention else None
        self.is_causal = False
        self.scaling = self.head_size ** -0.5
        self.linear_q = nn.Linear(hidden_size, hidden_size)
        self.linear_k = nn.Linear(hidden_size, hidden_size)
        self.linear_v = nn.Linear(hidden_size, hidden_size)
        self.linear_out = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(p=config.attention_dropout)
        if self.position_embeddings_type == "relative":
            self.linear_pos = nn.Linear(hidden_size, hidden_size, bias=False)
            self.pos_bias_u = nn.Parameter(torch.zeros(self.num_heads, self.head_size))
            self.pos_bias_v = nn.Parameter(torch.zeros(self.num_heads, self.head_size))
        if self.position_embeddings_type == "relative_key":
            self.left_max_position_embeddings = config.left_max_position_embeddings
            self.right_max_position_embeddings = config.right_max_position_embeddings
            num_positions = self.left_max_position_embeddings + self.right_max_position_embeddings + 1
            self.distance_embedding = nn.Embedding(num_positions, self.head_size)

    def forward(self, hidden_states, padding: Optional[Padding] = None, relative_position_embeddings=None):
        batch, length, _ = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_size
        query_key_states = hidden_states
        if self.position_embeddings_type == "rotary":
            query_key_states = apply_rotary_embedding(hidden_states, relative_position_embeddings, heads, head_dim)
        q = self.linear_q(query_key_states).view(batch, length, heads, head_dim)
        k = self.linear_k(query_key_states).view(batch, length, heads, head_dim)
        v = self.linear_v(hidden_states).view(batch, length, heads, head_dim)
        dropout_p = self.dropout.p if self.training else 0.0

        if self.position_embeddings_type == "relative_key" and dropout_p == 0.0:
            left, right = self.left_max_position_embeddings, self.right_max_position_embeddings
            table = self.distance_embedding.weight
            if padding is None:
                out = ops.rel_key_attention(q, k, v, table, left, right, self.scaling)
            else:
                out = ops.rel_key_attention(q, k, v, table, left, right, self.scaling, padding.lengths,
                                            zero_padded_queries=not padding.keep_padded_rows)
        else:
            out = attention_with_bias(self, q, k, v, padding, relative_position_embeddings, dropout_p)
        return self.linear_out(out), None


def attention_with_bias(attention, q, k, v, padding, relative_position_embeddings, dropout_p):
    """The unfused paths: SDPA (rotary, no position information, the adapter) or an explicit bias (relative;
    relative_key while training with attention dropout). Returns (B, L, H·D)."""
    batch, length, heads, head_dim = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    bias = None
    kind = attention.position_embeddings_type
    if kind == "relative":
        q, bias = relative_position_bias(attention, q, k, relative_position_embeddings)
    elif kind == "relative_key":
        left, right = attention.left_max_position_embeddings, attention.right_max_position_embeddings
        positions = torch.arange(length, device=q.device)
        distance = (positions[None, :] - positions[:, None]).clamp(-left, right) + left
        emb = attention.distance_embedding(distance).to(q.dtype)
        bias = torch.einsum("bhld,lrd->bhlr", q, emb) * attention.scaling
    if padding is not None:
        key_mask = padding.mask[:, None, None, :]
        if bias is None:
            bias = key_mask
        else:
            bias = bias.masked_fill(~key_mask, torch.finfo(bias.dtype).min)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=attention.scaling)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def relative_position_bias(attention, query, key, relative_position_embeddings):
    """Transformer-XL relative position scores with the skew trick, exactly as transformers computes them."""
    if relative_position_embeddings is None:
        raise ValueError("relative position embeddings are needed when position_embeddings_type='relative'")
    proj = attention.linear_pos(relative_position_embeddings)
    proj = proj.view(*relative_position_embeddings.shape[:2], -1, attention.head_size).permute(0, 2, 3, 1)
    q_with_bias_v = query + attention.pos_bias_v[None, :, None, :]
    scores = torch.matmul(q_with_bias_v, proj)
    shape = scores.shape
    scores = F.pad(scores, (1, 0)).view(*shape[:2], shape[3] + 1, shape[2])
    scores = scores[..., 1:, :].view(shape)[..., : key.size(2)]
    return query + attention.pos_bias_u[None, :, None, :], scores * attention.scaling


def apply_rotary_embedding(hidden_states, relative_position_embeddings, heads, head_dim):
    """Rotary on the layer's input (before linear_q/linear_k), as transformers does."""
    if relative_position_embeddings is None:
        raise ValueError("rotary position embeddings are needed when position_embeddings_type='rotary'")
    batch, length, _ = hidden_states.shape
    hidden_states = hidden_states.view(batch, length, heads, head_dim)
    cos = relative_position_embeddings[0, :length, 0]  # (L, 1, D)
    sin = relative_position_embeddings[1, :length, 0]
    half = head_dim // 2
    rotated = torch.cat((-hidden_states[..., half:], hidden_states[..., :half]), dim=-1)
    return (hidden_states * cos + rotated * sin).view(batch, length, heads * head_dim)


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

    def forward(self, hidden_states, padding: Optional[Padding] = None, relative_position_embeddings=None):
        # Checkpointed here, inside forward, as transformers 5.2x does (its wrapper on the class's forward never
        # runs once optimize() binds this one to the instance): module hooks stay outside the recompute.
        if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(partial(conformer_block, self), hidden_states, padding,
                                                     relative_position_embeddings)
        return conformer_block(self, hidden_states, padding, relative_position_embeddings)


def conformer_block(layer, hidden_states, padding, relative_position_embeddings):
    """The encoder layer's computation (``layer``: ours or transformers' Wav2Vec2BertEncoderLayer)."""
    residual = hidden_states
    hidden_states = layer.ffn1(layer.ffn1_layer_norm(hidden_states)) * 0.5 + residual
    residual = hidden_states
    hidden_states, _ = layer.self_attn(layer.self_attn_layer_norm(hidden_states), padding, relative_position_embeddings)
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

    def forward(self, hidden_states, attention_mask=None, output_hidden_states=False, **kwargs):
        batch, length, _ = hidden_states.shape
        padding = Padding.from_attention_mask(attention_mask, length, batch, keep_padded_rows=self.config.add_adapter)
        if padding is not None:
            hidden_states = hidden_states.masked_fill(~padding.mask[..., None], 0.0)
        hidden_states = self.dropout(hidden_states)
        positions = self.embed_positions(hidden_states) if self.embed_positions is not None else None
        all_hidden_states = []
        layerdrop = self.config.layerdrop if self.training else 0.0
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            if layerdrop > 0.0 and torch.rand([]) < layerdrop:
                continue
            # nn.Module.__call__, not the layer's own: transformers up to 5.1x checkpoints in
            # GradientCheckpointingLayer.__call__, and our forward checkpoints already (twice = two recomputes)
            hidden_states = nn.Module.__call__(layer, hidden_states, padding, positions)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return EncoderOutput(hidden_states, tuple(all_hidden_states) if output_hidden_states else None)


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
        if attention_mask is not None:  # real frames per row, as Padding counts them (right padding)
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


# ------------------------------------------------------------------------------------------------- models
class _PreTrained(nn.Module):
    base_model_prefix = "wav2vec2_bert"

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        """Load a transformers-format folder (config.json + model.safetensors, or a sharded safetensors index)."""
        from .loading import load_pretrained

        return load_pretrained(cls, folder, dtype=dtype, device=device)

    def reset_buffers(self, device=None):
        """Recompute the non-persistent buffers (position tables), e.g. after building on the meta device."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_buffers"):
                module.reset_buffers(device)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers: int = 1):
        """Recompute encoder layers in the backward pass instead of keeping their activations, as transformers'
        method of the same name does: ``torch.utils.checkpoint.checkpoint`` with ``gradient_checkpointing_kwargs``
        (default ``{"use_reentrant": False}``) around every ``every_n_layers``-th layer, in training mode only."""
        if isinstance(every_n_layers, bool) or not isinstance(every_n_layers, int) or every_n_layers < 1:
            raise ValueError(f"every_n_layers must be a positive integer, got {every_n_layers!r}")
        if gradient_checkpointing_kwargs is None:
            gradient_checkpointing_kwargs = {"use_reentrant": False}
        checkpoint = partial(torch.utils.checkpoint.checkpoint, **gradient_checkpointing_kwargs)
        for index, layer in enumerate(self._encoder_layers()):
            layer._gradient_checkpointing_func = checkpoint
            layer.gradient_checkpointing = index % every_n_layers == 0

    def gradient_checkpointing_disable(self):
        for layer in self._encoder_layers():
            layer.gradient_checkpointing = False

    # transformers 5.2x's names for the same switches
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1):
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers)

    def activation_checkpointing_disable(self):
        self.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return any(layer.gradient_checkpointing for layer in self._encoder_layers())

    def _encoder_layers(self):
        return [module for module in self.modules() if isinstance(module, Wav2Vec2BertEncoderLayer)]


class Wav2Vec2BertModel(_PreTrained):
    """The encoder: stacked log-mel features (B, T, 160) → hidden states (B, T, hidden) [→ adapter]."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        if not isinstance(config, Wav2Vec2BertConfig):
            raise TypeError(f"config must be a w2vbert_fast.Wav2Vec2BertConfig, got {type(config).__name__}")
        self.config = config
        self.feature_projection = Wav2Vec2BertFeatureProjection(config)
        if config.mask_time_prob > 0.0 or config.mask_feature_prob > 0.0:
            # only used by SpecAugment in training; kept so checkpoints load with the same keys
            self.masked_spec_embed = nn.Parameter(torch.empty(config.hidden_size).uniform_())
        self.encoder = Wav2Vec2BertEncoder(config)
        self.adapter = Wav2Vec2BertAdapter(config) if config.add_adapter else None
        self.intermediate_ffn = None
        if config.use_intermediate_ffn_before_adapter:
            self.intermediate_ffn = Wav2Vec2BertFeedForward(config, act_fn="relu")

    def forward(self, input_features, attention_mask=None, output_hidden_states=False):
        """input_features: (B, T, 160) floating; attention_mask: optional (B, T), 1 = real frame, 0 = padding,
        read as right padding (see :class:`Padding`: built on the device, no host sync, so the masked forward
        compiles in one graph and captures into a CUDA graph; holes are an error where values are checked).

        Returns ``.last_hidden_state`` (B, T', output size), ``.extract_features`` (the normalised input) and, when
        asked, ``.hidden_states``: a tuple of num_hidden_layers + 1 tensors (the input to the first layer, then
        each layer's output), as transformers returns them. Padded positions are finite but may differ from
        transformers'.
        """
        hidden_states, extract_features = self.feature_projection(input_features)
        encoder_outputs = self.encoder(hidden_states, attention_mask=attention_mask,
                                       output_hidden_states=output_hidden_states)
        hidden_states = encoder_outputs.last_hidden_state
        if self.intermediate_ffn is not None:
            hidden_states = hidden_states + 0.5 * self.intermediate_ffn(hidden_states)
        if self.adapter is not None:
            hidden_states = self.adapter(hidden_states, attention_mask=attention_mask)
        return Wav2Vec2BertModelOutput(hidden_states, extract_features, encoder_outputs.hidden_states)

    def output_lengths(self, input_lengths):
        """Frames out of the model for ``input_lengths`` frames in (the adapter subsamples)."""
        if self.config.add_adapter:
            pad = self.config.adapter_kernel_size // 2
            for _ in range(self.config.num_adapter_layers):
                input_lengths = torch.div(input_lengths + 2 * pad - self.config.adapter_kernel_size,
                                          self.config.adapter_stride, rounding_mode="floor") + 1
        return input_lengths


class Wav2Vec2BertForCTC(_PreTrained):
    """The encoder with a linear CTC head: ``.logits`` (B, T', vocab_size)."""

    def __init__(self, config: Wav2Vec2BertConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("config.vocab_size must be set for Wav2Vec2BertForCTC (the size of the CTC vocabulary)")
        self.config = config
        self.wav2vec2_bert = Wav2Vec2BertModel(config)
        self.dropout = nn.Dropout(config.final_dropout)
        output_size = config.output_hidden_size if config.add_adapter else config.hidden_size
        self.lm_head = nn.Linear(output_size, config.vocab_size)

    def forward(self, input_features, attention_mask=None, labels=None, output_hidden_states=False):
        outputs = self.wav2vec2_bert(input_features, attention_mask=attention_mask,
                                     output_hidden_states=output_hidden_states)
        logits = self.lm_head(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            if labels.max() >= self.config.vocab_size:
                raise ValueError(f"labels must be < config.vocab_size ({self.config.vocab_size})")
            if attention_mask is None:
                attention_mask = torch.ones(input_features.shape[:2], device=input_features.device, dtype=torch.long)
            logit_lengths = self.wav2vec2_bert.output_lengths(attention_mask.sum(-1)).to(torch.long)
            loss = ctc_loss(logits, labels, logit_lengths, self.config)
        return CTCOutput(logits=logits, loss=loss, hidden_states=outputs.hidden_states)


def ctc_loss(logits, labels, logit_lengths, config, ignore_index=-100):
    """transformers' ForCTCLoss: padded labels are ``ignore_index`` or the blank (pad_token_id)."""
    blank = config.pad_token_id
    labels = labels.to(logits.device)
    labels_mask = (labels != ignore_index) & (labels != blank)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(log_probs, labels.masked_select(labels_mask), logit_lengths, labels_mask.sum(-1),
                          blank=blank, reduction=config.ctc_loss_reduction, zero_infinity=config.ctc_zero_infinity)
