"""transformers-format checkpoints → our modules: config.json + model.safetensors, or a sharded index.

No transformers import on this path. The model is built on the meta device and the checkpoint's tensors are
assigned straight into it (cast to ``dtype``, moved to ``device``), so a 600M-parameter model loads without a
random initialisation it would throw away.

Faults are ValueErrors that name the file and the fix, found as early as possible: a damaged safetensors file and a
config.json whose sizes disagree with the weights from the headers alone, before any tensor data is read; NaN or
Inf weights as each tensor is read.

The identity of a checkpoint (:func:`weights_identity`, what ``extract`` records with each output) is a SHA-256 of
each weight file's bytes, so a checkpoint swapped for another of the same size and modification time is told apart
(sizes and mtimes were not enough: a probe's stale outputs passed as done). Hashing costs about 1–1.3 s per GB here
(200 MB: 0.19–0.25 s with the page cache warm, on a shared 2-core machine; w2v-bert-2.0's 2.3 GB about 2.2–2.9 s,
plus the read when cold: benchmarks/results/extract-cpu-*.json), so files of ``CACHE_MIN_BYTES`` or more are hashed
once and their digest cached (``W2VBERT_FAST_CACHE``, default ``~/.cache/w2vbert_fast``), keyed by the file's real
path, device, inode, size, mtime and ctime. ctime is set by the kernel on every change to the file and cannot be
set back from user space, so a cached digest is used only for the very file that was hashed; a cache that cannot
be read or written just means hashing again.
"""

import hashlib
import json
import os
import secrets

import torch
from safetensors import SafetensorError, safe_open

from .config import Wav2Vec2BertConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CACHE_MIN_BYTES = 64 << 20  # smaller weight files are hashed on every run (64 MB: about 60 ms)
CACHE_ENTRIES = 256


def checkpoint_files(folder) -> list:
    """The safetensors files of a checkpoint folder, or FileNotFoundError naming the folder."""
    single, index = os.path.join(folder, SINGLE_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
        return [single]
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{index} is not valid JSON ({error}): download or save it again") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index!r} has no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [name for name in files if not os.path.isfile(os.path.join(folder, name))]
        if missing:
            raise FileNotFoundError(f"{index!r} names shard(s) not in {folder!r}: {missing}")
        return [os.path.join(folder, name) for name in files]
    if any(name.endswith((".bin", ".pt", ".pth")) for name in os.listdir(folder)):
        raise FileNotFoundError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {folder!r}: only PyTorch pickles were found; re-save the model "
            f"with transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise FileNotFoundError(f"no weights in {folder!r}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _open(path):
    """safe_open, with a damaged file (empty, truncated, not safetensors) as a ValueError naming it and the fix."""
    try:
        open(path, "rb").close()  # safe_open reports any OS error as "No such file or directory"
        return safe_open(path, framework="pt", device="cpu")
    except SafetensorError as error:
        size = os.path.getsize(path)
        raise ValueError(f"{path} ({size} bytes) is not a complete safetensors file ({error}): it is empty, "
                         f"truncated or not safetensors; download or save it again") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot read it ({error.strerror or error}); check its permissions") from None


def read_headers(files) -> dict:
    """{tensor name: (file, shape)} from the files' headers only, no tensor data read."""
    headers = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                headers[name] = (path, tuple(f.get_slice(name).get_shape()))
    return headers


def check_shapes(model, headers: dict, folder):
    """Every checkpoint tensor's shape against the one ``model`` (built from config.json) expects, before any
    data is read: a config that disagrees with its weights is one ValueError naming the tensors and the fix."""
    expected = model.state_dict()
    wrong = [(name, path, shape, tuple(expected[name].shape)) for name, (path, shape) in headers.items()
             if tuple(expected[name].shape) != shape]
    if wrong:
        name, path, shape, want = wrong[0]
        more = f" (and {len(wrong) - 1} more tensors)" if len(wrong) > 1 else ""
        raise ValueError(
            f"{os.path.join(folder, 'config.json')} does not match the weights: {name} is {list(shape)} in "
            f"{os.path.basename(path)} but the config gives {list(want)}{more}; use the config.json saved with these "
            f"weights"
        )


def read_state_dict(files, dtype=None, device=None, names=None) -> dict:
    """The tensors of ``files`` (``names``: {checkpoint name: model name}, default all under their own names),
    cast to ``dtype`` and moved to ``device``. A NaN or Inf value (stored, or made by the cast) is a ValueError
    naming the tensor: it would turn every output into NaN without a word."""
    state = {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if names is not None and name not in names:
                    continue
                tensor = f.get_tensor(name)
                stored = tensor.dtype
                if not tensor.is_floating_point():
                    # every weight and buffer of the model is floating point: an integer tensor is a damaged or
                    # foreign checkpoint, and load_state_dict would fail on it with a traceback that names nothing
                    raise ValueError(f"{path}: tensor {name} is stored as {str(stored)[6:]}, expected a floating-point "
                                     f"weight: the checkpoint is not a Wav2Vec2-BERT model saved by transformers")
                if not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise ValueError(f"{path}: tensor {name} holds {bad} NaN or Inf values of {tensor.numel()}: the "
                                     f"checkpoint is damaged; download or save it again")
                if dtype is not None:
                    tensor = tensor.to(dtype)
                    if not bool(torch.isfinite(tensor).all()):
                        raise ValueError(f"{path}: tensor {name} overflows {str(dtype)[6:]} (stored as "
                                         f"{str(stored)[6:]}); load it in a wider dtype (bfloat16 or float32)")
                state[name if names is None else names[name]] = tensor.to(device) if device is not None else tensor
    return state


def match_keys(model, checkpoint: dict) -> dict:
    """Map checkpoint names onto ``model``'s. A base model takes the ``wav2vec2_bert.`` part of a head model's
    checkpoint (the head's own weights are not its concern); a head model takes a checkpoint saved with the prefix.
    Missing or unexpected weights are a ValueError that lists them."""
    prefix = model.base_model_prefix + "."
    expected = set(model.state_dict().keys())
    is_base = not any(name.startswith(prefix) for name in expected)
    has_prefix = any(name.startswith(prefix) for name in checkpoint)
    if is_base and has_prefix:
        checkpoint = {name[len(prefix):]: t for name, t in checkpoint.items() if name.startswith(prefix)}
    elif not is_base and not has_prefix:
        checkpoint = {(name if name.split(".")[0] in _head_roots(model) else prefix + name): t
                      for name, t in checkpoint.items()}
    missing = sorted(expected - checkpoint.keys())
    unexpected = sorted(checkpoint.keys() - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {missing}")
        if unexpected:
            parts.append(f"unexpected weights {unexpected}")
        raise ValueError(f"checkpoint does not match {type(model).__name__}: " + "; ".join(parts))
    return checkpoint


def _head_roots(model) -> set:
    return {name for name, _ in model.named_children() if name != model.base_model_prefix}


def load_pretrained(cls, folder, dtype=None, device=None):
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    config = Wav2Vec2BertConfig.from_pretrained(folder)
    files = checkpoint_files(folder)
    with torch.device("meta"):
        model = cls(config)
    # names and shapes from the headers first: a mismatch is found before gigabytes are read
    headers = match_keys(model, {name: (name, header) for name, header in read_headers(files).items()})
    check_shapes(model, {model_name: header for model_name, (_, header) in headers.items()}, folder)
    names = {checkpoint_name: model_name for model_name, (checkpoint_name, _) in headers.items()}
    state = read_state_dict(files, dtype, device, names)
    model.load_state_dict(state, strict=True, assign=True)
    model.reset_buffers(device)
    return model.eval()


# --------------------------------------------------------------------------- identity of a checkpoint
def weights_identity(folder) -> str:
    """What tells the weights of checkpoint ``folder`` from any other's: ``"<file> sha256:<hex>"`` per weight file,
    joined by ``;``. ValueError naming a file that cannot be read."""
    cache = DigestCache(cache_folder())
    weights = ";".join(f"{os.path.basename(f)} sha256:{cache.sha256(f)}" for f in checkpoint_files(folder))
    cache.save()
    return weights


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
        raise ValueError(f"{path}: cannot read it to identify the model ({error.strerror})") from None
