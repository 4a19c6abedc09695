"""optimize(): put our fast forwards on a loaded transformers Wav2Vec2Bert* model, in place.

Our modules carry transformers' attribute names, so the same ``forward`` functions serve both: each matching
submodule gets ours bound to the instance (as Liger-Kernel's ``_bind_method_to_module`` does). No parameter is
copied, moved or renamed: the state_dict is untouched, and transformers' own Model.forward, heads, output
capturing (``output_hidden_states``) and losses keep working around the patched submodules.

Training keeps working too. transformers (5.2x) checkpoints an encoder layer through a wrapper on its class's
``forward``, which a forward bound on the instance bypasses; so our layer forward checkpoints itself, reading the
flags transformers' ``gradient_checkpointing_enable()`` / ``activation_checkpointing_enable()`` set on each layer
(``gradient_checkpointing``, ``_gradient_checkpointing_func``). Enabling it before or after optimize() is the same.
"""

import types

from torch import nn

from . import modeling

# transformers class name → the class whose forward replaces it
_FORWARDS = {
    "Wav2Vec2BertFeatureProjection": modeling.Wav2Vec2BertFeatureProjection,
    "Wav2Vec2BertEncoder": modeling.Wav2Vec2BertEncoder,
    "Wav2Vec2BertEncoderLayer": modeling.Wav2Vec2BertEncoderLayer,
    "Wav2Vec2BertSelfAttention": modeling.Wav2Vec2BertSelfAttention,
    "Wav2Vec2BertConvolutionModule": modeling.Wav2Vec2BertConvolutionModule,
    "Wav2Vec2BertAdapter": modeling.Wav2Vec2BertAdapter,
    "Wav2Vec2BertAdapterLayer": modeling.Wav2Vec2BertAdapterLayer,
}
SUPPORTED_MODELS = (
    "Wav2Vec2BertModel",
    "Wav2Vec2BertForCTC",
    "Wav2Vec2BertForSequenceClassification",
    "Wav2Vec2BertForAudioFrameClassification",
    "Wav2Vec2BertForXVector",
)


def _is_transformers_class(obj, names) -> bool:
    return any(
        cls.__name__ in names and cls.__module__.startswith("transformers.") for cls in type(obj).__mro__
    )


def optimize(model):
    """Make a transformers ``Wav2Vec2BertModel`` / ``ForCTC`` / ``ForSequenceClassification`` /
    ``ForAudioFrameClassification`` / ``ForXVector`` use w2vbert_fast's kernels. Patches in place and returns the
    same object; state_dict keys and values are unchanged; calling it again is harmless. A w2vbert_fast model is
    returned as it is (it is fast already). Anything else is a TypeError.

    ``output_attentions=True`` returns the weights transformers returns (an eager-attention model: every encoder
    layer's; sdpa: none, as transformers): the attention runs its reference path for that call, quadratic in memory
    (warned once). Every other call runs the fused path and materialises nothing of size L×L.
    """
    if isinstance(model, (modeling.Wav2Vec2BertModel, modeling.Wav2Vec2BertForCTC)):
        return model
    if not isinstance(model, nn.Module) or not _is_transformers_class(model, SUPPORTED_MODELS):
        raise TypeError(
            f"optimize() takes a transformers model of class {', '.join(SUPPORTED_MODELS)}; got {type(model).__name__}"
        )
    for module in model.modules():
        for cls in type(module).__mro__:
            replacement = _FORWARDS.get(cls.__name__)
            if replacement is not None and cls.__module__.startswith("transformers."):
                module.forward = types.MethodType(replacement.forward, module)
                break
    return model


def is_optimized(module: nn.Module) -> bool:
    """Whether ``module.forward`` is one of ours (bound by optimize() or by construction)."""
    forward = getattr(module, "forward", None)
    return getattr(forward, "__func__", None) in {cls.forward for cls in _FORWARDS.values()}
