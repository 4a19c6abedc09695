"""extract's outputs at corpus scale (issue 21, item 3): shards of many clips with their index, one fsync per shard,
resume per shard, --save-dtype, and load_features reading either layout."""

import json
import os

import pytest
import torch
from conftest import assert_fp32_close
from test_cli import read_output, speechy, write_wav
from test_extract_faults import extract, one_line_error, write_corpus

import w2vbert_fast

TINY = ["--random-weights", "tiny", "--layer", "1", "--batch-seconds", "3"]
LENGTHS = {"a": 1.0, "b": 0.5, "c": 0.7, "sub/d": 1.3, "e": 0.9}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", LENGTHS)


def shard_files(out):
    return sorted((out / "shards").glob("*.safetensors"))


def test_shards_hold_what_per_clip_files_hold_with_one_fsync_each(corpus, tmp_path, capsys, monkeypatch):
    assert extract(corpus, "--out", tmp_path / "clips", *TINY) == 0
    fsynced, real_fsync = [], os.fsync

    def fsync(fd):
        fsynced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "shards"
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "2") == 0
    shards = shard_files(out)
    assert len(shards) == 3  # 5 clips, 2 a shard
    data_fsyncs = [path for path in fsynced if path.endswith(".partial") and "/shards/" in path]
    assert len(data_fsyncs) == 3 and fsynced.count(str(out / "shards")) == 1  # the folder once, at the end
    assert not list(out.rglob("*.partial")) and not list(out.glob("*.safetensors"))

    per_clip = dict(w2vbert_fast.load_features(tmp_path / "clips"))
    sharded = dict(w2vbert_fast.load_features(out))
    assert sorted(per_clip) == sorted(sharded) == sorted(LENGTHS)
    for name, hidden in sharded.items():
        assert hidden.shape == per_clip[name].shape and hidden.dtype == torch.float32
        assert_fp32_close(hidden, per_clip[name])  # batched with other clips: equal up to fp32 rounding

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layout"] == "shards" and len(manifest["clips"]) == 5
    from safetensors import safe_open

    for row in manifest["clips"]:
        with safe_open(str(out / row["output"]), framework="pt") as f:
            assert f.get_tensor(row["key"]).shape[0] == row["frames"]
        assert row["seconds"] == pytest.approx(LENGTHS[row["key"]])
    with safe_open(str(shards[0]), framework="pt") as f:
        index = json.loads(f.metadata()["index"])
        assert f.metadata()["layer"] == "1" and f.metadata()["save_dtype"] == "float32"
    assert sorted(entry["name"] for entry in index) == ["a", "b"]  # the first 2 clips in input order
    assert all(entry["source"].startswith(str(corpus)) and int(entry["num_samples"]) > 0 for entry in index)


def test_a_rerun_resumes_per_shard_and_redoes_only_what_changed(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "2") == 0
    mtimes = {p: p.stat().st_mtime_ns for p in shard_files(out)}
    capsys.readouterr()
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "2") == 0
    assert "0 written, 5 skipped" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in shard_files(out)} == mtimes

    write_wav(corpus / "c.wav", speechy(1.5, 42))  # edited: the newest shard that holds it wins
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "2") == 0
    err = capsys.readouterr().err
    assert "its source changed since" in err and "1 written, 4 skipped" in err
    assert len(shard_files(out)) == 4
    features = list(w2vbert_fast.load_features(out))
    assert sorted(name for name, _ in features) == sorted(LENGTHS)  # each clip once
    assert dict(features)["c"].shape[0] == 74  # 1.5 s, not the 0.7 s of the older entry


def test_a_damaged_shard_is_set_aside_and_its_clips_redone(corpus, tmp_path, capsys):
    out = tmp_path / "out"
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "2") == 0
    first = shard_files(out)[0]
    first.write_bytes(first.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"unreadable.*rerun the extract"):
        list(w2vbert_fast.load_features(out))
    capsys.readouterr()
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "2") == 0
    err = capsys.readouterr().err
    assert "set aside as" in err and "2 written, 3 skipped" in err
    assert first.with_suffix(".damaged").exists()
    assert sorted(name for name, _ in w2vbert_fast.load_features(out)) == sorted(LENGTHS)


def test_a_clip_that_fails_leaves_its_shard_and_is_retried(corpus, tmp_path, capsys):
    write_wav(corpus / "short.wav", speechy(300 / 16000, 0))  # fails the clip check once decoded
    out = tmp_path / "out"
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "4") == 1
    err = capsys.readouterr().err
    assert "short.wav has 300 samples" in err and "5 written" in err
    assert sorted(name for name, _ in w2vbert_fast.load_features(out)) == sorted(LENGTHS)
    write_wav(corpus / "short.wav", speechy(0.6, 9))
    assert extract(corpus, "--out", out, *TINY, "--shard-size", "4") == 0
    assert "1 written, 5 skipped" in capsys.readouterr().err
    assert len(list(w2vbert_fast.load_features(out))) == 6


@pytest.mark.parametrize("layout", [[], ["--shard-size", "3"]], ids=["clips", "shards"])
@pytest.mark.parametrize("save_dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_save_dtype_halves_the_bytes(corpus, tmp_path, capsys, layout, save_dtype):
    name = str(save_dtype)[6:]
    assert extract(corpus, "--out", tmp_path / "full", *TINY, *layout) == 0
    assert extract(corpus, "--out", tmp_path / "half", *TINY, *layout, "--save-dtype", name) == 0
    full, half = dict(w2vbert_fast.load_features(tmp_path / "full")), dict(w2vbert_fast.load_features(tmp_path / "half"))
    for clip, hidden in half.items():
        assert hidden.dtype == save_dtype
        assert torch.equal(hidden, full[clip].to(save_dtype))  # the same batches, cast once on the device
    size = sum(p.stat().st_size for p in (tmp_path / "half").rglob("*.safetensors"))
    assert size < 0.6 * sum(p.stat().st_size for p in (tmp_path / "full").rglob("*.safetensors"))
    capsys.readouterr()
    assert extract(corpus, "--out", tmp_path / "half", *TINY, *layout, "--save-dtype", name) == 0
    assert "0 written, 5 skipped" in capsys.readouterr().err
    assert extract(corpus, "--out", tmp_path / "half", *TINY, *layout) == 2  # float32 now: another result
    err = one_line_error(capsys)
    assert f"written with save_dtype '{name}', this run has 'float32'" in err and "--overwrite" in err


def test_one_folder_holds_one_layout(corpus, tmp_path, capsys):
    assert extract(corpus, "--out", tmp_path / "out", *TINY) == 0
    capsys.readouterr()
    assert extract(corpus, "--out", tmp_path / "out", *TINY, "--shard-size", "2") == 2
    assert "holds one output file per clip; --shard-size writes shards" in one_line_error(capsys)
    assert extract(corpus, "--out", tmp_path / "sharded", *TINY, "--shard-size", "2") == 0
    capsys.readouterr()
    assert extract(corpus, "--out", tmp_path / "sharded", *TINY) == 2
    assert "holds shards" in one_line_error(capsys)


@pytest.mark.parametrize("value", ["0", "-3"])
def test_shard_size_must_be_positive(corpus, tmp_path, capsys, value):
    assert extract(corpus, "--out", tmp_path / "out", *TINY, "--shard-size", value) == 2
    assert f"--shard-size must be a positive number of clips, got {value}" in one_line_error(capsys)


def test_load_features_reads_per_clip_outputs_by_name(corpus, tmp_path):
    out = tmp_path / "out"
    assert extract(corpus, "--out", out, *TINY) == 0
    features = list(w2vbert_fast.load_features(out))
    assert [name for name, _ in features] == sorted(LENGTHS)
    for name, hidden in features:
        assert torch.equal(hidden, read_output(out / f"{name}.safetensors")[0])
    with pytest.raises(ValueError, match="is not a folder"):
        list(w2vbert_fast.load_features(tmp_path / "nowhere"))
