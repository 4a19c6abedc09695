"""Self-attention for every position type: Shaw relative-key through ``ops.rel_key_attention`` (the fused kernel,
O(L) memory), Transformer-XL relative, rotary or none through SDPA; and the position embeddings the encoder feeds
them."""

import math
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.rel_key_attention import rel_key_bias_reference
from .masks import Padding


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


# ------------------------------------------------------------------------------------------- attention
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

    def forward(self, hidden_states, padding: Optional[Padding] = None, relative_position_embeddings=None,
                output_attentions=False):
        """Returns (output (B, L, hidden), attention weights (B, H, L, L) when ``output_attentions``, else None).
        The weights take the reference path for that call (quadratic in memory; warned once)."""
        batch, length, _ = hidden_states.shape
        heads, head_dim = self.num_heads, self.head_size
        query_key_states = hidden_states
        if self.position_embeddings_type == "rotary":
            query_key_states = apply_rotary_embedding(hidden_states, relative_position_embeddings, heads, head_dim)
        q = self.linear_q(query_key_states).view(batch, length, heads, head_dim)
        k = self.linear_k(query_key_states).view(batch, length, heads, head_dim)
        v = self.linear_v(hidden_states).view(batch, length, heads, head_dim)
        dropout_p = self.dropout.p if self.training else 0.0

        weights = None
        if output_attentions:
            _warn_quadratic_once()
            out, weights = attention_with_weights(self, q, k, v, padding, relative_position_embeddings, dropout_p)
        elif self.position_embeddings_type == "relative_key" and dropout_p == 0.0:
            left, right = self.left_max_position_embeddings, self.right_max_position_embeddings
            table = self.distance_embedding.weight
            if padding is None:
                out = ops.rel_key_attention(q, k, v, table, left, right, self.scaling)
            else:
                out = ops.rel_key_attention(q, k, v, table, left, right, self.scaling, padding.lengths,
                                            zero_padded_queries=not padding.keep_padded_rows,
                                            key_mask=padding.frame_mask)
        else:
            out = attention_with_bias(self, q, k, v, padding, relative_position_embeddings, dropout_p)
        return self.linear_out(out), weights


_warned_quadratic = False


def _warn_quadratic_once():
    global _warned_quadratic
    if not _warned_quadratic:
        _warned_quadratic = True
        warnings.warn("output_attentions=True: w2vbert_fast computes the attention weights on its reference path for "
                      "this call, with memory quadratic in the length (B × heads × L × L per layer)", stacklevel=3)


def attention_weights_requested(config, output_attentions=None) -> bool:
    """Whether a forward must return attention weights, as transformers decides it: an explicit
    ``output_attentions``, else transformers' output recorder (5.x collects them from each encoder attention's
    second output while a model forward runs), else ``config.output_attentions``. Only an eager-attention
    transformers model returns weights (sdpa and the others return none, and transformers warns so itself)."""
    if getattr(config, "_attn_implementation", "eager") not in (None, "eager"):
        return False
    if output_attentions is not None:
        return bool(output_attentions)
    collected = _transformers_recorder()
    if collected is not None:
        return "attentions" in collected
    return bool(getattr(config, "output_attentions", False))


def _transformers_recorder():
    """What transformers' output recorder collects in the running forward ({name: list}), or None."""
    recorder = sys.modules.get("transformers.utils.output_capturing")
    collector = getattr(recorder, "_active_collector", None)
    return collector.get() if collector is not None else None


def _queries_and_bias(attention, q, k, padding, relative_position_embeddings):
    """(B, H, L, D) queries (Transformer-XL adds pos_bias_u) and the additive (B, H, L, L) position bias with the
    key mask folded in (a bool key mask alone when there is no position bias; None when neither)."""
    bias = None
    kind = attention.position_embeddings_type
    if kind == "relative":
        q, bias = relative_position_bias(attention, q, k, relative_position_embeddings)
    elif kind == "relative_key":
        bias = rel_key_bias_reference(q, attention.distance_embedding.weight, attention.left_max_position_embeddings,
                                      attention.right_max_position_embeddings, attention.scaling)
    if padding is not None:
        key_mask = padding.mask[:, None, None, :]
        if bias is None:
            bias = key_mask
        else:
            bias = bias.masked_fill(~key_mask, torch.finfo(bias.dtype).min)
    return q, bias


def attention_with_bias(attention, q, k, v, padding, relative_position_embeddings, dropout_p):
    """The unfused paths: SDPA (rotary, no position information, the adapter) or an explicit bias (relative;
    relative_key while training with attention dropout). Returns (B, L, H·D)."""
    batch, length, heads, head_dim = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D)
    q, bias = _queries_and_bias(attention, q, k, padding, relative_position_embeddings)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=attention.scaling)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim)


def attention_with_weights(attention, q, k, v, padding, relative_position_embeddings, dropout_p):
    """transformers' eager attention: explicit scores, softmax in the input dtype, dropout on the weights.
    Returns ((B, L, H·D), weights (B, H, L, L))."""
    batch, length, heads, head_dim = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, bias = _queries_and_bias(attention, q, k, padding, relative_position_embeddings)
    scores = torch.matmul(q, k.transpose(2, 3)) * attention.scaling
    if bias is not None and bias.dtype == torch.bool:
        scores = scores.masked_fill(~bias, torch.finfo(scores.dtype).min)
    elif bias is not None:
        scores = scores + bias
    weights = F.dropout(torch.softmax(scores, dim=-1), p=dropout_p, training=dropout_p > 0.0)
    out = torch.matmul(weights, v)
    return out.transpose(1, 2).reshape(batch, length, heads * head_dim), weights


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
