"""The models: Wav2Vec2BertModel and the CTC head, their loading and checkpointing API, and the CTC loss."""

from functools import partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..config import Wav2Vec2BertConfig
from .conformer import (Wav2Vec2BertAdapter, Wav2Vec2BertEncoder, Wav2Vec2BertEncoderLayer,
                        Wav2Vec2BertFeatureProjection, Wav2Vec2BertFeedForward)
from .outputs import CTCOutput, Wav2Vec2BertModelOutput


class _PreTrained(nn.Module):
    base_model_prefix = "wav2vec2_bert"

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None):
        """Load a transformers-format folder (config.json + model.safetensors, or a sharded safetensors index)."""
        from ..loading import load_pretrained

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

    def forward(self, input_features, attention_mask=None, output_hidden_states=False, output_attentions=False,
                output_layer=None):
        """input_features: (B, T, 160) floating; attention_mask: optional (B, T), 1 = real frame, 0 = padding,
        any pattern transformers accepts: right or left padding, holes (see :class:`Padding`: built on the device,
        no host sync, so the masked forward compiles in one graph and captures into a CUDA graph).

        Returns ``.last_hidden_state`` (B, T', output size), ``.extract_features`` (the normalised input) and, when
        asked, ``.hidden_states``: a tuple of num_hidden_layers + 1 tensors (the input to the first layer, then
        each layer's output), as transformers returns them; ``output_attentions``: ``.attentions``, each encoder
        layer's (B, heads, T, T) weights as transformers' eager attention gives them, computed on the reference
        path for that call (memory quadratic in T; warned once). Padded positions are finite but may differ from
        transformers'.

        ``output_layer=N``: ``.last_hidden_state`` is ``hidden_states[N]`` (0 = the feature projection's output,
        N = num_hidden_layers the last layer's, before any adapter), computed by layers 1 … N alone: nothing after
        layer N runs and no other layer's states are kept (what bulk extraction of one layer wants).
        """
        hidden_states, extract_features = self.feature_projection(input_features)
        encoder_outputs = self.encoder(hidden_states, attention_mask=attention_mask,
                                       output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                       output_layer=output_layer)
        hidden_states = encoder_outputs.last_hidden_state
        if self.intermediate_ffn is not None and output_layer is None:
            hidden_states = hidden_states + 0.5 * self.intermediate_ffn(hidden_states)
        if self.adapter is not None and output_layer is None:
            hidden_states = self.adapter(hidden_states, attention_mask=attention_mask)
        return Wav2Vec2BertModelOutput(hidden_states, extract_features, hidden_states=encoder_outputs.hidden_states,
                                       attentions=encoder_outputs.attentions)

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

    def forward(self, input_features, attention_mask=None, labels=None, output_hidden_states=False,
                output_attentions=False):
        outputs = self.wav2vec2_bert(input_features, attention_mask=attention_mask,
                                     output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        logits = self.lm_head(self.dropout(outputs.last_hidden_state))
        loss = None
        if labels is not None:
            if labels.max() >= self.config.vocab_size:
                raise ValueError(f"labels must be < config.vocab_size ({self.config.vocab_size})")
            if attention_mask is None:
                attention_mask = torch.ones(input_features.shape[:2], device=input_features.device, dtype=torch.long)
            logit_lengths = self.wav2vec2_bert.output_lengths(attention_mask.sum(-1)).to(torch.long)
            loss = ctc_loss(logits, labels, logit_lengths, self.config)
        return CTCOutput(logits=logits, loss=loss, hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def ctc_loss(logits, labels, logit_lengths, config, ignore_index=-100):
    """transformers' ForCTCLoss: padded labels are ``ignore_index`` or the blank (pad_token_id)."""
    blank = config.pad_token_id
    labels = labels.to(logits.device)
    labels_mask = (labels != ignore_index) & (labels != blank)
    log_probs = F.log_softmax(logits, dim=-1, dtype=torch.float32).transpose(0, 1)
    with torch.backends.cudnn.flags(enabled=False):
        return F.ctc_loss(log_probs, labels.masked_select(labels_mask), logit_lengths, labels_mask.sum(-1),
                          blank=blank, reduction=config.ctc_loss_reduction, zero_infinity=config.ctc_zero_infinity)
