"""Wav2Vec2BertConfig: transformers' field names and defaults, read from a ``config.json``, validated up front.

Unknown keys (``architectures``, ``id2label``, ``torch_dtype``, …) are kept as attributes and written back by
``to_dict``, so a config round-trips unchanged.
"""

import json
import os

POSITION_EMBEDDING_TYPES = ("relative_key", "relative", "rotary", None)

DEFAULTS = {
    "vocab_size": None,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "feature_projection_input_dim": 160,
    "hidden_act": "swish",
    "hidden_dropout": 0.0,
    "activation_dropout": 0.0,
    "attention_dropout": 0.0,
    "feat_proj_dropout": 0.0,
    "final_dropout": 0.1,
    "layerdrop": 0.1,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-5,
    "apply_spec_augment": True,
    "mask_time_prob": 0.05,
    "mask_time_length": 10,
    "mask_time_min_masks": 2,
    "mask_feature_prob": 0.0,
    "mask_feature_length": 10,
    "mask_feature_min_masks": 0,
    "ctc_loss_reduction": "sum",
    "ctc_zero_infinity": False,
    "use_weighted_layer_sum": False,
    "classifier_proj_size": 768,
    "tdnn_dim": [512, 512, 512, 512, 1500],
    "tdnn_kernel": [5, 3, 3, 1, 1],
    "tdnn_dilation": [1, 2, 3, 1, 1],
    "xvector_output_dim": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "add_adapter": False,
    "adapter_kernel_size": 3,
    "adapter_stride": 2,
    "num_adapter_layers": 1,
    "adapter_act": "relu",
    "use_intermediate_ffn_before_adapter": False,
    "output_hidden_size": None,
    "position_embeddings_type": "relative_key",
    "rotary_embedding_base": 10000,
    "max_source_positions": 5000,
    "left_max_position_embeddings": 64,
    "right_max_position_embeddings": 8,
    "conv_depthwise_kernel_size": 31,
    "conformer_conv_dropout": 0.1,
}

_POSITIVE_INTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "feature_projection_input_dim", "conv_depthwise_kernel_size", "adapter_kernel_size",
                  "adapter_stride", "num_adapter_layers", "output_hidden_size", "max_source_positions",
                  "rotary_embedding_base")
_NON_NEGATIVE_INTS = ("left_max_position_embeddings", "right_max_position_embeddings")
_PROBABILITIES = ("hidden_dropout", "activation_dropout", "attention_dropout", "feat_proj_dropout", "final_dropout",
                  "layerdrop", "conformer_conv_dropout", "mask_time_prob", "mask_feature_prob")


class Wav2Vec2BertConfig:
    """The architecture of a Wav2Vec2-BERT model, with transformers' names and defaults.

    ``Wav2Vec2BertConfig(hidden_size=48, num_attention_heads=3)``; ``Wav2Vec2BertConfig.from_pretrained(folder)``.
    Invalid values raise ValueError naming the field and what was expected.
    """

    model_type = "wav2vec2-bert"

    def __init__(self, **kwargs):
        values = dict(DEFAULTS)
        values.update(kwargs)
        for key, value in values.items():
            setattr(self, key, value)
        if self.output_hidden_size is None:
            self.output_hidden_size = self.hidden_size
        self.validate()

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, values: dict) -> "Wav2Vec2BertConfig":
        if not isinstance(values, dict):
            raise ValueError(f"config must be a JSON object (dict), got {type(values).__name__}")
        return cls(**values)

    @classmethod
    def from_json_file(cls, path) -> "Wav2Vec2BertConfig":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config file at {path!r}")
        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{path!r} is not valid JSON ({err}): fix it, or use the config.json saved with "
                                 f"the weights") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path!r} must hold a JSON object of config fields, got {type(values).__name__}")
        return cls.from_dict(values)

    @classmethod
    def from_pretrained(cls, folder) -> "Wav2Vec2BertConfig":
        """Read ``folder/config.json`` as written by transformers' ``save_pretrained``."""
        folder = os.fspath(folder)
        path = os.path.join(folder, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in {folder!r}")
        return cls.from_json_file(path)

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            f.write(self.to_json_string() + "\n")

    # --------------------------------------------------------------------------------------- derived
    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_labels(self) -> int:
        id2label = getattr(self, "id2label", None)
        return len(id2label) if id2label else 2

    def __repr__(self):
        return f"Wav2Vec2BertConfig({self.to_json_string()})"

    def __eq__(self, other):
        return isinstance(other, Wav2Vec2BertConfig) and self.to_dict() == other.to_dict()

    # ------------------------------------------------------------------------------------ validation
    def validate(self):
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        for name in _NON_NEGATIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"config.{name} must be a non-negative integer, got {value!r}")
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"config.{name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) \
                or not self.layer_norm_eps > 0:
            raise ValueError(f"config.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config.hidden_size ({self.hidden_size}) must be divisible by config.num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.conv_depthwise_kernel_size % 2 == 0:
            raise ValueError(
                f"config.conv_depthwise_kernel_size must be odd (causal 'SAME' padding), got "
                f"{self.conv_depthwise_kernel_size}"
            )
        if self.position_embeddings_type not in POSITION_EMBEDDING_TYPES:
            raise ValueError(
                f"config.position_embeddings_type must be one of {POSITION_EMBEDDING_TYPES}, got "
                f"{self.position_embeddings_type!r}"
            )
        if self.position_embeddings_type == "rotary" and self.head_size % 2:
            raise ValueError(f"rotary position embeddings need an even head size, got {self.head_size}")
        if self.position_embeddings_type == "relative" and self.hidden_size % 2:
            raise ValueError(f"relative position embeddings need an even config.hidden_size, got {self.hidden_size}")
        # imported here, not at the top: modeling imports this module, and the names live in its one table
        from .modeling.activations import ACTIVATIONS

        for name in ("hidden_act", "adapter_act"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"config.{name} must be one of {ACTIVATIONS}, got {getattr(self, name)!r}")
        if self.use_intermediate_ffn_before_adapter and not self.add_adapter:
            raise ValueError("config.use_intermediate_ffn_before_adapter is True but config.add_adapter is False")
        if self.add_adapter and self.output_hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config.output_hidden_size ({self.output_hidden_size}) must be divisible by "
                f"config.num_attention_heads ({self.num_attention_heads}) when config.add_adapter is True"
            )
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)
                                            or self.vocab_size <= 0):
            raise ValueError(f"config.vocab_size must be a positive integer or None, got {self.vocab_size!r}")
        if self.ctc_loss_reduction not in ("sum", "mean", "none"):
            raise ValueError(f"config.ctc_loss_reduction must be 'sum', 'mean' or 'none', got {self.ctc_loss_reduction!r}")
