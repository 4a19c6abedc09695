"""The sharded output layout (``--shard-size N``): many clips per safetensors file, for corpora where one file per
clip (and an fsync per file) is what shared file systems handle worst.

``OUT/shards/<run>-<rank>-<seq>.safetensors``: one tensor per clip, keyed by the clip's name, and in the file's
metadata the settings every clip shares (layer, dtype, save_dtype, model identity, sample rate, package version),
the time it was written, and ``index``: a JSON list with each clip's name, source real path, source version (size,
mtime) and sample counts — so a shard is self-describing, and written whole or not at all (one atomic file, one
fsync of its data; the folder is fsynced when the run ends: a rename lost to a power cut means its clips are
redone, never that a damaged shard is taken as done).

Resume reads the shards' headers only (no tensor data): a clip is done if the newest shard holding it has it with
this run's settings, the source version it has now, and the shape and dtype its sample count implies. The data
itself was checked finite before it was written. A clip redone (its source changed, or ``--overwrite``) goes into
a new shard; the older entry stays on disk but is superseded: readers (``reader.load_features``) take each clip
from the newest shard that has it. A shard whose header cannot be read is renamed ``*.damaged`` (kept for
inspection, read by nobody) and its clips are redone.
"""

import json
import os
import time
from dataclasses import dataclass

from .errors import ExtractError
from .store import SAMPLE_RATE, SHARD_FOLDER, write_atomically

LAYOUT = "shards"
# safetensors' dtype names in a header, for the dtypes extract stores
HEADER_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# the per-clip fields of a shard's index; the rest of a clip's metadata is the shard's
INDEX_FIELDS = ("name", "source", "source_size", "source_mtime_ns", "num_samples", "source_sample_rate")


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
    metadata = {"layout": LAYOUT, **settings_metadata, "sample_rate": str(SAMPLE_RATE), **run_metadata,
                "written_ns": str(time.time_ns()), "index": json.dumps(index)}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = save({name: hidden.contiguous() for name, hidden, _ in clips}, metadata=metadata)
        write_atomically(path, data, f"{path}.{tag}.partial")
    except OSError as error:
        raise ExtractError(f"cannot write {path} ({error.strerror}); shards written so far are complete and a rerun "
                           f"resumes after them") from None
