"""The model an extraction runs: where it comes from (a checkpoint folder, or seeded random weights of an
architecture), loading it with its feature extractor (its settings checked against the model before any work), and
the identity its outputs record. Clear one-line errors (ExtractError) for a folder that cannot be used.

The identity of a checkpoint is a SHA-256 of each weight file's bytes, so a checkpoint swapped for another of the
same size and modification time is told apart (sizes and mtimes were not enough: a probe's stale outputs passed as
done). Hashing costs about 1–1.3 s per GB here (200 MB: 0.19–0.25 s with the page cache warm, on a shared 2-core
machine; w2v-bert-2.0's 2.3 GB about 2.2–2.9 s, plus the read when cold: benchmarks/results/extract-cpu-*.json),
so files of ``CACHE_MIN_BYTES`` or more are hashed once and their digest
cached (``W2VBERT_FAST_CACHE``, default ``~/.cache/w2vbert_fast``), keyed by the file's real path, device, inode,
size, mtime and ctime. ctime is set by the kernel on every change to the file and cannot be set back from user
space, so a cached digest is used only for the very file that was hashed; a cache that cannot be read or written
just means hashing again.
"""

import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from typing import Optional

import torch

from ..config import Wav2Vec2BertConfig
from ..features import FbankExtractor
from ..loading import checkpoint_files
from ..modeling import Wav2Vec2BertModel
from .errors import ExtractError

DEFAULT_LAYER = 17  # what TTS systems take from w2v-bert-2.0's 24 layers
CACHE_MIN_BYTES = 64 << 20  # smaller weight files are hashed on every run (64 MB: about 60 ms)
CACHE_ENTRIES = 256


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
    """The checkpoint's preprocessor_config.json settings when it has one, else w2v-bert-2.0's. Padding on the
    right and the attention mask always: where the padding goes changes no clip's hidden states, and extract
    slices each clip's frames from the start."""
    folder = source.folder
    if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        try:
            return FbankExtractor.from_pretrained(folder, padding_side="right", return_attention_mask=True)
        except (OSError, ValueError, TypeError) as error:
            raise ExtractError(f"--model {folder}: {error}") from None
    return FbankExtractor()


def check_features(extractor, model, source: ModelSource):
    """ExtractError, before any work, if the extractor's rows do not fit the model's feature projection (e.g.
    ``"stride": 3`` in preprocessor_config.json: 240 values a row for a model that takes 160)."""
    width = extractor.num_mel_bins * extractor.stride
    expected = model.config.feature_projection_input_dim
    if width != expected or extractor.stride != 2:  # 2: the frame pairs store.hidden_frames counts
        where = f"--model {source.folder}: {os.path.join(source.folder, 'preprocessor_config.json')}" \
            if source.folder else "the feature extractor"
        raise ExtractError(f"{where} gives stride {extractor.stride} ({width} values a "
                           f"row) and config.json's feature_projection_input_dim is {expected}: extract takes stride 2 "
                           f"and 160 (2 × {extractor.num_mel_bins} mel bins, as w2v-bert-2.0); fix the stride or "
                           f"delete the file")


def model_identity(source: ModelSource, model) -> dict:
    """Output metadata that tells one model from another: a hash of its config, and of each weight file's bytes
    (or the seed of random weights)."""
    config = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    if source.folder is not None:
        cache = DigestCache(cache_folder())
        weights = ";".join(f"{os.path.basename(f)} sha256:{cache.sha256(f)}" for f in checkpoint_files(source.folder))
        cache.save()
    else:
        weights = f"random {source.name} seed {source.seed}"
    return {"model_config_sha256": config, "model_weights": weights}


def cache_folder() -> str:
    return os.environ.get("W2VBERT_FAST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "w2vbert_fast")


class DigestCache:
    """SHA-256 digests of large files, keyed by what identifies one version of one file (see the module's
    docstring); kept in ``folder/weights-sha256.json``, the most recent CACHE_ENTRIES."""

    def __init__(self, folder):
        self.path = os.path.join(folder, "weights-sha256.json")
        self.changed = False
        try:
            with open(self.path, encoding="utf-8") as f:
                self.entries = json.load(f)
            if not isinstance(self.entries, dict):
                self.entries = {}
        except (OSError, ValueError):
            self.entries = {}

    def sha256(self, path) -> str:
        st = os.stat(path)
        if st.st_size < CACHE_MIN_BYTES:
            return file_sha256(path)
        real = os.path.realpath(path)
        key = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        entry = self.entries.get(real)
        if isinstance(entry, dict) and entry.get("key") == key and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = file_sha256(path)
        self.entries.pop(real, None)
        self.entries[real] = {"key": key, "sha256": digest}  # last: the newest
        self.changed = True
        return digest

    def save(self):
        if not self.changed:
            return
        keep = dict(list(self.entries.items())[-CACHE_ENTRIES:])
        partial = f"{self.path}.{os.getpid()}-{secrets.token_hex(4)}.partial"
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            with open(partial, "w", encoding="utf-8") as f:
                json.dump(keep, f)
            os.replace(partial, self.path)
        except OSError:  # a read-only home: hash again next time
            try:
                os.remove(partial)
            except OSError:
                pass


def file_sha256(path) -> str:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        return digest.hexdigest()
    except OSError as error:
        raise ExtractError(f"{path}: cannot read it to identify the model ({error.strerror})") from None


def choose_layer(requested, model) -> int:
    """The hidden state to extract (0 = after the feature projection, N = output of layer N): ``requested`` if
    this model has it; None: DEFAULT_LAYER, or the last layer of a model with fewer."""
    layers = model.config.num_hidden_layers
    layer = min(DEFAULT_LAYER, layers) if requested is None else requested
    if not 0 <= layer <= layers:
        raise ExtractError(f"--layer must be between 0 (the input to the first layer) and {layers} (the last "
                           f"layer's output) for this model, got {layer}")
    return layer
