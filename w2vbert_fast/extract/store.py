"""Where ``extract`` puts each clip's output, how it writes it, whether one already on disk can be trusted on a
rerun, and reading them back. Two layouts, one file per clip and shards of many clips; both record the same
metadata per clip and are read back by :func:`load_features`.

Per clip: ``OUT/<name>.safetensors`` (``<name>``: the clip's path below the folder it was found in, without its
extension), a tensor ``hidden_states`` (frames, hidden) and metadata: what it was computed with (layer, dtype, the
dtype it is stored in, model identity, source real path), which version of the source it read (size, mtime), and
the clip's sample counts.

A file is written whole or not at all: bytes to ``NAME.<run>.partial`` (a name of this run's own, so two runs into
one folder never write the same partial file), fsync, rename; the folder is fsynced once per batch, not per file
(a rename lost to a power cut just means the clip is redone). So neither a crash nor a power cut leaves a file
that a rerun would take for done. It gets the mode the umask allows, like any file the user's programs create.

On a rerun an existing output counts as done only if it loads, its tensor is finite with the shape its metadata
implies, and its metadata matches this run: :func:`check_output` says "done", "redo" (damaged, written by an
older version without the fields checked here, or its source file changed since) or "conflict" (written with
another layer, model, dtype or stored dtype, or from another source file: valid data that this run would replace).

Shards (``--shard-size N``): many clips per safetensors file, for corpora where one file per clip (and an fsync
per file) is what shared file systems handle worst.

``OUT/shards/<run>-<rank>-<seq>.safetensors``: one tensor per clip, keyed by the clip's name, and in the file's
metadata the settings every clip shares (layer, dtype, save_dtype, model identity, sample rate, package version),
the time it was written, and ``index``: a JSON list with each clip's name, source real path, source version (size,
mtime) and sample counts — so a shard is self-describing, and written whole or not at all (one atomic file, one
fsync of its data; the folder is fsynced when the run ends: a rename lost to a power cut means its clips are
redone, never that a damaged shard is taken as done).

Resume reads the shards' headers only (no tensor data): a clip is done if the newest shard holding it has it with
this run's settings, the source version it has now, and the shape and dtype its sample count implies. The data
itself was checked finite before it was written. A clip redone (its source changed, or ``--overwrite``) goes into
a new shard; the older entry stays on disk but is superseded: readers (:func:`load_features`) take each clip
from the newest shard that has it. A shard whose header cannot be read is renamed ``*.damaged`` (kept for
inspection, read by nobody) and its clips are redone.

Reading back, either layout, without knowing it: ``load_features(out_dir)`` yields
``(name, hidden_states)`` — ``name`` the clip's output name (its path below the folder it was found in, or as its
manifest line names it, without extension), ``hidden_states`` a (frames, hidden) CPU tensor in the dtype it was
stored in (``--save-dtype``).
"""

import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops.log_mel_fbank import SAMPLE_RATE, num_frames
from . import ExtractError

# metadata that names what an output was computed with: another value means another result, not a damaged file
SETTINGS = ("layer", "dtype", "model_config_sha256", "model_weights", "source")
# metadata that says which version of the source file was read: another value means the output is out of date
SOURCE_VERSION = ("source_size", "source_mtime_ns")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHARD_FOLDER = "shards"
SHARD_LAYOUT = "shards"  # the "layout" a shard's metadata names
# safetensors' dtype names in a header, for the dtypes extract stores
HEADER_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# the per-clip fields of a shard's index; the rest of a clip's metadata is the shard's
INDEX_FIELDS = ("name", "source", "source_size", "source_mtime_ns", "num_samples", "source_sample_rate")


@dataclass(frozen=True)
class Settings:
    """What this run computes with, as its outputs record it: the layer, the dtype, the model's identity, and the
    dtype the hidden states are stored in (None: the dtype they are computed in)."""

    layer: int
    dtype: torch.dtype
    model_identity: dict  # {"model_config_sha256": …, "model_weights": …}
    save_dtype: Optional[torch.dtype] = None

    @property
    def stored_dtype(self) -> torch.dtype:
        return self.save_dtype or self.dtype

    def metadata(self) -> dict:
        """The metadata every output of this run carries for its settings (the source's is per clip)."""
        return {"layer": str(self.layer), "dtype": dtype_name(self.dtype), "save_dtype": dtype_name(self.stored_dtype),
                **self.model_identity}


def dtype_name(dtype) -> str:
    return str(dtype)[6:]


def run_tag() -> str:
    """A name part of this run's own: its partial files and shards never collide with another run's."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


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


def existing_outputs(out_dir) -> set:
    """The names of the per-clip outputs in ``out_dir``: one listing of the folder, not a stat per clip."""
    names = set()
    for root, dirs, files in os.walk(out_dir):
        if root == out_dir and SHARD_FOLDER in dirs:
            dirs.remove(SHARD_FOLDER)
        for file in files:
            if file.endswith(".safetensors"):
                names.add(os.path.relpath(os.path.join(root, file), out_dir)[: -len(".safetensors")])
    return names


def source_metadata(path) -> dict:
    """The source's real path and version (size, mtime); an OSError if it cannot be stat'ed."""
    source = os.stat(path)
    return {"source": os.path.realpath(path), "source_size": str(source.st_size),
            "source_mtime_ns": str(source.st_mtime_ns)}


def expected_metadata(path, settings: Settings) -> dict:
    """The metadata an output of ``path`` computed now carries (every key of SETTINGS and SOURCE_VERSION); an
    OSError if the source cannot be stat'ed."""
    return {**settings.metadata(), **source_metadata(path)}


def clip_metadata(metadata, num_samples, source_rate, run_metadata) -> dict:
    """An output's whole metadata: its settings and source's, its sample counts, the run's (model, version)."""
    return {**metadata, "sample_rate": str(SAMPLE_RATE), "source_sample_rate": str(source_rate),
            "num_samples": str(num_samples), **run_metadata}


def write_clip(out, hidden_states, metadata, partial):
    """One clip's output, through ``partial`` (this run's own name); the folder is not fsynced (the caller does it
    once per batch). A write that fails (a full or read-only disk) would fail every clip after it: an
    ExtractError stops the run there."""
    try:
        save_hidden_states(out, hidden_states, metadata, partial=partial, sync_folder=False)
    except OSError as error:
        raise ExtractError(f"cannot write {out} ({error.strerror}); outputs written so far are complete and a rerun "
                           f"resumes after them") from None


def save_hidden_states(path, hidden_states, metadata, partial=None, sync_folder=True):
    """``{"hidden_states": …}`` with ``metadata`` to ``path``, atomically: to ``partial`` (default
    ``path.partial``), fsync, rename, and the folder fsynced unless ``sync_folder`` is False."""
    from safetensors.torch import save

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomically(path, save({"hidden_states": hidden_states.contiguous().cpu()}, metadata=metadata),
                     partial or path + ".partial")
    if sync_folder:
        fsync_folder(os.path.dirname(path) or ".")


def write_atomically(path, data, partial):
    """``data`` (bytes) to ``partial``, fsync, rename to ``path``: a crash never leaves a file a rerun would skip."""
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # 0o666 & ~umask, as open() would
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.remove(partial)
        except OSError:
            pass
        raise
    os.close(fd)
    os.replace(partial, path)


def fsync_folder(folder):
    """Make the renames in ``folder`` survive a power cut; some file systems cannot fsync a folder, and the files
    are whole either way."""
    try:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def manifest_row(path, output, num_samples, key=None) -> dict:
    """{clip, output, [key,] frames, seconds} of clip ``path`` stored in ``output`` (relative to OUT; ``key``: its
    tensor in a shard)."""
    row = dict(clip=path, output=output)
    if key is not None:
        row["key"] = key
    row.update(frames=hidden_frames(num_samples), seconds=num_samples / SAMPLE_RATE)
    return row


def hidden_frames(num_samples: int) -> int:
    """Frames of hidden states for a clip of ``num_samples`` at 16 kHz: fbank frames, stacked in pairs."""
    return int(num_frames(num_samples)) // 2


def check_metadata(metadata: dict, expected: dict, hidden_size: int, shape, dtype: str):
    """("done" | "redo" | "conflict", reason) of one stored clip — its ``metadata``, its tensor's ``shape`` and
    ``dtype`` (a name: "float32", …) — against the ``expected`` metadata of this run (every key of SETTINGS and SOURCE_VERSION, and
    save_dtype)."""
    for key in SETTINGS:
        if key == "model_weights" and key in metadata and not _content_identity(metadata[key]):
            return "redo", (f"its model identity {metadata[key]!r} is the weights' size and mtime only (written by an "
                            f"older version)")
        if key in metadata and metadata[key] != expected[key]:
            return "conflict", f"written with {key} {metadata[key]!r}, this run has {expected[key]!r}"
    missing = [key for key in SETTINGS + SOURCE_VERSION + ("num_samples",) if key not in metadata]
    if missing:
        return "redo", f"no {', '.join(missing)} in its metadata (written by an older version)"
    stored = metadata.get("save_dtype", metadata["dtype"])  # older versions stored in the dtype they computed in
    if stored != expected["save_dtype"]:
        return "conflict", f"written with save_dtype {stored!r}, this run has {expected['save_dtype']!r}"
    for key in SOURCE_VERSION:
        if metadata[key] != expected[key]:
            return "redo", f"its source changed since ({key} {metadata[key]} then, {expected[key]} now)"
    try:
        frames = hidden_frames(int(metadata["num_samples"]))
    except ValueError:
        return "redo", f"num_samples {metadata['num_samples']!r} in its metadata is not a number"
    if tuple(shape) != (frames, hidden_size):
        return "redo", f"hidden_states of shape {list(shape)}, expected {[frames, hidden_size]}"
    if dtype != stored:
        return "redo", f"hidden_states stored as {dtype}, its metadata says {stored}"
    return "done", ""


def _content_identity(weights: str) -> bool:
    """Whether a recorded model_weights tells models apart by content (a hash, or the seed of random weights)."""
    return weights.startswith("random ") or all(" sha256:" in part for part in weights.split(";"))


def check_output(path, expected: dict, hidden_size: int):
    """("done" | "redo" | "conflict", reason, its metadata) for an existing per-clip output, against the
    ``expected`` metadata of this run; "done" also needs its tensor finite."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if "hidden_states" not in f.keys():
                return "redo", "holds no hidden_states tensor", metadata
            hidden = f.get_tensor("hidden_states")
    except (SafetensorError, OSError, RuntimeError) as error:
        return "redo", f"unreadable ({error})", {}
    verdict, reason = check_metadata(metadata, expected, hidden_size, hidden.shape, dtype_name(hidden.dtype))
    if verdict == "done" and hidden.is_floating_point() and not bool(torch.isfinite(hidden).all()):
        return "redo", "hidden_states hold NaN or Inf", metadata
    return verdict, reason, metadata


def check_layout(out_dir, sharded: bool):
    """ExtractError, before any work, if ``out_dir`` holds the other layout's outputs: one folder, one layout (so
    a reader never has to choose)."""
    shard_dir = shard_folder(out_dir)
    has_shards = os.path.isdir(shard_dir) and any(n.endswith(".safetensors") for n in os.listdir(shard_dir))
    if sharded and existing_outputs(out_dir):
        raise ExtractError(f"--out {out_dir} holds one output file per clip; --shard-size writes shards: extract "
                           f"into another --out, or leave out --shard-size to go on with that layout")
    if not sharded and has_shards:
        raise ExtractError(f"--out {out_dir} holds shards ({shard_dir}); without --shard-size one file per clip is "
                           f"written: extract into another --out, or give --shard-size to go on with the shards")


# --------------------------------------------------------------------------------------------- shards
@dataclass(frozen=True)
class Entry:
    """One clip in a shard: the shard's path, the clip's metadata (as a per-clip output records it), its tensor's
    shape and dtype name, and when its shard was written (the newest wins)."""

    shard: str
    name: str
    metadata: dict
    shape: tuple
    dtype: str
    written_ns: int


def shard_folder(out_dir) -> str:
    return os.path.join(out_dir, SHARD_FOLDER)


def read_header(path) -> list:
    """[Entry] of one shard, from its header; ValueError (naming the file) if it is not a readable shard."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{path}: unreadable ({error})") from None
    try:
        index = json.loads(metadata.pop("index"))
        written_ns = int(metadata.pop("written_ns"))
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: not a shard written by extract (its index: {error})") from None
    entries = []
    for row in index:
        name = row.get("name") if isinstance(row, dict) else None
        if name not in shapes:
            raise ValueError(f"{path}: its index names {name!r}, which it does not hold")
        shape, dtype = shapes[name]
        clip = {key: str(value) for key, value in row.items() if key != "name"}
        entries.append(Entry(path, name, {**metadata, **clip}, shape, HEADER_DTYPES.get(dtype, dtype), written_ns))
    return entries


def read_shards(out_dir):
    """({name: newest Entry}, [(shard path, reason)] for the shards that cannot be read)."""
    folder = shard_folder(out_dir)
    newest, damaged = {}, []
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    except FileNotFoundError:
        return newest, damaged
    for file in names:
        path = os.path.join(folder, file)
        try:
            entries = read_header(path)
        except ValueError as error:
            damaged.append((path, str(error)))
            continue
        for entry in entries:
            old = newest.get(entry.name)
            if old is None or (entry.written_ns, entry.shard) > (old.written_ns, old.shard):
                newest[entry.name] = entry
    return newest, damaged


def set_aside(path) -> str:
    """Rename a damaged shard out of every reader's way; the new name."""
    aside = path[: -len(".safetensors")] + ".damaged"
    os.replace(path, aside)
    return aside


class ShardNames:
    """This run's shard names: ``<start time>-r<rank>-<run tag>-<seq>``, unique to the run, sorting by time."""

    def __init__(self, out_dir, rank, tag):
        self.prefix = os.path.join(shard_folder(out_dir), f"{time.time_ns():x}-r{rank}-{tag}")
        self.tag = tag
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count:05d}.safetensors"


def write_shard(path, clips, settings_metadata, run_metadata, tag):
    """``clips``: [(name, hidden_states CPU tensor, {source…, num_samples, source_sample_rate})] → one shard at
    ``path``. A write that fails stops the run (ExtractError), as for a per-clip output."""
    from safetensors.torch import save

    index = [{"name": name, **{key: meta[key] for key in INDEX_FIELDS[1:]}} for name, _, meta in clips]
    metadata = {"layout": SHARD_LAYOUT, **settings_metadata, "sample_rate": str(SAMPLE_RATE), **run_metadata,
                "written_ns": str(time.time_ns()), "index": json.dumps(index)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = save({name: hidden.contiguous() for name, hidden, _ in clips}, metadata=metadata)
        write_atomically(path, data, f"{path}.{tag}.partial")
    except OSError as error:
        raise ExtractError(f"cannot write {path} ({error.strerror}); shards written so far are complete and a rerun "
                           f"resumes after them") from None


# --------------------------------------------------------------------------------------- reading back
def load_features(out_dir):
    """Yield ``(name, hidden_states)`` for every clip extracted into ``out_dir``: one file per clip in name order,
    or shard by shard (each clip once, from the newest shard that holds it, when a rerun redid it).

    ValueError (naming the file) for a shard that cannot be read: a rerun of extract into the same folder sets it
    aside and redoes its clips."""
    from safetensors import safe_open

    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise ValueError(f"load_features: {out_dir} is not a folder")
    if os.path.isdir(shard_folder(out_dir)):
        newest, damaged = read_shards(out_dir)
        if damaged:
            path, reason = damaged[0]
            raise ValueError(f"load_features: {reason}; rerun the extract into {out_dir} to redo its clips")
        by_shard = {}
        for entry in newest.values():
            by_shard.setdefault(entry.shard, []).append(entry.name)
        for shard in sorted(by_shard):
            with safe_open(shard, framework="pt", device="cpu") as f:
                for name in sorted(by_shard[shard]):
                    yield name, f.get_tensor(name)
        return
    for name in sorted(existing_outputs(out_dir)):
        with safe_open(output_path(out_dir, name), framework="pt", device="cpu") as f:
            yield name, f.get_tensor("hidden_states")
