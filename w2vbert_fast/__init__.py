"""w2vbert_fast: fused Triton kernels for the Wav2Vec2-BERT speech encoder (w2v-bert-2.0), drop-in.

    model = w2vbert_fast.optimize(transformers_model)                  # patch in place
    model = w2vbert_fast.Wav2Vec2BertModel.from_pretrained(folder)      # standalone, no transformers
    batch = w2vbert_fast.FbankExtractor()(waveforms, device="cuda")     # features on the GPU
    for clip, states in w2vbert_fast.load_features(out_dir): ...        # what `extract` wrote, either layout
"""

from . import ops
from .config import Wav2Vec2BertConfig
from .features import FbankExtractor
from .modeling import Wav2Vec2BertForCTC, Wav2Vec2BertModel
from .patch import optimize

__version__ = "0.1.0"

__all__ = [
    "FbankExtractor",
    "Wav2Vec2BertConfig",
    "Wav2Vec2BertForCTC",
    "Wav2Vec2BertModel",
    "load_features",
    "ops",
    "optimize",
]


def __getattr__(name):
    # The reader belongs to the extraction application (extract/ imports the library, never the reverse): it is
    # imported on first use, so importing the library does not load the application.
    if name == "load_features":
        from .extract.store import load_features

        return load_features
    raise AttributeError(f"module 'w2vbert_fast' has no attribute {name!r}")
