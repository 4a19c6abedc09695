"""extract under faults: every bad input is named and skipped, no stale or damaged output passes as done, no
NaN is written, and each fault that would fail every clip is one line naming the file and the fix (exit 2)."""

import ctypes
import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from conftest import assert_fp32_close
from safetensors.torch import save_file
from test_cli import ROOT, read_output, speechy, write_wav

from w2vbert_fast.cli import main
from w2vbert_fast.cli.common import random_model

TINY = ["--random-weights", "tiny", "--batch-seconds", "10"]


@pytest.fixture
def folder(tmp_path):
    """Two short readable clips."""
    path = tmp_path / "in"
    path.mkdir()
    for i, name in enumerate(("a", "b")):
        write_wav(path / f"{name}.wav", speechy(0.5 + 0.2 * i, i))
    return path


def write_corpus(folder, lengths):
    """``lengths`` ({name: seconds}; a name may hold a sub-folder) as 16 kHz WAV clips under ``folder``."""
    for i, (name, seconds) in enumerate(lengths.items()):
        path = folder / f"{name}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(path, speechy(seconds, i))
    return folder


def extract(*args):
    return main(["extract", *map(str, args)])


def one_line_error(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def tiny_checkpoint(folder, edit=None):
    """A transformers-format folder (config.json + model.safetensors) of the tiny random model; ``edit(state)``
    may change the tensors before they are saved."""
    model = random_model("tiny", seed=0)
    state = {name: tensor.contiguous().clone() for name, tensor in model.state_dict().items()}
    if edit:
        edit(state)
    os.makedirs(folder, exist_ok=True)
    model.config.save_pretrained(folder)
    save_file(state, os.path.join(folder, "model.safetensors"))
    return folder


# ------------------------------------------------------------------------------- unreadable inputs (as non-root)
def _drop_file_access_override():
    """In the child: root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH obeys file modes like any user (the
    capabilities leave the bounding set, so the exec'd Python never regains them). Unprivileged users
    cannot run Python here: the interpreter lives under /root."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def run_without_read_override(args, probe):
    """Run ``python -m w2vbert_fast *args`` as a process that chmod 000 keeps out; skip (saying why) only if no
    such process can be arranged, checked by reading ``probe`` (a chmod 000 file)."""
    preexec = _drop_file_access_override if os.geteuid() == 0 else None
    check = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}).read()"], preexec_fn=preexec,
                           capture_output=True, text=True)
    if check.returncode == 0 or "PermissionError" not in check.stderr:
        pytest.skip(f"cannot run a process that file modes keep out (euid {os.geteuid()}; dropping "
                    f"CAP_DAC_OVERRIDE failed or was not enough: {check.stderr.strip()[-200:]})")
    return subprocess.run([sys.executable, "-m", "w2vbert_fast", *map(str, args)], preexec_fn=preexec,
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_unreadable_file_and_folder_are_listed_and_the_rest_is_written(folder, tmp_path):
    secret = folder / "secret.wav"
    write_wav(secret, speechy(0.5, 7))
    locked = folder / "locked"
    locked.mkdir()
    write_wav(locked / "inside.wav", speechy(0.5, 8))
    secret.chmod(0)
    locked.chmod(0)
    out = tmp_path / "out"
    try:
        result = run_without_read_override(["extract", folder, "--out", out, *TINY], probe=secret)
    finally:
        secret.chmod(0o644)
        locked.chmod(0o755)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert f"{secret}: cannot read: permission denied" in result.stderr
    assert f"{locked}: cannot enter this folder (Permission denied)" in result.stderr
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]
    assert "2 written" in result.stderr and "2 failed" in result.stderr


def test_fifo_and_vanished_file_are_listed(folder, tmp_path, capsys, monkeypatch):
    os.mkfifo(folder / "pipe.wav")  # reading it would block for ever
    doomed = folder / "doomed.wav"
    write_wav(doomed, speechy(0.5, 9))
    import w2vbert_fast.extract.audio as audio

    real_audio_info = audio.audio_info

    def info_then_vanish(path):  # the file is removed after planning, before it is read
        info = real_audio_info(path)
        if os.path.basename(path) == "doomed.wav":
            os.remove(path)
        return info

    monkeypatch.setattr(audio, "audio_info", info_then_vanish)
    assert extract(folder, "--out", tmp_path / "out", *TINY) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'pipe.wav'}: is a FIFO (named pipe), not a regular file" in err
    assert f"{doomed}: no such file" in err
    assert "2 written" in err and "2 failed" in err


# ------------------------------------------------------------------------------------------------ resume
def test_resume_skips_only_outputs_that_check_out(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    assert "0 written, 2 skipped" in capsys.readouterr().err


@pytest.mark.parametrize("change, field", [
    (["--layer", "2"], "layer"),
    (["--seed", "1"], "model_weights"),
    (["--dtype", "bfloat16"], "dtype"),
], ids=["layer", "model", "dtype"])
def test_resume_with_other_settings_stops_naming_overwrite(folder, tmp_path, capsys, change, field):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    before = {p: p.read_bytes() for p in out.glob("*.safetensors")}
    capsys.readouterr()
    assert extract(folder, "--out", out, *TINY, "--layer", "1", *change) == 2
    err = one_line_error(capsys)
    assert f"written with {field}" in err and "--overwrite" in err
    assert {p: p.read_bytes() for p in out.glob("*.safetensors")} == before  # nothing touched
    assert extract(folder, "--out", out, *TINY, "--layer", "1", *change, "--overwrite") == 0
    assert all(p.read_bytes() != data for p, data in before.items())


def test_resume_with_another_model_config_stops(folder, tmp_path, capsys):
    out = tmp_path / "out"
    model_a = tiny_checkpoint(tmp_path / "model_a")
    assert extract(folder, "--out", out, "--model", model_a, "--layer", "1") == 0
    config = json.loads((model_a / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6  # same shapes, another model
    (model_a / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert extract(folder, "--out", out, "--model", model_a, "--layer", "1") == 2
    assert "written with model_config_sha256" in one_line_error(capsys)


def test_resume_from_another_source_folder_stops(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    other = tmp_path / "other"
    other.mkdir()
    write_wav(other / "a.wav", speechy(0.5, 3))
    capsys.readouterr()
    assert extract(other, "--out", out, *TINY, "--layer", "1") == 2
    assert "written with source" in one_line_error(capsys)


def test_changed_source_is_redone(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    write_wav(folder / "a.wav", speechy(1.5, 42))  # edited in place: new size and mtime
    capsys.readouterr()
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    err = capsys.readouterr().err
    assert "redoing" in err and "a.safetensors: its source changed" in err and "1 written, 1 skipped" in err
    hidden, metadata = read_output(out / "a.safetensors")
    assert metadata["num_samples"] == str(24000) and hidden.shape == (74, 64)


@pytest.mark.parametrize("damage", ["empty", "truncated", "nan", "wrong_shape", "no_metadata"])
def test_damaged_output_is_redone(folder, tmp_path, capsys, damage):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    target = out / "a.safetensors"
    good, metadata = read_output(target)
    good = good.clone()  # not a view of the file's memory map, which the damage below truncates
    if damage == "empty":
        target.write_bytes(b"")
    elif damage == "truncated":
        target.write_bytes(target.read_bytes()[:-100])
    elif damage == "nan":
        save_file({"hidden_states": torch.full_like(good, float("nan"))}, str(target), metadata=metadata)
    elif damage == "wrong_shape":
        save_file({"hidden_states": good[:-3].contiguous()}, str(target), metadata=metadata)
    else:
        save_file({"hidden_states": good}, str(target), metadata={"layer": "1"})
    capsys.readouterr()
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    err = capsys.readouterr().err
    assert f"redoing {target}" in err and "1 written, 1 skipped" in err
    hidden, _ = read_output(target)
    assert_fp32_close(hidden, good)  # alone in its batch now, so not bit-equal


def test_outputs_get_the_umask_mode(folder, tmp_path):
    old = os.umask(0o027)
    try:
        assert extract(folder, "--out", tmp_path / "out", *TINY, "--layer", "1") == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out" / "a.safetensors").stat().st_mode) == 0o640
    assert not list((tmp_path / "out").glob("*.partial")) and not list((tmp_path / "out").glob(".w2vbert*"))


def test_each_output_is_fsynced_before_its_rename(tmp_path, monkeypatch):
    from w2vbert_fast.extract.store import save_hidden_states

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "sub" / "x.safetensors"
    save_hidden_states(str(target), torch.ones(3, 4), {"layer": "1"})
    partial = str(target) + ".partial"
    assert events == [("fsync", partial), ("replace", partial), ("fsync", str(tmp_path / "sub"))]
    assert read_output(target)[0].shape == (3, 4)


# ---------------------------------------------------------------------------------------------- finiteness
def test_huge_samples_are_rejected_by_name(folder, tmp_path, capsys):
    spike = speechy(0.5, 5)
    spike[3000] = 1e20
    write_wav(folder / "spike.wav", spike, bits=64, floating=True)
    write_wav(folder / "loud.wav", speechy(0.5, 6) * 1e15, bits=32, floating=True)
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 1
    err = capsys.readouterr().err
    assert f"{folder / 'spike.wav'} has a sample of magnitude 1e+20, above 1e+09" in err
    assert f"{folder / 'loud.wav'} has a sample of magnitude" in err
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]


def test_non_finite_hidden_states_are_never_written(folder, tmp_path, capsys):
    def overflow(state):  # finite weights whose output overflows fp32: 160 inputs of 1 (the norm's bias) × 1e37
        state["feature_projection.layer_norm.weight"].fill_(0.0)
        state["feature_projection.layer_norm.bias"].fill_(1.0)
        state["feature_projection.projection.weight"].fill_(1e37)

    model = tiny_checkpoint(tmp_path / "model", overflow)
    out = tmp_path / "out"
    assert extract(folder, "--out", out, "--model", model, "--layer", "0") == 1
    err = capsys.readouterr().err
    assert f"{folder / 'a.wav'}: its hidden states came out NaN or Inf (not written)" in err
    assert "0 written" in err and not list(out.glob("*.safetensors"))


def test_nan_weights_are_refused_naming_the_tensor(folder, tmp_path, capsys):
    def poison(state):
        state["encoder.layers.1.ffn2.output_dense.weight"][3, 5] = float("nan")

    model = tiny_checkpoint(tmp_path / "model", poison)
    assert extract(folder, "--out", tmp_path / "out", "--model", model) == 2
    err = one_line_error(capsys)
    assert "model.safetensors: tensor encoder.layers.1.ffn2.output_dense.weight holds 1 NaN or Inf" in err
    assert "download or save it again" in err and not (tmp_path / "out" / "a.safetensors").exists()


def test_weights_that_overflow_the_dtype_are_refused(tmp_path):
    import w2vbert_fast

    def huge(state):
        state["feature_projection.projection.bias"][0] = 1e6  # fine in fp32, Inf in fp16

    model = tiny_checkpoint(tmp_path / "model", huge)
    with pytest.raises(ValueError, match=r"feature_projection.projection.bias overflows float16.*wider dtype"):
        w2vbert_fast.Wav2Vec2BertModel.from_pretrained(model, dtype=torch.float16)


# ------------------------------------------------------------------------------------- checkpoint faults
@pytest.mark.parametrize("damage", ["empty", "header_only", "truncated"])
def test_damaged_weights_file_is_one_line(folder, tmp_path, capsys, damage):
    model = tiny_checkpoint(tmp_path / "model")
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "header_only": data[:40], "truncated": data[: len(data) // 2]}[damage])
    assert extract(folder, "--out", tmp_path / "out", "--model", model) == 2
    err = one_line_error(capsys)
    assert f"{weights} (" in err and "not a complete safetensors file" in err and "download or save it again" in err


def test_unreadable_weights_file_is_one_line(folder, tmp_path):
    model = tiny_checkpoint(tmp_path / "model")
    weights = model / "model.safetensors"
    weights.chmod(0)
    try:
        result = run_without_read_override(["extract", folder, "--out", tmp_path / "out", "--model", model],
                                           probe=weights)
    finally:
        weights.chmod(0o644)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"python -m w2vbert_fast extract: error: --model {model}: {weights}: cannot read it (Permission denied); "
        f"check its permissions"]


def test_config_that_disagrees_with_the_weights_is_one_line(folder, tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "model")
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = 96
    (model / "config.json").write_text(json.dumps(config))
    assert extract(folder, "--out", tmp_path / "out", "--model", model) == 2
    err = one_line_error(capsys)
    assert f"{model / 'config.json'} does not match the weights" in err
    assert "intermediate_dense" in err and "is [128] in model.safetensors but the config gives [96]" in err
    assert "(and 11 more tensors)" in err  # intermediate weight and bias, output weight: × 2 blocks × 2 layers
    assert "use the config.json saved with these weights" in err


def test_preprocessor_config_that_is_not_json_is_one_line(folder, tmp_path, capsys):
    model = tiny_checkpoint(tmp_path / "model")
    (model / "preprocessor_config.json").write_text("{feature_size: 80")
    assert extract(folder, "--out", tmp_path / "out", "--model", model) == 2
    err = one_line_error(capsys)
    assert f"{model / 'preprocessor_config.json'} is not valid JSON" in err and "delete it" in err


def test_output_folder_that_cannot_be_written_is_found_before_any_work(folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert extract(folder, "--out", blocker / "out", *TINY) == 2
    err = one_line_error(capsys)
    assert f"--out {blocker / 'out'}: cannot write there (Not a directory)" in err


def test_read_only_output_folder_is_found_before_any_work(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    probe = tmp_path / "probe"
    probe.write_text("x")
    probe.chmod(0)
    out.chmod(0o555)
    try:
        result = run_without_read_override(["extract", folder, "--out", out, *TINY], probe=probe)
    finally:
        out.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"python -m w2vbert_fast extract: error: --out {out}: cannot write there (Permission denied); choose "
        f"another folder or make it writable"]


def test_write_failure_mid_run_stops_with_one_line(folder, tmp_path, capsys, monkeypatch):
    import errno

    import w2vbert_fast.extract.store as store

    def disk_full(path, hidden_states, metadata, **options):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(store, "save_hidden_states", disk_full)
    assert extract(folder, "--out", tmp_path / "out", *TINY) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m w2vbert_fast extract: error: cannot write ")
    assert "(No space left on device); outputs written so far are complete and a rerun resumes" in last


# ------------------------------------------------------------------------------------------ small ones
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_batch_seconds_must_be_a_positive_number(folder, tmp_path, capsys, value):
    assert extract(folder, "--out", tmp_path / "out", "--random-weights", "tiny", "--batch-seconds", value) == 2
    assert "--batch-seconds must be a positive number of seconds" in one_line_error(capsys)


@pytest.mark.parametrize("device, message", [("gpu", "not a device; expected cpu, cuda or cuda:N"),
                                             ("meta", "runs on cpu or cuda")])
def test_device_names_are_checked(folder, tmp_path, capsys, device, message):
    assert extract(folder, "--out", tmp_path / "out", *TINY, "--device", device) == 2
    err = one_line_error(capsys)
    assert f"--device {device}:" in err and message in err


def test_list_file_that_is_not_utf8_is_one_line(folder, tmp_path, capsys):
    listing = tmp_path / "list.txt"
    listing.write_bytes(str(folder / "a.wav").encode() + b"\n" + "caf\u00e9.wav".encode("latin-1") + b"\n")
    assert extract("--list", listing, "--out", tmp_path / "out", *TINY) == 2
    assert f"--list {listing}: not UTF-8 text (byte 0xe9 at offset" in one_line_error(capsys)


def test_layer_defaults_to_what_the_model_has(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY) == 0  # 17 on w2v-bert-2.0; the tiny model has 2
    assert "layer 2 of tiny" in capsys.readouterr().err
    _, metadata = read_output(out / "a.safetensors")
    assert metadata["layer"] == "2"
    assert extract(folder, "--out", out, *TINY, "--layer", "17") == 2
    assert "--layer must be between 0 (the input to the first layer) and 2" in one_line_error(capsys)


@pytest.mark.parametrize("audio, message", [
    ("missing.wav", "missing.wav: no such file"),
    ("notes.wav", "notes.wav: not a WAV file"),
    ("short.wav", "short.wav has 300 samples, fewer than one 400-sample frame"),
    ("loud.wav", "loud.wav has a sample of magnitude 1e+12, above 1e+09"),
])
def test_demo_audio_faults_are_one_line(tmp_path, capsys, audio, message):
    (tmp_path / "notes.wav").write_text("hello")
    write_wav(tmp_path / "short.wav", speechy(300 / 16000, 0))
    write_wav(tmp_path / "loud.wav", np.full(1000, 1e12), bits=32, floating=True)
    assert main(["demo", "--tiny", "--no-transformers", "--audio", str(tmp_path / audio)]) == 2
    err = one_line_error(capsys)
    assert err.startswith("python -m w2vbert_fast demo: error: --audio ") and message in err


def test_written_output_holds_the_resume_metadata(folder, tmp_path):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    with safe_open(str(out / "a.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    source = os.stat(folder / "a.wav")
    assert metadata["source"] == os.path.abspath(folder / "a.wav")
    assert (metadata["source_size"], metadata["source_mtime_ns"]) == (str(source.st_size), str(source.st_mtime_ns))
    assert metadata["model_weights"] == "random tiny seed 0" and len(metadata["model_config_sha256"]) == 64
    assert (metadata["layer"], metadata["dtype"]) == ("1", "float32")
