"""extract against the reliability probe's defects (issue 21, item 5): each fault the probe found, reproduced, with
what must happen instead."""

import json
import math
import os
import struct
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_cli import read_output, speechy, write_wav
from test_extract_faults import TINY, extract, folder, one_line_error, tiny_checkpoint  # noqa: F401 - a fixture

from w2vbert_fast import loading
from w2vbert_fast.cli.common import random_model
from w2vbert_fast.extract import audio


def dense_resample(waveform, orig_freq, new_freq, lowpass_filter_width=6, rolloff=0.99):
    """torchaudio's sinc_interp_hann resampling as it lays the filter out (what extract used before): the oracle
    for the values, on rates where its dense kernel is small."""
    gcd = math.gcd(orig_freq, new_freq)
    orig, new = orig_freq // gcd, new_freq // gcd
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx
    t = (t * base).clamp(-lowpass_filter_width, lowpass_filter_width)
    window = torch.cos(t * math.pi / lowpass_filter_width / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    flat = waveform.reshape(-1, waveform.shape[-1])
    out = F.conv1d(F.pad(flat, (width, width + orig))[:, None], kernel.to(flat.dtype), stride=orig)
    out = out.transpose(1, 2).reshape(flat.shape[0], -1)[:, : math.ceil(new * waveform.shape[-1] / orig)]
    return out.reshape(*waveform.shape[:-1], out.shape[-1])


# ------------------------------------------------------------------------------------------------ resampling
@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 96000, 12345])
def test_resampling_gives_torchaudios_values(rate):
    wave = torch.randn(2, rate + 37, generator=torch.Generator().manual_seed(rate)) * 0.3
    ours = audio.resample_audio(wave, rate, 16000)
    expected = dense_resample(wave, rate, 16000)
    assert ours.shape == expected.shape == (2, math.ceil(16000 * (rate + 37) / rate))
    assert (ours - expected).abs().max() < 2e-6


def test_an_odd_rate_resamples_in_bounded_memory_and_time():
    """16001 Hz (gcd 1 with 16 kHz): the dense layout needed a 16000 × 16015 kernel (10.6 GB, 28.7 s for 1 s)."""
    audio._filter_bank.cache_clear()
    t = torch.arange(16001, dtype=torch.float64) / 16001
    start = time.perf_counter()
    out = audio.resample_audio(torch.sin(2 * torch.pi * 440 * t).float(), 16001, 16000)
    assert time.perf_counter() - start < 10  # milliseconds when the machine is idle
    bank, width = audio._filter_bank(16001, 16000, 6, 0.99)
    assert bank.shape == (16000, 2 * width + 1) and width == 7  # 240 k weights, not 256 M
    expected = torch.sin(2 * torch.pi * 440 * torch.arange(16000, dtype=torch.float64) / 16000)
    assert out.shape == (16000,) and (out[200:-200].double() - expected[200:-200]).abs().max() < 2e-3
    # memory per block of outputs stays bounded whatever the length: the gathered block is capped
    assert audio.BLOCK_VALUES <= 1 << 20


@pytest.mark.parametrize("fault", [RuntimeError("DefaultCPUAllocator: can't allocate memory"), MemoryError()],
                         ids=["RuntimeError", "MemoryError"])
def test_a_resampling_failure_fails_that_clip_alone(folder, tmp_path, capsys, monkeypatch, fault):
    write_wav(folder / "odd.wav", speechy(0.5, 3, rate=22050), rate=22050)
    real = audio.resample_audio

    def fail_on_22050(waveform, orig, new):
        if orig == 22050:
            raise fault
        return real(waveform, orig, new)

    monkeypatch.setattr(audio, "resample_audio", fail_on_22050)
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1", "--resample") == 1
    err = capsys.readouterr().err
    assert f"{folder / 'odd.wav'}: cannot resample 22050 Hz to 16000 Hz ({type(fault).__name__}" in err
    assert "2 written" in err and "1 failed" in err
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["a.safetensors", "b.safetensors"]


def test_any_decoder_failure_fails_that_clip_alone(folder, tmp_path, capsys, monkeypatch):
    real = audio.read_clip

    def broken_decoder(path, *args, **kwargs):
        if os.path.basename(path) == "b.wav":
            raise MemoryError()
        if os.path.basename(path) == "c.wav":
            raise KeyError("a decoder's own bug")
        return real(path, *args, **kwargs)

    write_wav(folder / "c.wav", speechy(0.5, 4))
    monkeypatch.setattr(audio, "read_clip", broken_decoder)
    assert extract(folder, "--out", tmp_path / "out", *TINY, "--layer", "1") == 1
    err = capsys.readouterr().err
    assert f"{folder / 'b.wav'}: out of memory while decoding it" in err
    assert f"{folder / 'c.wav'}: cannot decode (KeyError: " in err and "1 written" in err


# ----------------------------------------------------------------------------------------------- sample rates
def wav_claiming(path, rate, samples=8000):
    """A 16-bit mono WAV whose header says ``rate`` Hz."""
    data = np.zeros(samples, dtype="<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


@pytest.mark.parametrize("rate", [1, 999, 384001, 4_000_000])
def test_a_sample_rate_outside_1_to_384_khz_is_refused_by_name(folder, tmp_path, capsys, rate):
    wav_claiming(folder / "odd.wav", rate)
    assert extract(folder, "--out", tmp_path / "out", *TINY, "--layer", "1", "--resample") == 1
    err = capsys.readouterr().err
    assert f"{folder / 'odd.wav'}: sample rate {rate} Hz is outside 1000–384000 Hz" in err
    assert "2 written" in err and "1 failed" in err


@pytest.mark.parametrize("rate", [1000, 384000])
def test_the_ends_of_the_rate_range_are_read(tmp_path, rate):
    wav_claiming(tmp_path / "x.wav", rate, samples=rate // 4)
    samples, got = audio.read_audio(tmp_path / "x.wav", resample=True)
    assert got == 16000 and samples.shape == (4000,)


# ------------------------------------------------------------------------------------------------ truncation
def test_a_file_truncated_while_the_run_goes_fails_by_name(folder, tmp_path, capsys, monkeypatch):
    long = folder / "long.wav"
    write_wav(long, speechy(2.0, 5))
    real_audio_info = audio.audio_info

    def info_then_truncate(path):  # cut to a tenth after planning read the header, before decoding
        info = real_audio_info(path)
        if os.path.basename(path) == "long.wav":
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 10)
        return info

    monkeypatch.setattr(audio, "audio_info", info_then_truncate)
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 1
    err = capsys.readouterr().err
    assert f"{long}: truncated: its header says 32000 frames, the file holds " in err
    assert not (out / "long.safetensors").exists() and "2 written" in err and "1 failed" in err


def test_a_file_truncated_before_the_run_fails_by_name(tmp_path):
    path = tmp_path / "cut.wav"
    write_wav(path, speechy(1.0, 6))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    with pytest.raises(audio.AudioError, match=r"cut\.wav: truncated: its header says 16000 frames, the file holds "
                                                r"15500"):
        audio.audio_info(path)


# ---------------------------------------------------------------------------------------------- model identity
def test_a_checkpoint_swapped_with_the_same_size_and_mtime_is_another_model(folder, tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "model")
    weights = checkpoint / "model.safetensors"
    out = tmp_path / "out"
    assert extract(folder, "--out", out, "--model", checkpoint, "--layer", "1") == 0
    before = weights.stat()
    other = random_model("tiny", seed=1).state_dict()
    save_file({name: tensor.contiguous() for name, tensor in other.items()}, str(weights))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert weights.stat().st_size == before.st_size and weights.stat().st_mtime_ns == before.st_mtime_ns
    capsys.readouterr()
    assert extract(folder, "--out", out, "--model", checkpoint, "--layer", "1") == 2
    err = one_line_error(capsys)
    assert "written with model_weights 'model.safetensors sha256:" in err and "--overwrite" in err


def test_large_weight_files_are_hashed_once_and_a_swap_misses_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "CACHE_MIN_BYTES", 0)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    cache = loading.DigestCache(str(tmp_path / "cache"))
    real = cache.sha256(str(weights))
    cache.save()
    stored = json.loads((tmp_path / "cache" / "weights-sha256.json").read_text())
    stored[os.path.realpath(weights)]["sha256"] = "cached"  # a hit returns what the cache holds
    (tmp_path / "cache" / "weights-sha256.json").write_text(json.dumps(stored))
    assert loading.DigestCache(str(tmp_path / "cache")).sha256(str(weights)) == "cached"
    mtime = weights.stat().st_mtime_ns
    time.sleep(0.01)
    weights.write_bytes(b"b" * 1000)  # the same size and mtime, other bytes: the kernel sets a new ctime
    os.utime(weights, ns=(mtime, mtime))
    again = loading.DigestCache(str(tmp_path / "cache")).sha256(str(weights))
    assert again not in ("cached", real) and len(again) == 64


def test_outputs_of_an_older_identity_are_redone_not_conflicts(folder, tmp_path, capsys):
    checkpoint = tiny_checkpoint(tmp_path / "model")
    out = tmp_path / "out"
    assert extract(folder, "--out", out, "--model", checkpoint, "--layer", "1") == 0
    hidden, metadata = read_output(out / "a.safetensors")
    save_file({"hidden_states": hidden.clone()}, str(out / "a.safetensors"),
              metadata={**metadata, "model_weights": "model.safetensors:123:456"})  # size:mtime, as before
    capsys.readouterr()
    assert extract(folder, "--out", out, "--model", checkpoint, "--layer", "1") == 0
    err = capsys.readouterr().err
    assert "is the weights' size and mtime only" in err and "1 written, 1 skipped" in err


# --------------------------------------------------------------------------------------- preprocessor settings
def test_preprocessor_settings_that_do_not_fit_the_model_stop_before_any_work(folder, tmp_path, capsys,
                                                                               monkeypatch):
    checkpoint = tiny_checkpoint(tmp_path / "model")
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({"stride": 3}))
    from w2vbert_fast.extract import pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("a clip was decoded")

    monkeypatch.setattr(pipeline.Pipeline, "decode", no_work)
    assert extract(folder, "--out", tmp_path / "out", "--model", checkpoint) == 2
    err = one_line_error(capsys)
    assert "preprocessor_config.json gives stride 3 (240 values a row)" in err
    assert "feature_projection_input_dim is 160" in err and not list((tmp_path / "out").glob("*.safetensors"))


def test_preprocessor_padding_side_does_not_change_what_is_written(folder, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "model")
    assert extract(folder, "--out", tmp_path / "right", "--model", checkpoint, "--layer", "1") == 0
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({"padding_side": "left"}))
    assert extract(folder, "--out", tmp_path / "left", "--model", checkpoint, "--layer", "1") == 0
    for name in ("a", "b"):
        assert torch.equal(read_output(tmp_path / "left" / f"{name}.safetensors")[0],
                           read_output(tmp_path / "right" / f"{name}.safetensors")[0])


# -------------------------------------------------------------------------------------------- partial names
def test_each_run_writes_through_partial_names_of_its_own(folder, tmp_path, monkeypatch):
    partials, real_replace = [], os.replace

    def replace(src, dst):
        if str(src).endswith(".partial"):
            partials.append(os.path.basename(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    assert extract(folder, "--out", out, *TINY, "--layer", "1", "--overwrite") == 0
    clip_partials = [name for name in partials if name.startswith("a.safetensors.")]
    assert len(clip_partials) == 2 and clip_partials[0] != clip_partials[1]  # two runs, two names
    manifests = [name for name in partials if name.startswith("manifest.json.")]
    assert len(manifests) == 2 and manifests[0] != manifests[1]


# --------------------------------------------------------------------------------------------- progress totals
def test_progress_totals_leave_out_the_clips_that_failed(folder, tmp_path, capsys):
    write_wav(folder / "short.wav", speechy(300 / 16000, 0))  # its header reads; the clip check fails it
    assert extract(folder, "--out", tmp_path / "out", *TINY, "--layer", "1") == 1
    err = capsys.readouterr().err
    final = [line for line in err.splitlines() if line.startswith("[batch")][-1]
    assert final.startswith("[batch 1/1] 2/2 clips, ") and "1 failed, ETA 0s" in final, final


# ------------------------------------------------------------------------------------------------ real paths
def test_a_folder_through_a_symlink_is_the_same_source(folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 0
    link = tmp_path / "link"
    link.symlink_to(folder, target_is_directory=True)
    capsys.readouterr()
    assert extract(link, "--out", out, *TINY, "--layer", "1") == 0
    assert "0 written, 2 skipped" in capsys.readouterr().err
    assert extract(folder, link / "a.wav", "--out", tmp_path / "both", *TINY, "--layer", "1") == 0
    assert "2 inputs" in capsys.readouterr().err  # a.wav once, though reached two ways


# -------------------------------------------------------------------------------------------------- manifest
def test_a_single_process_run_writes_a_manifest(folder, tmp_path, capsys):
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00this is not a wav file")
    out = tmp_path / "out"
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["layout"] == "clips"
    assert [(row["clip"], row["output"], row["frames"]) for row in manifest["clips"]] == [
        (str(folder / "a.wav"), "a.safetensors", 24), (str(folder / "b.wav"), "b.safetensors", 34)]
    assert manifest["clips"][0]["seconds"] == 0.5
    assert [row["clip"] for row in manifest["failed"]] == [str(folder / "broken.wav")]
    # a rerun lists the skipped outputs the same way
    assert extract(folder, "--out", out, *TINY, "--layer", "1") == 1
    assert json.loads((out / "manifest.json").read_text()) == manifest
