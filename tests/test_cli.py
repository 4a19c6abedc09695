"""The command line (python -m w2vbert_fast demo | extract) and the audio reader, on CPU with a tiny model."""

import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import FP32_ATOL, assert_fp32_close
from safetensors import safe_open

from w2vbert_fast.cli import main
from w2vbert_fast.cli.common import random_model
from w2vbert_fast.extract.audio import AudioError, audio_info, read_audio, resample_audio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- helpers
def write_wav(path, samples, rate=16000, bits=16, floating=False):
    """samples: (T,) or (T, channels) floats in [-1, 1] → a RIFF WAV (PCM 8/16/24/32 or IEEE float 32/64)."""
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim == 1:
        samples = samples[:, None]
    channels = samples.shape[1]
    if floating:
        data = samples.astype("<f4" if bits == 32 else "<f8").tobytes()
    elif bits == 8:
        data = np.clip(np.round(samples * 127 + 128), 0, 255).astype(np.uint8).tobytes()
    elif bits == 24:
        ints = np.clip(np.round(samples * (2 ** 23 - 1)), -2 ** 23, 2 ** 23 - 1).astype("<i4")
        data = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        scale = 2 ** (bits - 1) - 1
        data = np.round(samples * scale).astype("<i2" if bits == 16 else "<i4").tobytes()
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 3 if floating else 1, channels, rate, rate * block, block, bits)
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE")
        f.write(b"fmt " + struct.pack("<I", len(fmt)) + fmt)
        f.write(b"LIST" + struct.pack("<I", 4) + b"INFO")  # a chunk to skip
        f.write(b"data" + struct.pack("<I", len(data)) + data)


def speechy(seconds, seed, rate=16000):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = sum(0.2 / k * np.sin(2 * np.pi * 150 * k * t + rng.uniform(0, 6)) for k in range(1, 6))
    return (tone * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t)) + 0.02 * rng.normal(size=t.size)).clip(-1, 1)


def read_output(path):
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("hidden_states"), f.metadata()


def direct_hidden_states(wave, layer):
    """What a user gets calling the model on that one clip."""
    from w2vbert_fast import FbankExtractor

    batch = FbankExtractor()([wave], sampling_rate=16000)
    model = random_model("tiny", seed=0)
    with torch.no_grad():
        out = model(batch["input_features"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    return out.hidden_states[layer][0]


@pytest.fixture
def clips(tmp_path):
    """Four readable clips in several WAV encodings (one in a sub-folder) and one unreadable file."""
    folder = tmp_path / "clips"
    (folder / "sub").mkdir(parents=True)
    waves = {"a": (1.0, {}), "b": (2.5, dict(bits=24)), "c": (0.7, dict(bits=32, floating=True)),
             "sub/d": (1.3, dict(bits=32))}
    for i, (name, (seconds, options)) in enumerate(waves.items()):
        write_wav(folder / f"{name}.wav", speechy(seconds, i), **options)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00this is not a wav file")
    return folder


def cli(*args):
    return subprocess.run([sys.executable, "-m", "w2vbert_fast", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


# ------------------------------------------------------------------------------------------------- demo
def test_demo_tiny_in_a_subprocess():
    result = cli("demo", "--tiny")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    diffs = [float(x) for x in re.findall(r"max \|diff\| ([0-9.e+-]+)", out)]
    assert len(diffs) == 2, out  # features, encoder
    assert all(d <= FP32_ATOL for d in diffs), out
    assert len(re.findall(r"\d+\.\d ms", out)) == 4, out  # fast and reference, features and encoder
    if not torch.cuda.is_available():
        assert "no CUDA device: the fast path runs its CPU implementation" in out
    assert re.search(r"speed-up \d+\.\d\dx \(median of 3 calls", out), out


def test_demo_without_transformers_uses_the_torch_reference(capsys):
    assert main(["demo", "--tiny", "--no-transformers"]) == 0
    out = capsys.readouterr().out
    assert "W2VBERT_FAST_BACKEND=torch" in out and "PyTorch reference" in out


# ------------------------------------------------------------------------------------------------ bench
def test_bench_without_the_test_extras_names_the_install(tmp_path):
    """The README's first venv has no pytest: bench says which install it needs instead of a bare ImportError."""
    hide_pytest = ("import sys; sys.modules['pytest'] = None; from w2vbert_fast.cli import main; "
                   "sys.exit(main(['bench']))")
    result = subprocess.run([sys.executable, "-c", hide_pytest], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    assert 'bench needs the test extras, and pytest is not installed: pip install -e ".[test]"' in result.stderr
    assert "No module named" not in result.stderr and "Traceback" not in result.stderr


def test_bench_prints_one_table_the_reports(tmp_path, monkeypatch):
    """pytest-benchmark's own table is off (--benchmark-quiet); the report of the JSON it wrote is the table."""
    from w2vbert_fast.cli import bench

    commands = []

    def run(command, **kwargs):
        commands.append(command)
        json_arg = [a for a in command if str(a).startswith("--benchmark-json=")]
        if json_arg:
            open(json_arg[0].split("=", 1)[1], "w").write("{}")
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", run)
    json_path = tmp_path / "cpu.json"
    assert main(["bench", "--json", str(json_path), "-k", "encoder"]) == 0
    pytest_command, report_command = commands
    assert pytest_command[1:3] == ["-m", "pytest"] and "--benchmark-only" in pytest_command
    assert "--benchmark-quiet" in pytest_command and pytest_command[-2:] == ["-k", "encoder"]
    assert report_command[1:] == [os.path.join(bench.REPO, bench.REPORT), str(json_path)]
    assert os.path.isfile(report_command[1])
    assert os.path.isfile(os.path.join(bench.REPO, bench.CAMPAIGN))  # what --budget-s runs


# ---------------------------------------------------------------------------------------------- extract
def test_extract_writes_reports_unreadable_and_resumes(clips, tmp_path, capsys):
    out = tmp_path / "out"
    args = [str(clips), "--out", str(out), "--random-weights", "tiny", "--layer", "1", "--batch-seconds", "3"]
    assert main(["extract", *args]) == 1  # one file failed, the others are written
    err = capsys.readouterr().err
    assert "broken.wav" in err and "not a WAV file" in err
    assert "4 written" in err and "1 failed" in err and "[batch 3/3]" in err  # batched by length: 3 batches
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.safetensors"))
    assert written == ["a.safetensors", "b.safetensors", "c.safetensors", "sub/d.safetensors"]
    assert not list(out.rglob("*.partial"))

    for name in ("a", "c", "sub/d"):
        hidden, metadata = read_output(out / f"{name}.safetensors")
        assert metadata["layer"] == "1" and metadata["sample_rate"] == "16000"
        assert metadata["source"] == os.path.abspath(clips / f"{name}.wav")
        wave, _ = read_audio(clips / f"{name}.wav")
        expected = direct_hidden_states(wave, layer=1)
        assert hidden.shape == expected.shape and hidden.shape[1] == 64
        assert_fp32_close(hidden, expected)

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    # the rerun, as a user runs it: skips what is written, still names the broken file, exits 1
    result = cli("extract", *args)
    assert result.returncode == 1, result.stderr
    assert "0 written, 4 skipped" in result.stderr and "broken.wav" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == mtimes


def test_extract_rate_and_channels_need_their_options(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    write_wav(folder / "narrowband.wav", speechy(1.0, 0, rate=8000), rate=8000)
    write_wav(folder / "stereo.wav", np.stack([speechy(1.0, 1), speechy(1.0, 2)], axis=1))
    args = [str(folder), "--out", str(tmp_path / "out"), "--random-weights", "tiny", "--layer", "2"]
    assert main(["extract", *args]) == 1
    err = capsys.readouterr().err
    assert re.search(r"narrowband\.wav: sample rate 8000 Hz, expected 16000 Hz \(pass --resample", err)
    assert re.search(r"stereo\.wav: 2 channels.*--downmix", err)
    assert main(["extract", *args, "--resample", "--downmix"]) == 0
    hidden, metadata = read_output(tmp_path / "out" / "narrowband.safetensors")
    assert metadata["source_sample_rate"] == "8000" and metadata["num_samples"] == "16000"
    assert hidden.shape == (49, 64) and torch.isfinite(hidden).all()


def test_extract_usage_errors(clips, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["extract", str(clips), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "extract needs --model FOLDER" in capsys.readouterr().err

    assert main(["extract", str(clips), "--out", str(tmp_path / "o"), "--random-weights", "tiny", "--layer", "3"]) == 2
    assert "--layer must be between 0 (the input to the first layer) and 2" in capsys.readouterr().err

    assert main(["extract", str(clips), "--out", str(tmp_path / "o"), "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err

    missing = tmp_path / "nope.wav"
    assert main(["extract", str(clips / "a.wav"), str(missing), "--out", str(tmp_path / "o"),
                 "--random-weights", "tiny", "--layer", "0"]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: no such file" in err and "1 written" in err


# ------------------------------------------------------------------------------------------------ audio
@pytest.mark.parametrize("bits,floating,tolerance", [(8, False, 1 / 100), (16, False, 1e-4), (24, False, 1e-6),
                                                     (32, False, 1e-7), (32, True, 1e-7), (64, True, 1e-7)],
                         ids=["pcm8", "pcm16", "pcm24", "pcm32", "float32", "float64"])
def test_wav_encodings(tmp_path, bits, floating, tolerance):
    wave = speechy(0.25, 3) * 0.9
    path = tmp_path / "x.wav"
    write_wav(path, wave, bits=bits, floating=floating)
    samples, rate = read_audio(path)
    assert rate == 16000 and samples.dtype == np.float32 and samples.shape == wave.shape
    assert np.abs(samples - wave).max() <= tolerance
    info = audio_info(path)
    assert (info.sample_rate, info.frames, info.channels) == (16000, len(wave), 1)


def test_bundled_clip_matches_the_test_copy():
    from w2vbert_fast.extract.audio import bundled_clip_path

    bundled, rate = read_audio(bundled_clip_path())
    test_copy, _ = read_audio(os.path.join(ROOT, "tests", "data", "speech_en_16k.wav"))
    assert rate == 16000 and np.array_equal(bundled, test_copy) and len(bundled) > 16000


def test_audio_errors_name_the_file(tmp_path):
    with pytest.raises(AudioError, match=r"missing\.wav: no such file"):
        read_audio(tmp_path / "missing.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: not a WAV file"):
        audio_info(tmp_path / "empty.wav")
    write_wav(tmp_path / "nan.wav", np.array([0.0, np.nan, 0.1]), bits=32, floating=True)
    with pytest.raises(AudioError, match=r"nan\.wav: audio has NaN"):
        read_audio(tmp_path / "nan.wav")
    try:
        import soundfile  # noqa: F401
    except ImportError:
        (tmp_path / "x.flac").write_bytes(b"fLaC")
        with pytest.raises(AudioError, match=r"x\.flac: .*needs the soundfile package"):
            read_audio(tmp_path / "x.flac")


def test_resample_keeps_a_tone():
    t8, t16 = torch.arange(8000) / 8000, torch.arange(16000) / 16000
    up = resample_audio(torch.sin(2 * torch.pi * 440 * t8), 8000, 16000)
    assert up.shape == (16000,)
    assert (up[200:-200] - torch.sin(2 * torch.pi * 440 * t16)[200:-200]).abs().max() < 2e-3
    down = resample_audio(torch.sin(2 * torch.pi * 440 * torch.arange(44100) / 44100), 44100, 16000)
    assert down.shape == (16000,)
    assert (down[200:-200] - torch.sin(2 * torch.pi * 440 * t16)[200:-200]).abs().max() < 2e-3
