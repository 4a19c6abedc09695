"""ops.log_mel_fbank: the Triton kernels (interpreted on CPU in CI, fp32 in, fp64 framing and FFT) and the fast CPU
path against the literal reference (transformers' steps, fp64), which tests/test_features.py holds against
transformers itself."""

import importlib

import pytest
import torch
import triton
from conftest import FBANK_ATOL, HAS_CUDA

from w2vbert_fast.ops import log_mel_fbank, log_mel_fbank_reference
from w2vbert_fast.ops.log_mel_fbank import _launch_log_mel, log_mel_cpu, log_mel_reference, num_frames

fbank_module = importlib.import_module("w2vbert_fast.ops.log_mel_fbank")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def padded_batch(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    waves = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        t = torch.arange(n) / 16000
        waves[i, :n] = 0.3 * torch.sin(2 * torch.pi * (200 + 500 * i) * t * (1 + t)) + 0.05 * torch.randn(n, generator=generator)
    return waves.to(DEVICE), torch.tensor(lengths, device=DEVICE)


@pytest.mark.parametrize("lengths", [[560], [561, 720, 1999], [4000, 560, 3201]], ids=["two-frames", "edges", "ragged"])
def test_kernel_log_mel_matches_reference_before_normalisation(lengths):
    waves, lengths = padded_batch(lengths)
    ours = _launch_log_mel(waves, lengths.to(torch.int32)).double().cpu()
    expected = log_mel_reference(waves, lengths)
    assert ours.shape == expected.shape
    # fp32 output of an fp64 computation: a few ulps of values around 5–25
    assert (ours - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("lengths", [[2000], [561, 720, 1999], [4000, 720, 3201]], ids=["one-clip", "edges", "ragged"])
def test_kernel_matches_reference(backend, lengths):
    # Normalisation divides by sqrt(var + 1e-7): a clip of two or three nearly equal frames amplifies an ulp of the
    # log-mel up to ~3000×, in transformers as here, so the normalised comparison uses clips with some variance.
    backend("triton")
    waves, lengths = padded_batch(lengths)
    ours = log_mel_fbank(waves, lengths)
    expected = log_mel_fbank_reference(waves, lengths)
    assert ours.shape == expected.shape == (len(lengths), int(num_frames(waves.shape[1])), 80)
    assert (ours - expected).abs().max().item() <= FBANK_ATOL


@pytest.mark.parametrize("frames_block, mel_block, bins_block", [(1, 16, 16), (4, 32, 32), (8, 16, 128), (16, 32, 256)])
def test_every_frame_is_written_whatever_the_block(frames_block, mel_block, bins_block):
    """The output is poisoned with NaN first: frames past a clip's end must be written (as zeros) too, whatever the
    frames per program of either kernel and the DFT bins per step of the mel sum."""
    waves, lengths = padded_batch([3000, 900, 1200], seed=1)
    out = torch.full((3, int(num_frames(3000)), 80), float("nan"), device=DEVICE)
    _launch_log_mel(waves, lengths.to(torch.int32), frames_config=triton.Config({"BLOCK_F": frames_block}, num_warps=4),
                    log_mel_config=triton.Config({"BLOCK_F": mel_block, "BLOCK_K": bins_block}, num_warps=4), out=out)
    assert torch.isfinite(out).all()
    for i, n in enumerate(lengths.tolist()):
        assert (out[i, int(num_frames(n)):] == 0).all()
        assert (out[i, : int(num_frames(n))] != 0).any()


@pytest.mark.parametrize("chunks", [(1, -1), (1, 0), (1, 1), (2, 1), (4, 0)], ids=["C-1", "C", "C+1", "2C+1", "4C"])
def test_fast_cpu_path_matches_the_reference_across_its_chunk_boundaries(backend, chunks):
    """The fast path works in chunks of C = _CHUNK_ROWS frames of one clip: clips ending either side of a chunk
    boundary, before normalisation and after (what ``auto`` runs on CPU tensors)."""
    backend("auto")
    frames = chunks[0] * fbank_module._CHUNK_ROWS + chunks[1]
    n = (frames - 1) * 160 + 400
    waves, lengths = padded_batch([n, n + 159, n - 321], seed=5)
    waves, lengths = waves.cpu(), lengths.cpu()
    assert (log_mel_cpu(waves, lengths) - log_mel_reference(waves, lengths)).abs().max().item() <= 1e-5
    ours = log_mel_fbank(waves, lengths)
    assert (ours - log_mel_fbank_reference(waves, lengths)).abs().max().item() <= FBANK_ATOL


def test_padding_samples_do_not_leak_into_a_clip(backend):
    backend("triton")
    waves, lengths = padded_batch([2000, 1000], seed=2)
    garbage = waves.clone()
    garbage[1, 1000:] = 0.9
    assert torch.equal(log_mel_fbank(waves, lengths), log_mel_fbank(garbage, lengths))


@pytest.mark.parametrize("which", ["torch", "auto", "triton"])
def test_one_frame_clip_gives_zeros_not_nan(backend, which):
    backend(which)
    waves, lengths = padded_batch([1000, 450], seed=3)
    out = log_mel_fbank(waves, lengths)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all()


@pytest.mark.parametrize("which", ["torch", "auto", "triton"])
def test_a_nan_sample_gives_nan_features_for_its_clip_only(backend, which):
    """NaN in, NaN out, on both paths (the Triton path once floored NaN mel energies to finite features): every
    valid frame of the clip holding the NaN (its per-bin mean is NaN), none of its padding, nothing of other clips."""
    backend(which)
    waves, lengths = padded_batch([3000, 4000], seed=4)
    clean = log_mel_fbank(waves, lengths)
    waves[0, 1500] = float("nan")
    out = log_mel_fbank(waves, lengths)
    frames = int(num_frames(3000))
    assert torch.isnan(out[0, :frames]).all()
    assert (out[0, frames:] == 0).all()
    assert torch.equal(out[1], clean[1])


def test_without_lengths_every_sample_is_real():
    waves, _ = padded_batch([1234, 1234])
    assert torch.equal(log_mel_fbank(waves), log_mel_fbank(waves, torch.tensor([1234, 1234], device=DEVICE)))


def test_the_op_is_registered_with_torch_library():
    waves, lengths = padded_batch([900, 700])
    for normalize in (True, False):
        torch.library.opcheck(torch.ops.w2vbert_fast.log_mel_fbank.default, (waves, lengths.to(torch.int32), normalize),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(
    "args,message",
    [
        ((torch.zeros(1000),), "waveforms must be a \\(batch, samples\\) tensor"),
        ((torch.zeros(1, 1000, dtype=torch.int16),), "waveforms must be a floating-point"),
        ((torch.zeros(2, 300),), "at least 400 samples"),
        ((torch.zeros(2, 1000), torch.tensor([1000])), "lengths must be a \\(batch,\\)"),
        ((torch.zeros(2, 1000), torch.tensor([1000.0, 900.0])), "lengths must be an integer"),
        ((torch.zeros(2, 1000), torch.tensor([1000, 399])), "lengths must lie in \\[400, 1000\\]"),
        ((torch.zeros(2, 1000), torch.tensor([1001, 400])), "lengths must lie in"),
    ],
    ids=["rank", "integer", "too-short", "lengths-shape", "float-lengths", "length-below-a-frame", "length-past-end"],
)
def test_bad_inputs_are_value_errors_naming_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        log_mel_fbank(*args)


@pytest.mark.parametrize("which", ["torch", "auto", "triton"])
def test_bad_lengths_are_caught_on_every_backend_where_checking_is_free(backend, which):
    backend(which)
    with pytest.raises(ValueError, match="lengths must lie in"):
        log_mel_fbank(torch.zeros(2, 1000), torch.tensor([1000, 399]))


HOST_READS = ("item", "tolist", "__int__", "__index__", "__float__", "__bool__")


def test_where_lengths_go_unchecked_no_value_is_read_on_the_host(backend, monkeypatch):
    """On a GPU (auto validation) reading lengths' values would be a device sync on every batch. Here
    W2VBERT_FAST_VALIDATE=0 puts CPU tensors in that state, and every host read of a tensor's value fails: the
    dispatch still reaches the op, and hands it lengths clamped on the device to [400, N]."""
    backend("triton")
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "0")
    seen = []
    monkeypatch.setattr(fbank_module, "_log_mel_fbank_op", lambda waves, lengths, normalize: seen.append(lengths.clone()) or waves)

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    waves = torch.zeros(2, 1000)
    with monkeypatch.context() as patched:
        for name in HOST_READS:
            patched.setattr(torch.Tensor, name, host_read)
        log_mel_fbank(waves, torch.tensor([5000, 10]))
    assert len(seen) == 1 and seen[0].dtype == torch.int32
    assert seen[0].tolist() == [1000, 400]


def test_unchecked_out_of_range_lengths_read_only_their_own_clip(backend, monkeypatch):
    """What the clamp buys on the kernel path: lengths past N or under a frame, unchecked, give the result of the
    clamped lengths (finite, no sample of another row read)."""
    backend("triton")
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "0")
    waves, _ = padded_batch([1200, 1200], seed=6)
    out = log_mel_fbank(waves, torch.tensor([5000, 10], device=DEVICE))
    assert torch.isfinite(out).all()
    assert torch.equal(out, log_mel_fbank(waves, torch.tensor([1200, 400], device=DEVICE)))


@pytest.mark.parametrize("which", ["auto", "torch", "triton"])
def test_unnormalised_log_mel_is_the_reference_before_normalisation(backend, which):
    backend(which)
    generator = torch.Generator().manual_seed(4)
    waveforms = 0.3 * torch.randn(2, 4000, generator=generator)
    lengths = torch.tensor([4000, 2345])
    got = log_mel_fbank(waveforms, lengths, normalize=False)
    want = log_mel_reference(waveforms, lengths)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert (got - want).abs().max().item() <= 1e-3
