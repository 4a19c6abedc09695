"""The model an extraction runs: where it comes from (a checkpoint folder, or seeded random weights of an
architecture), loading it with its feature extractor, the identity its outputs record, and running it only up to
the layer asked for. Clear one-line errors (ExtractError) for a folder that cannot be used."""

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Wav2Vec2BertConfig
from ..features import FbankExtractor
from ..loading import checkpoint_files
from ..modeling import Wav2Vec2BertModel
from .errors import ExtractError

DEFAULT_LAYER = 17  # what TTS systems take from w2v-bert-2.0's 24 layers


@dataclass(frozen=True)
class ModelSource:
    """``folder``: a transformers-format checkpoint (config.json + model.safetensors); or, when it is None,
    seeded random weights of ``architecture`` (config.json keys) named ``name`` — for tests and quick checks."""

    folder: Optional[str] = None
    architecture: Optional[dict] = None
    name: str = ""
    seed: int = 0

    def __post_init__(self):
        if (self.folder is None) == (self.architecture is None):
            raise ValueError("ModelSource takes a checkpoint folder or a random architecture, exactly one")


def load_model(source: ModelSource, device, dtype):
    """(model in eval mode on ``device`` in ``dtype``, a one-line description of it)."""
    if source.folder is not None:
        try:
            model = Wav2Vec2BertModel.from_pretrained(source.folder, dtype=dtype, device=device)
        except (OSError, ValueError) as error:  # each names the file at fault and the fix
            raise ExtractError(f"--model {source.folder}: {error}") from None
        return model, f"{source.folder}"
    torch.manual_seed(source.seed)  # built on the CPU, so the same seed gives the same weights on any device
    model = Wav2Vec2BertModel(Wav2Vec2BertConfig(**source.architecture)).to(device=device, dtype=dtype).eval()
    return model, f"{source.name} architecture, random weights (seed {source.seed})"


def feature_extractor(source: ModelSource) -> FbankExtractor:
    """The checkpoint's preprocessor_config.json settings when it has one, else w2v-bert-2.0's."""
    folder = source.folder
    if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        try:
            return FbankExtractor.from_pretrained(folder)
        except (OSError, ValueError, TypeError) as error:
            raise ExtractError(f"--model {folder}: {error}") from None
    return FbankExtractor()


def model_identity(source: ModelSource, model) -> dict:
    """Output metadata that tells one model from another: a hash of its config, and the weight files' size and
    modification time (or the seed of random weights). Hashing gigabytes of weights on every run would cost
    more than it saves."""
    config = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    if source.folder is not None:
        stats = [(os.path.basename(f), os.stat(f)) for f in checkpoint_files(source.folder)]
        weights = ";".join(f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in stats)
    else:
        weights = f"random {source.name} seed {source.seed}"
    return {"model_config_sha256": config, "model_weights": weights}


def choose_layer(requested, model) -> int:
    """The hidden state to extract (0 = after the feature projection, N = output of layer N): ``requested`` if
    this model has it; None: DEFAULT_LAYER, or the last layer of a model with fewer."""
    layers = model.config.num_hidden_layers
    layer = min(DEFAULT_LAYER, layers) if requested is None else requested
    if not 0 <= layer <= layers:
        raise ExtractError(f"--layer must be between 0 (the input to the first layer) and {layers} (the last "
                           f"layer's output) for this model, got {layer}")
    return layer


@contextlib.contextmanager
def up_to_layer(model, layer):
    """``model`` running its first ``layer`` encoder layers only: the ones after it would cost time for a result
    nobody reads. The slice shares the layers' modules (nothing copied), and the full list is put back on the way
    out, so whoever holds the model gets it whole again."""
    layers = model.encoder.layers
    model.encoder.layers = layers[:layer]
    try:
        yield model
    finally:
        model.encoder.layers = layers
