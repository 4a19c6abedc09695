"""Reading what ``extract`` wrote, either layout, without knowing it: ``load_features(out_dir)`` yields
``(name, hidden_states)`` — ``name`` the clip's output name (its path below the folder it was found in, or as its
manifest line names it, without extension), ``hidden_states`` a (frames, hidden) CPU tensor in the dtype it was
stored in (``--save-dtype``)."""

import os

from .shards import read_shards, shard_folder
from .store import existing_outputs, output_path


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
