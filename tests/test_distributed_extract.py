"""extract under torchrun: the length-balanced split, the end-of-job wait that a lost rank cannot hang, and two CPU
processes (gloo) writing the same files and tensors as one process, with a manifest, exit status and resume."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import assert_fp32_close
from test_cli import read_output, speechy, write_wav

from w2vbert_fast.cli import main
from w2vbert_fast.extract.ranks import Heartbeat, Job, assign_by_length

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- split
def test_split_is_balanced_by_length_and_covers_every_clip_once():
    paths = [f"clip{i:02d}.wav" for i in range(11)]
    seconds = [30.0, 1.0, 12.0, 12.0, 5.0, 7.5, 2.0, 0.0, 20.0, 3.0, 12.0]
    shares = assign_by_length(paths, seconds, 3)
    assert sorted(i for share in shares for i in share) == list(range(11))
    assert all(share == sorted(share) for share in shares)  # input order within a rank
    # longest first onto the least loaded: 30+5, 20+12+2+1, 12+12+7.5+3+0 (104.5 s; a third is 34.8 s)
    assert [sum(seconds[i] for i in share) for share in shares] == [35.0, 35.0, 34.5]
    assert shares == assign_by_length(list(paths), list(seconds), 3)  # the same split on a rerun


def test_split_breaks_ties_by_path_then_count_so_it_does_not_depend_on_input_order():
    paths = ["b.wav", "a.wav", "d.wav", "c.wav"]
    shares = assign_by_length(paths, [1.0] * 4, 2)
    assert [sorted(paths[i] for i in share) for share in shares] == [["a.wav", "c.wav"], ["b.wav", "d.wav"]]
    # unreadable clips (length 0) are dealt out by count, not piled onto rank 0
    assert [len(share) for share in assign_by_length(["x", "y", "z"], [0.0] * 3, 3)] == [1, 1, 1]
    assert assign_by_length([], [], 2) == [[], []]


# ------------------------------------------------------------------------------------- end-of-job wait
class FakeStore:
    """The three store calls Heartbeat makes, on a dict (what torchrun's TCPStore does across processes)."""

    def __init__(self):
        self.data = {}

    def set(self, key, value):
        self.data[key] = value.encode() if isinstance(value, str) else value

    def check(self, keys):
        return all(key in self.data for key in keys)

    def get(self, key):
        return self.data[key]


def peer_record(state, beat):
    return json.dumps(dict(state=state, beat=beat, snapshot={}))


def beating(ranks, store, peers):
    """Make ``peers`` ({rank: state}) publish a new beat each time ``ranks`` looks, as their beat threads do."""
    beats = iter(range(10 ** 6))
    real_read_all = ranks.read_all

    def read_all(watched=None):
        for rank, state in peers.items():
            store.set(f"rank{rank}", peer_record(state, next(beats)))
        return real_read_all(watched)

    ranks.read_all = read_all


def test_a_rank_that_exited_early_ends_the_wait_at_once_and_rank_0_tells_the_others():
    store = FakeStore()
    ranks = Heartbeat(store, rank=0, world_size=3, timeout=60.0)
    ranks.state = "done"
    beating(ranks, store, {0: "done", 1: "exited", 2: "running"})
    start = time.monotonic()
    assert ranks.wait_for_all() == ["rank 1 exited before finishing"]
    assert time.monotonic() - start < 5
    assert json.loads(store.get("verdict")) == ["rank 1 exited before finishing"]
    # rank 2 takes rank 0's verdict rather than judging rank 1 itself
    other = Heartbeat(store, rank=2, world_size=3, timeout=60.0)
    assert other.wait_for_all() == ["rank 1 exited before finishing"]


def test_a_silent_rank_ends_the_wait_after_the_timeout_and_a_beating_one_does_not():
    store = FakeStore()
    ranks = Heartbeat(store, rank=0, world_size=3, timeout=2.5)
    store.set("rank1", peer_record("running", 7))  # never beats again: a crashed rank
    beating(ranks, store, {0: "done", 2: "running"})
    start = time.monotonic()
    assert ranks.wait_for_all() == ["rank 1 silent for 2.5 s (crashed? see --rank-timeout)"]
    assert 2.5 <= time.monotonic() - start < 10


def test_the_others_stop_waiting_when_rank_0_falls_silent():
    store = FakeStore()
    store.set("rank0", peer_record("done", 1))  # killed while waiting: no verdict will come
    ranks = Heartbeat(store, rank=1, world_size=2, timeout=1.5)
    beating(ranks, store, {1: "done"})
    assert ranks.wait_for_all() == ["rank 0 silent for 1.5 s (crashed? see --rank-timeout)"]


def test_the_wait_ends_with_nothing_lost_when_every_rank_is_done():
    store = FakeStore()
    ranks = Heartbeat(store, rank=0, world_size=2, timeout=60.0)
    beating(ranks, store, {0: "done", 1: "done"})
    assert ranks.wait_for_all() == []
    assert json.loads(store.get("verdict")) == []


def test_one_process_is_one_rank_and_changes_nothing(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ranks = Job.join(torch.device("cpu"))
    assert not ranks.distributed and ranks.rank == 0 and ranks.world_size == 1
    clips, failures = [("a.wav", "a"), ("b.wav", "b")], [("c.wav", "c.wav: no such file or folder")]
    assert ranks.split(clips, failures) == (clips, failures)
    assert ranks.finish(failures, "unused") == 1 and ranks.finish([], "unused") == 0


# -------------------------------------------------------------------------------- two processes vs one
def extract(*args, torchrun=False):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"] if torchrun \
        else [sys.executable]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([*launcher, "-m", "w2vbert_fast", "extract", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=180)


def test_two_cpu_processes_write_what_one_does_with_a_manifest_and_resume(tmp_path):
    clips = tmp_path / "clips"
    (clips / "sub").mkdir(parents=True)
    lengths = {"a": 1.0, "b": 2.5, "c": 0.7, "sub/d": 1.3, "e": 0.9}
    for i, (name, seconds) in enumerate(lengths.items()):
        write_wav(clips / f"{name}.wav", speechy(seconds, i))
    (clips / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00this is not a wav file")
    common = [str(clips), "--random-weights", "tiny", "--layer", "1", "--device", "cpu", "--batch-seconds", "3"]

    assert main(["extract", *common, "--out", str(tmp_path / "one")]) == 1  # broken.wav
    two = extract(*common, "--out", str(tmp_path / "two"), torchrun=True)
    assert two.returncode == 1, two.stderr  # the job's status comes back through torchrun
    err = two.stderr
    assert err.count("broken.wav: not a WAV file") == 1, err  # reported once, by the rank that had it
    assert "extract: 2 ranks done, 1 clip(s) failed in all" in err
    assert "[batch 4/4] 5/5 clips, 0.002/0.002 h of audio" in err, err  # rank 0 shows the job, not its share

    written = {p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.safetensors")}
    assert written == {p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.safetensors")}
    assert len(written) == 5 and not list(tmp_path.rglob("*.partial"))
    for name in written:
        hidden_one, meta_one = read_output(tmp_path / "one" / name)
        hidden_two, meta_two = read_output(tmp_path / "two" / name)
        assert meta_one == meta_two
        assert hidden_one.shape == hidden_two.shape
        assert_fp32_close(hidden_two, hidden_one)  # batched with other clips: equal up to fp32 rounding

    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert [row["output"] for row in manifest["clips"]] == ["a.safetensors", "b.safetensors", "c.safetensors",
                                                            "e.safetensors", os.path.join("sub", "d.safetensors")]
    for row in manifest["clips"]:
        hidden, _ = read_output(tmp_path / "two" / row["output"])
        name = os.path.splitext(row["output"])[0]
        assert row["clip"] == str(clips / f"{name}.wav")
        assert row["frames"] == hidden.shape[0]
        assert row["seconds"] == pytest.approx(lengths[name])
    assert [row["clip"] for row in manifest["failed"]] == [str(clips / "broken.wav")]

    # resume: only the missing clip is redone, and the manifest still lists every clip of the job
    (tmp_path / "two" / "b.safetensors").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").rglob("*.safetensors")}
    again = extract(*common, "--out", str(tmp_path / "two"), "--quiet", torchrun=True)
    assert again.returncode == 1, again.stderr
    assert "[batch" not in again.stderr  # --quiet
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    hidden, _ = read_output(tmp_path / "two" / "b.safetensors")
    assert_fp32_close(hidden, read_output(tmp_path / "one" / "b.safetensors")[0])
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["clips"] == manifest["clips"]


def test_two_cpu_processes_write_shards_from_a_manifest_that_one_process_reads_back(tmp_path):
    """Each rank writes its own shards, the split dealing the manifest's clips by their given durations; a rerun
    writes nothing new; load_features reads the clips one process writes, once each."""
    import w2vbert_fast

    clips = tmp_path / "clips"
    clips.mkdir()
    lengths = {f"c{i}": 0.5 + 0.2 * i for i in range(6)}
    for i, (name, seconds) in enumerate(lengths.items()):
        write_wav(clips / f"{name}.wav", speechy(seconds, i))
    listing = clips / "all.jsonl"
    listing.write_text("".join(json.dumps({"path": f"{name}.wav", "duration": seconds}) + "\n"
                               for name, seconds in lengths.items()))
    common = ["--manifest", str(listing), "--random-weights", "tiny", "--layer", "1", "--device", "cpu",
              "--batch-seconds", "3", "--shard-size", "2"]
    assert main(["extract", *common, "--out", str(tmp_path / "one")]) == 0
    two = extract(*common, "--out", str(tmp_path / "two"), torchrun=True)
    assert two.returncode == 0, two.stderr
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").glob("*.safetensors"))
    assert {name.split("-")[1] for name in shards} == {"r0", "r1"}  # each rank its own shards
    one, both = dict(w2vbert_fast.load_features(tmp_path / "one")), dict(w2vbert_fast.load_features(tmp_path / "two"))
    assert sorted(both) == sorted(one) == sorted(lengths)
    for name, hidden in both.items():
        assert_fp32_close(hidden, one[name])
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["layout"] == "shards"
    assert sorted(row["key"] for row in manifest["clips"]) == sorted(lengths)
    again = extract(*common, "--out", str(tmp_path / "two"), "--quiet", torchrun=True)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "two" / "shards").glob("*.safetensors")) == shards
