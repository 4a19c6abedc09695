"""extract's inputs at corpus scale (issue 21, item 4): a manifest (JSON lines or TSV) whose durations let a run plan
without opening any file, checked against the audio when each clip is decoded."""

import json

import pytest
import torch
from test_cli import read_output
from test_extract_faults import extract, one_line_error, write_corpus

from w2vbert_fast.extract import audio

TINY = ["--random-weights", "tiny", "--layer", "1", "--batch-seconds", "3"]
LENGTHS = {"a": 1.0, "b": 0.5, "sub/c": 0.7}


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", LENGTHS)


def no_header_reads(monkeypatch):
    """Fail the test if planning opens an audio file (a header read) instead of trusting the manifest."""
    def refuse(path):
        raise AssertionError(f"{path} was opened to plan the run")

    monkeypatch.setattr(audio, "audio_info", refuse)


@pytest.mark.parametrize("form", ["jsonl", "tsv", "tsv_header"])
def test_a_manifest_with_durations_plans_without_opening_a_file(corpus, tmp_path, capsys, monkeypatch, form):
    assert extract(corpus, "--out", tmp_path / "from_folder", *TINY) == 0
    listing = corpus / "clips.manifest"
    if form == "jsonl":
        lines = [json.dumps({"path": f"{name}.wav", "duration": seconds, "sample_rate": 16000})
                 for name, seconds in LENGTHS.items()]
    elif form == "tsv":
        lines = [f"{name}.wav\t{seconds}\t16000" for name, seconds in LENGTHS.items()]
    else:  # named columns, in another order, and a comment
        lines = ["path\tsample_rate\tduration", "# rates first"] + [f"{name}.wav\t16000\t{seconds:.2f}"
                                                                     for name, seconds in LENGTHS.items()]
    listing.write_text("\n".join(lines) + "\n")
    no_header_reads(monkeypatch)
    out = tmp_path / "out"
    assert extract("--manifest", listing, "--out", out, *TINY) == 0
    assert "3 written" in capsys.readouterr().err
    for name in LENGTHS:  # relative to the manifest's folder, named by that relative path
        got, metadata = read_output(out / f"{name}.safetensors")
        want, want_metadata = read_output(tmp_path / "from_folder" / f"{name}.safetensors")
        assert torch.equal(got, want) and metadata == want_metadata
    assert extract("--manifest", listing, "--out", out, *TINY) == 0  # resume: the same outputs
    assert "0 written, 3 skipped" in capsys.readouterr().err


def test_manifest_names_absolute_paths_and_lines_without_a_duration(corpus, tmp_path, capsys):
    listing = tmp_path / "m.jsonl"
    listing.write_text(json.dumps({"path": str(corpus / "a.wav"), "name": "speaker1/a"}) + "\n"
                       + json.dumps({"path": str(corpus / "sub" / "c.wav")}) + "\n")
    out = tmp_path / "out"
    assert extract("--manifest", listing, "--out", out, *TINY) == 0  # durations from the headers
    assert (out / "speaker1" / "a.safetensors").exists() and (out / "c.safetensors").exists()


def test_a_manifest_the_audio_contradicts_fails_those_clips_by_name(corpus, tmp_path, capsys):
    listing = tmp_path / "m.tsv"
    listing.write_text(f"{corpus / 'a.wav'}\t1.01\n"  # rounded: fine
                       f"{corpus / 'b.wav'}\t30\n"  # a 0.5 s clip: batches would be sized wrong
                       f"{corpus / 'sub' / 'c.wav'}\t0.7\t8000\n"
                       f"{corpus / 'gone.wav'}\t2.0\n")
    out = tmp_path / "out"
    assert extract("--manifest", listing, "--out", out, *TINY) == 1
    err = capsys.readouterr().err
    assert f"{corpus / 'b.wav'}: holds 0.500 s of audio, its manifest line says 30 s" in err
    assert f"{corpus / 'sub' / 'c.wav'}: sample rate 16000 Hz, its manifest line says 8000 Hz" in err
    assert f"{corpus / 'gone.wav'}: no such file" in err
    assert "1 written" in err and "3 failed" in err
    final = [line for line in err.splitlines() if line.startswith("[batch")][-1]
    assert " 1/1 clips, " in final  # the failed clips left the totals


@pytest.mark.parametrize("line, message", [
    ("{\"duration\": 1.0}", "line 1: no \"path\""),
    ("{\"path\": \"a.wav\"", "line 1: not valid JSON"),
    ("a.wav\tlong", "line 1: duration 'long' is not a number"),
    ("a.wav\t-1", "line 1: duration must be a positive number of seconds"),
    ("a.wav\t1.0\t16000.5", "line 1: sample_rate '16000.5' is not a whole number"),
    ("a.wav\t1\t16000\tx\ty", "line 1: 5 tab-separated fields, expected at most 3"),
    ("{\"path\": \"a.wav\", \"name\": \"../up\"}", "line 1: name must be a relative path inside the output folder"),
])
def test_a_bad_manifest_line_stops_before_any_work(corpus, tmp_path, capsys, line, message):
    listing = corpus / "m.txt"
    listing.write_text(line + "\n")
    assert extract("--manifest", listing, "--out", tmp_path / "out", *TINY) == 2
    err = one_line_error(capsys)
    assert f"--manifest {listing}: {message}" in err


def test_an_unknown_manifest_column_is_named(corpus, tmp_path, capsys):
    listing = corpus / "m.tsv"
    listing.write_text("path\tseconds\na.wav\t1.0\n")
    assert extract("--manifest", listing, "--out", tmp_path / "out", *TINY) == 2
    assert "line 1: unknown column(s) ['seconds']" in one_line_error(capsys)
