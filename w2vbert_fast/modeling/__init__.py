"""The Wav2Vec2-BERT model as plain nn.Modules with transformers' names, a file per idea: outputs, masks,
activations, attention, conformer (blocks, encoder, adapter), models (the public models and heads)."""

from .activations import ACTIVATIONS, activation, is_silu
from .attention import (Wav2Vec2BertRelPositionalEmbedding, Wav2Vec2BertRotaryPositionalEmbedding,
                        Wav2Vec2BertSelfAttention, apply_rotary_embedding, attention_with_bias,
                        relative_position_bias)
from .conformer import (Wav2Vec2BertAdapter, Wav2Vec2BertAdapterLayer, Wav2Vec2BertConvolutionModule,
                        Wav2Vec2BertEncoder, Wav2Vec2BertEncoderLayer, Wav2Vec2BertFeatureProjection,
                        Wav2Vec2BertFeedForward, check_input_features, conformer_block)
from .masks import Padding, check_mask_values
from .models import Wav2Vec2BertForCTC, Wav2Vec2BertModel, ctc_loss
from .outputs import CTCOutput, EncoderOutput, Wav2Vec2BertModelOutput

__all__ = [
    "ACTIVATIONS", "CTCOutput", "EncoderOutput", "Padding", "Wav2Vec2BertAdapter", "Wav2Vec2BertAdapterLayer",
    "Wav2Vec2BertConvolutionModule", "Wav2Vec2BertEncoder", "Wav2Vec2BertEncoderLayer",
    "Wav2Vec2BertFeatureProjection", "Wav2Vec2BertFeedForward", "Wav2Vec2BertForCTC", "Wav2Vec2BertModel",
    "Wav2Vec2BertModelOutput", "Wav2Vec2BertRelPositionalEmbedding", "Wav2Vec2BertRotaryPositionalEmbedding",
    "Wav2Vec2BertSelfAttention", "activation", "apply_rotary_embedding", "attention_with_bias", "check_input_features",
    "check_mask_values", "conformer_block", "ctc_loss", "is_silu", "relative_position_bias",
]
