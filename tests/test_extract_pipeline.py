"""extract's pipeline (issue 21, item 1): decoding in background threads a bounded number of batches ahead, the
model on the main thread, writes in writer threads, the finiteness check once per batch — and the same outputs,
failures and resume as the serial mode (``--workers 0``)."""

import threading

import pytest
import torch
from test_cli import read_output, speechy, write_wav
from test_extract_faults import extract

from w2vbert_fast.extract import pipeline

TINY = ["--random-weights", "tiny", "--layer", "1", "--batch-seconds", "2"]


@pytest.fixture
def corpus(tmp_path):
    """Twelve clips of 0.4–1.5 s (several batches), one too short, one not audio."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(12):
        write_wav(folder / f"clip{i:02d}.wav", speechy(0.4 + 0.1 * i, i))
    write_wav(folder / "short.wav", speechy(300 / 16000, 0))
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00not a wav")
    return folder


def outputs(out):
    return {p.name: read_output(p) for p in sorted(out.glob("*.safetensors"))}


def test_pipelined_and_serial_write_the_same_outputs_and_failures(corpus, tmp_path, capsys):
    results = {}
    for workers in ("0", "4"):
        out = tmp_path / f"workers{workers}"
        assert extract(corpus, "--out", out, *TINY, "--workers", workers) == 1
        err = capsys.readouterr().err
        failed = sorted(line.strip() for line in err.splitlines()[err.splitlines().index(
            "failed (not written; fix or remove them and rerun: written clips are skipped):") + 1:])
        results[workers] = (outputs(out), failed)
    (serial, serial_failed), (pipelined, pipelined_failed) = results["0"], results["4"]
    assert len(serial) == 12 and serial_failed == pipelined_failed and len(serial_failed) == 2
    assert serial.keys() == pipelined.keys()
    for name, (hidden, metadata) in serial.items():
        assert torch.equal(hidden, pipelined[name][0]) and metadata == pipelined[name][1]


def test_stages_run_on_their_threads_and_decoding_stays_a_bounded_number_of_batches_ahead(corpus, tmp_path,
                                                                                           monkeypatch):
    threads, decoded_before_encode = {"decode": set(), "model": set(), "write": set()}, []
    real_decode, real_encode, real_finish = pipeline.Pipeline.decode, pipeline.Pipeline.encode, \
        pipeline.Pipeline.finish
    decoded = []

    def decode(self, task):
        threads["decode"].add(threading.current_thread().name)
        result = real_decode(self, task)
        decoded.append(task)
        return result

    def encode(self, clips):
        threads["model"].add(threading.current_thread().name)
        decoded_before_encode.append(len(decoded))
        return real_encode(self, clips)

    def finish(self, parts):
        threads["write"].add(threading.current_thread().name)
        return real_finish(self, parts)

    monkeypatch.setattr(pipeline.Pipeline, "decode", decode)
    monkeypatch.setattr(pipeline.Pipeline, "encode", encode)
    monkeypatch.setattr(pipeline.Pipeline, "finish", finish)
    batches = []
    real_plan = pipeline.plan_batches
    monkeypatch.setattr(pipeline, "plan_batches", lambda *args: batches.extend(real_plan(*args)) or batches)
    assert extract(corpus, "--out", tmp_path / "out", *TINY, "--workers", "3") == 1
    assert threads["model"] == {"MainThread"}
    assert threads["decode"] and all(name.startswith("w2vbert_fast decode") for name in threads["decode"])
    assert threads["write"] and all(name.startswith("w2vbert_fast write") for name in threads["write"])
    assert len(batches) >= 4
    clips_by_batch = [len(batch.tasks) for batch in batches]
    for k, count in enumerate(decoded_before_encode):  # batch k encodes with at most PREFETCH batches beyond it
        assert count <= sum(clips_by_batch[: k + 1 + pipeline.PREFETCH])


def test_the_finiteness_check_is_one_per_batch(corpus, tmp_path, monkeypatch):
    calls, real_isfinite = [], torch.isfinite

    def isfinite(tensor):
        calls.append(tuple(tensor.shape))
        return real_isfinite(tensor)

    batches = []
    real_plan = pipeline.plan_batches
    monkeypatch.setattr(pipeline, "plan_batches", lambda *args: batches.extend(real_plan(*args)) or batches)
    monkeypatch.setattr(torch, "isfinite", isfinite)
    assert extract(corpus, "--out", tmp_path / "out", *TINY) == 1
    assert len(calls) == len(batches) and all(len(shape) == 3 for shape in calls)  # (B, T, hidden), once each


@pytest.mark.parametrize("workers", ["0", "4"])
def test_a_batch_that_raises_is_redone_clip_by_clip(corpus, tmp_path, capsys, monkeypatch, workers):
    real_call = pipeline.Encoder.__call__
    doomed = 1.0 * 16000  # clip06: 1.0 s

    def out_of_memory_for_batches(self, clips):
        if len(clips) > 1 or clips[0].samples == doomed:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_call(self, clips)

    monkeypatch.setattr(pipeline.Encoder, "__call__", out_of_memory_for_batches)
    out = tmp_path / "out"
    assert extract(corpus, "--out", out, *TINY, "--workers", workers) == 1
    err = capsys.readouterr().err
    assert f"{corpus / 'clip06.wav'}: CUDA out of memory (simulated)" in err and "11 written" in err
    assert len(outputs(out)) == 11


def test_workers_must_be_zero_or_more(corpus, tmp_path, capsys):
    assert extract(corpus, "--out", tmp_path / "out", *TINY, "--workers", "-1") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("--workers must be 0 (no background threads) or more, got -1") and len(err.splitlines()) == 1
