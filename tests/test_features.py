"""FbankExtractor against transformers' SeamlessM4TFeatureExtractor: values (≤ FBANK_ATOL), shapes, masks, errors.

Run under every backend: ``auto`` (the fast CPU path on CPU tensors), ``torch`` (the literal reference) and ``triton``
(the kernel, interpreted on CPU in CI).
"""

import json
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FBANK_ATOL

import w2vbert_fast

transformers = pytest.importorskip("transformers")
SPEECH = Path(__file__).parent / "data" / "speech_en_16k.wav"
RATE = 16000


def read_speech():
    with wave.open(str(SPEECH)) as f:
        assert f.getframerate() == RATE and f.getnchannels() == 1 and f.getsampwidth() == 2
        return np.frombuffer(f.readframes(f.getnframes()), dtype=np.int16).astype(np.float32) / 32768


def synthetic(kind, samples, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / RATE
    if kind == "tones":
        # a sequence of steady tones. One tone held for the whole clip would leave most mel bins with a variance
        # far below the 1e-7 of the normalisation, where transformers' own output is its float32 rounding
        # amplified ~3000×: noise, not a reference.
        frequency = np.array([440.0, 1250.0, 3000.0, 6500.0])[np.minimum((t * 8).astype(int) % 4, 3)]
        x = 0.5 * np.sin(2 * np.pi * frequency * t)
    elif kind == "chirp":
        x = 0.6 * np.sin(2 * np.pi * (100 * t + 3000 * t ** 2))
    elif kind == "noise":
        x = 0.3 * rng.standard_normal(samples)
    elif kind == "near-silence":
        x = 1e-5 * rng.standard_normal(samples)
    elif kind == "clipping":
        x = np.clip(3 * np.sin(2 * np.pi * 220 * t) + 0.5 * rng.standard_normal(samples), -1, 1)
    elif kind == "dc-offset":
        x = 0.4 + 0.05 * rng.standard_normal(samples)
    else:
        raise ValueError(kind)
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def reference():
    return transformers.SeamlessM4TFeatureExtractor()


def assert_same_as_transformers(ours, expected):
    expected_features = torch.as_tensor(np.asarray(expected["input_features"]))
    assert ours["input_features"].shape == expected_features.shape
    assert ours["input_features"].dtype == torch.float32
    assert torch.isfinite(ours["input_features"]).all()
    diff = (ours["input_features"].cpu().double() - expected_features.double()).abs().max().item()
    assert diff <= FBANK_ATOL, f"max |diff| {diff:.3e} > {FBANK_ATOL}"
    expected_mask = torch.as_tensor(np.asarray(expected["attention_mask"]))
    assert torch.equal(ours["attention_mask"].cpu().long(), expected_mask.long())


BACKENDS = ["auto", "torch", "triton"]
# the triton backend runs the kernels on CUDA tensors when there is a GPU, under the interpreter on CPU tensors
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def extract(which, clips, **kwargs):
    return w2vbert_fast.FbankExtractor()(clips, device=TRITON_DEVICE if which == "triton" else "cpu", **kwargs)


@pytest.mark.parametrize("which", BACKENDS)
@pytest.mark.parametrize("kind", ["tones", "chirp", "noise", "near-silence", "clipping", "dc-offset"])
def test_synthetic_signals_match_transformers(backend, reference, which, kind):
    backend(which)
    clip = synthetic(kind, 8000 if which == "triton" else 16000)
    assert_same_as_transformers(extract(which, clip), reference(clip, sampling_rate=RATE))


@pytest.mark.parametrize("which", BACKENDS)
def test_speech_clip_matches_transformers(backend, reference, which):
    backend(which)
    speech = read_speech()
    if which == "triton":
        speech = speech[: 3 * RATE]  # the interpreter is slow; three seconds cover every code path
    assert_same_as_transformers(extract(which, speech), reference(speech, sampling_rate=RATE))


@pytest.mark.parametrize("which", BACKENDS)
def test_edge_lengths_in_one_ragged_batch_match_transformers(backend, reference, which):
    backend(which)
    clips = [synthetic("noise", n, seed=n) for n in (560, 561, 720, 16000, 16161)]
    assert_same_as_transformers(extract(which, clips), reference(clips, sampling_rate=RATE))


@pytest.mark.parametrize("samples", [560, 561, 720, 16000, 16161])
def test_each_edge_length_alone_matches_transformers(reference, samples):
    clip = synthetic("chirp", samples, seed=1)
    assert_same_as_transformers(w2vbert_fast.FbankExtractor()(clip), reference(clip, sampling_rate=RATE))


@pytest.mark.parametrize("frames", [255, 256, 257, 513])
def test_cpu_path_chunk_boundaries_match_transformers(backend, reference, frames):
    """The CPU path works in chunks of 256 frames of one clip: clips ending either side of a chunk boundary."""
    backend("auto")
    clips = [synthetic("chirp", (frames - 1) * 160 + 400 + extra, seed=frames) for extra in (0, 159)]
    assert_same_as_transformers(w2vbert_fast.FbankExtractor()(clips), reference(clips, sampling_rate=RATE))


def test_ragged_batch_equals_clips_one_at_a_time():
    clips = [synthetic("noise", n, seed=n) for n in (5000, 12345, 561, 9999)]
    fe = w2vbert_fast.FbankExtractor()
    batch = fe(clips)
    for i, clip in enumerate(clips):
        alone = fe(clip)["input_features"][0]
        frames = alone.shape[0]
        assert torch.allclose(batch["input_features"][i, :frames], alone, atol=1e-5)
        assert int(batch["attention_mask"][i].sum()) == int(fe(clip)["attention_mask"].sum())
        assert (batch["input_features"][i, frames:] == 0).all()


def test_inputs_as_tensors_lists_and_padded_matrix_with_lengths_agree():
    clips = [synthetic("tones", 9000), synthetic("noise", 4321)]
    fe = w2vbert_fast.FbankExtractor()
    expected = fe(clips)
    padded = torch.zeros(2, 9000)
    padded[0], padded[1, :4321] = torch.from_numpy(clips[0]), torch.from_numpy(clips[1])
    for ours in (fe([torch.from_numpy(c) for c in clips]), fe(padded, lengths=torch.tensor([9000, 4321])),
                 fe([c.tolist() for c in clips])):
        assert torch.equal(ours["input_features"], expected["input_features"])
        assert torch.equal(ours["attention_mask"], expected["attention_mask"])


def test_padded_matrix_without_lengths_is_a_batch_of_whole_rows(reference):
    rows = np.stack([synthetic("noise", 3000, seed=s) for s in range(3)])
    assert_same_as_transformers(w2vbert_fast.FbankExtractor()(rows), reference(rows, sampling_rate=RATE))


def test_padding_options_match_transformers(reference):
    clip = synthetic("chirp", 16161)  # 99 frames: odd
    fe = w2vbert_fast.FbankExtractor()
    assert_same_as_transformers(fe(clip, pad_to_multiple_of=None),
                                reference(clip, sampling_rate=RATE, pad_to_multiple_of=None))
    ours = fe(clip, padding=False)
    expected = reference(clip, sampling_rate=RATE, padding=False)
    assert ours["input_features"].shape == np.asarray(expected["input_features"]).shape
    assert "attention_mask" not in fe(clip, return_attention_mask=False)


def test_device_argument_places_the_outputs():
    ours = w2vbert_fast.FbankExtractor()(synthetic("tones", 2000), device="cpu")
    assert ours["input_features"].device.type == "cpu" and ours["attention_mask"].device.type == "cpu"


def test_from_pretrained_reads_a_folder_written_by_transformers(tmp_path, reference):
    reference.save_pretrained(tmp_path)
    fe = w2vbert_fast.FbankExtractor.from_pretrained(tmp_path)
    assert (fe.sampling_rate, fe.num_mel_bins, fe.stride) == (16000, 80, 2)
    clip = synthetic("noise", 4000)
    assert_same_as_transformers(fe(clip), reference(clip, sampling_rate=RATE))


def test_from_pretrained_rejects_a_folder_without_the_config(tmp_path):
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        w2vbert_fast.FbankExtractor.from_pretrained(tmp_path)


def test_config_values_the_kernel_cannot_honour_are_rejected(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"sampling_rate": 8000}))
    with pytest.raises(ValueError, match="sampling_rate"):
        w2vbert_fast.FbankExtractor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_mel_bins"):
        w2vbert_fast.FbankExtractor(num_mel_bins=64)


# ------------------------------------------------------------------------------------------------ errors
GOOD = synthetic("noise", 2000)


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda fe: fe(GOOD, sampling_rate=8000), "sampling_rate must be the extractor's 16000"),
        (lambda fe: fe([GOOD, GOOD[:399]]), "clip 1 has 399 samples, fewer than one 400-sample frame"),
        (lambda fe: fe([GOOD, GOOD, GOOD[:559]]), "clip 2 has 559 samples, a single frame"),
        (lambda fe: fe([GOOD, np.where(np.arange(2000) == 7, np.nan, GOOD)]), "clip 1 contains NaN or Inf"),
        (lambda fe: fe([np.where(np.arange(2000) == 9, np.inf, GOOD)]), "clip 0 contains NaN or Inf"),
        (lambda fe: fe([GOOD, np.zeros((2, 2, 2000), dtype=np.float32)]), "clip 1 must be mono"),
        (lambda fe: fe(np.zeros((2, 2, 2, 2000), dtype=np.float32)), "raw_speech as an array must be"),
        (lambda fe: fe([(GOOD * 32767).astype(np.int16)]), "clip 0 has torch.int16 samples, expected floats"),
        (lambda fe: fe([]), "no clip"),
        (lambda fe: fe([GOOD, GOOD[:1000]], padding=False), "padding=False needs every clip"),
        (lambda fe: fe(GOOD, padding="middle"), "padding must be True, False, 'longest'"),
        (lambda fe: fe(torch.zeros(2, 900), lengths=torch.tensor([900, 1000])), "lengths of clip"),
        (lambda fe: fe([GOOD], lengths=[2000]), "lengths is only for a padded"),
    ],
    ids=["sampling-rate", "too-short", "one-frame", "nan", "inf", "3d-clip", "4d-batch", "int16", "empty",
         "unequal-without-padding", "unknown-padding", "length-past-end", "lengths-with-list"],
)
def test_bad_input_is_a_value_error_naming_the_clip_and_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call(w2vbert_fast.FbankExtractor())
