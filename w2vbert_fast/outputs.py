"""The files ``extract`` writes, and whether one already on disk can be trusted on a rerun.

A file is written whole or not at all: bytes to ``NAME.partial``, fsync, rename, fsync of the folder, so neither a
crash nor a power cut leaves a file that a rerun would take for done. It gets the mode the umask allows, like any
file the user's programs create.

On a rerun an existing output counts as done only if it loads, its tensor is finite with the shape its metadata
implies, and its metadata matches this run: :func:`check_output` says "done", "redo" (damaged, written by an
older version without the fields checked here, or its source file changed since) or "conflict" (written with
another layer, model or dtype, or from another source file: valid data that this run would replace).
"""

import os

import torch

from .ops.log_mel_fbank import num_frames

# metadata that names what an output was computed with: another value means another result, not a damaged file
SETTINGS = ("layer", "dtype", "model_config_sha256", "model_weights", "source")
# metadata that says which version of the source file was read: another value means the output is out of date
SOURCE_VERSION = ("source_size", "source_mtime_ns")


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
