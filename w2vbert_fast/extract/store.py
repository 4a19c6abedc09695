"""Where ``extract`` puts each clip's output, how it writes it, and whether one already on disk can be trusted on
a rerun.

Layout: ``OUT/<name>.safetensors`` per clip (``<name>``: the clip's path below the folder it was found in, without
its extension), a tensor ``hidden_states`` (frames, hidden) and metadata: what it was computed with (layer, dtype,
model identity, source path), which version of the source it read (size, mtime), and the clip's sample counts.

A file is written whole or not at all: bytes to ``NAME.partial``, fsync, rename, fsync of the folder, so neither a
crash nor a power cut leaves a file that a rerun would take for done. It gets the mode the umask allows, like any
file the user's programs create.

On a rerun an existing output counts as done only if it loads, its tensor is finite with the shape its metadata
implies, and its metadata matches this run: :func:`check_output` says "done", "redo" (damaged, written by an
older version without the fields checked here, or its source file changed since) or "conflict" (written with
another layer, model or dtype, or from another source file: valid data that this run would replace).
"""

import os
import tempfile
from dataclasses import dataclass

import torch

from ..ops.log_mel_fbank import SAMPLE_RATE, num_frames
from .errors import ExtractError

# metadata that names what an output was computed with: another value means another result, not a damaged file
SETTINGS = ("layer", "dtype", "model_config_sha256", "model_weights", "source")
# metadata that says which version of the source file was read: another value means the output is out of date
SOURCE_VERSION = ("source_size", "source_mtime_ns")


@dataclass(frozen=True)
class Settings:
    """What this run computes with, as its outputs record it: the layer, the dtype, the model's identity."""

    layer: int
    dtype: torch.dtype
    model_identity: dict  # {"model_config_sha256": …, "model_weights": …}


def output_path(out_dir, name) -> str:
    return os.path.join(out_dir, name + ".safetensors")


def check_output_folder(folder):
    """ExtractError unless files can be created in ``folder`` (made if missing): found before any work."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".w2vbert_fast-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise ExtractError(f"--out {folder}: cannot write there ({error.strerror}); choose another folder or make "
                           f"it writable") from None


def expected_metadata(path, settings: Settings) -> dict:
    """The metadata an output of ``path`` computed now carries (every key of SETTINGS and SOURCE_VERSION); an
    OSError if the source cannot be stat'ed."""
    source = os.stat(path)
    return {"layer": str(settings.layer), "dtype": str(settings.dtype)[6:], "source": os.path.abspath(path),
            "source_size": str(source.st_size), "source_mtime_ns": str(source.st_mtime_ns),
            **settings.model_identity}


def write_clip(out, hidden_states, metadata, num_samples, source_rate, run_metadata):
    """One clip's output, with its sample counts and ``run_metadata`` (model description, package version)
    added to ``metadata``. A write that fails (a full or read-only disk) would fail every clip after it: an
    ExtractError stops the run there."""
    try:
        save_hidden_states(out, hidden_states, {
            **metadata, "sample_rate": str(SAMPLE_RATE), "source_sample_rate": str(source_rate),
            "num_samples": str(num_samples), **run_metadata,
        })
    except OSError as error:
        raise ExtractError(f"cannot write {out} ({error.strerror}); outputs written so far are complete and a rerun "
                           f"resumes after them") from None


def save_hidden_states(path, hidden_states, metadata):
    from safetensors.torch import save

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    data = save({"hidden_states": hidden_states.contiguous().cpu()}, metadata=metadata)
    partial = path + ".partial"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0o666 & ~umask, as open() would
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(partial, path)  # a crash never leaves a file that a rerun would skip
    try:  # the rename itself survives a power cut; some file systems cannot fsync a folder, and the file is whole
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except OSError:
        pass


def manifest_row(path, out) -> dict:
    """{clip, output, frames, seconds} of the output ``out`` of clip ``path``, read from its safetensors header (no
    tensor data)."""
    from safetensors import safe_open

    with safe_open(out, framework="pt") as f:
        frames = f.get_slice("hidden_states").get_shape()[0]
        metadata = f.metadata() or {}
    try:
        seconds = int(metadata["num_samples"]) / int(metadata["sample_rate"])
    except (KeyError, ValueError):
        seconds = None  # written by a version that did not record it
    return dict(clip=path, output=out, frames=frames, seconds=seconds)


def hidden_frames(num_samples: int) -> int:
    """Frames of hidden states for a clip of ``num_samples`` at 16 kHz: fbank frames, stacked in pairs."""
    return int(num_frames(num_samples)) // 2


def check_output(path, expected: dict, hidden_size: int):
    """("done" | "redo" | "conflict", reason) for an existing output, against the ``expected`` metadata of this
    run (every key of SETTINGS and SOURCE_VERSION)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if "hidden_states" not in f.keys():
                return "redo", "holds no hidden_states tensor"
            hidden = f.get_tensor("hidden_states")
    except (SafetensorError, OSError, RuntimeError) as error:
        return "redo", f"unreadable ({error})"
    for key in SETTINGS:
        if key in metadata and metadata[key] != expected[key]:
            return "conflict", f"written with {key} {metadata[key]!r}, this run has {expected[key]!r}"
    missing = [key for key in SETTINGS + SOURCE_VERSION + ("num_samples",) if key not in metadata]
    if missing:
        return "redo", f"no {', '.join(missing)} in its metadata (written by an older version)"
    for key in SOURCE_VERSION:
        if metadata[key] != expected[key]:
            return "redo", f"its source changed since ({key} {metadata[key]} then, {expected[key]} now)"
    try:
        frames = hidden_frames(int(metadata["num_samples"]))
    except ValueError:
        return "redo", f"num_samples {metadata['num_samples']!r} in its metadata is not a number"
    if tuple(hidden.shape) != (frames, hidden_size):
        return "redo", f"hidden_states of shape {list(hidden.shape)}, expected {[frames, hidden_size]}"
    if str(hidden.dtype)[6:] != metadata["dtype"]:
        return "redo", f"hidden_states stored as {str(hidden.dtype)[6:]}, its metadata says {metadata['dtype']}"
    if hidden.is_floating_point() and not bool(torch.isfinite(hidden).all()):
        return "redo", "hidden_states hold NaN or Inf"
    return "done", ""
