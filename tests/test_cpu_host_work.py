"""FbankExtractor's CPU work runs on the calling thread (numpy, and GEMMs too small for OpenBLAS to thread): the
host-side placement gives what the batched tensor ops give, and the fbank's chunking keeps its GEMMs under the size
at which OpenBLAS starts threads. Why: on a shared CPU every parallel region of a small op waits for a descheduled
worker thread (benchmarks/bench_cpu_contention.py)."""

import importlib

import numpy as np
import pytest
import torch

from w2vbert_fast import FbankExtractor
from w2vbert_fast.features import _padded_waveforms, _place_on_host, check_clip

fbank = importlib.import_module("w2vbert_fast.ops.log_mel_fbank")

# OpenBLAS (interface/gemm.c) runs a GEMM on one thread when m·n·k ≤ SMP_THRESHOLD_MIN (65536) ·
# GEMM_MULTITHREAD_THRESHOLD (4, its default)
OPENBLAS_ONE_THREAD_MNK = 65536 * 4


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("padding_value", [0.0, -1.5])
@pytest.mark.parametrize("counts, frames", [([7, 3, 5], 8), ([7, 3, 5], 7), ([4, 4, 1], 10)],
                         ids=["padded", "longest", "shorter-than-features"])
def test_host_placement_is_the_batched_tensor_placement(side, padding_value, counts, frames):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(3, 7, 80, generator=generator)
    extractor = FbankExtractor(padding_side=side, padding_value=padding_value)
    host_features, host_mask = _place_on_host(features, counts, frames, side, padding_value)
    device_features, device_mask = extractor._place_on_device(features, counts, frames)
    assert host_features.dtype == device_features.dtype == torch.float32
    assert host_mask.dtype == device_mask.dtype == torch.int32
    assert torch.equal(host_features, device_features)
    assert torch.equal(host_mask, device_mask)


def test_the_fbank_gemms_stay_below_openblas_threading_size():
    """Each chunk's mel sum is five (chunk × bins) @ (bins × 16) GEMMs: all small enough for one thread."""
    widest = max(high - low for low, high, _, _, _ in fbank._mel_filter_blocks())
    mel_width = max(mel_high - mel_low for _, _, mel_low, mel_high, _ in fbank._mel_filter_blocks())
    assert fbank._CHUNK_ROWS * widest * mel_width <= OPENBLAS_ONE_THREAD_MNK


def test_cpu_waveforms_are_zero_padded_float32_with_int64_lengths():
    clips = [torch.ones(5), torch.full((3,), 2.0)]
    waveforms, lengths = _padded_waveforms(clips, torch.device("cpu"))
    assert waveforms.dtype == torch.float32 and lengths.dtype == torch.int64
    assert waveforms.tolist() == [[1.0] * 5, [2.0] * 3 + [0.0, 0.0]]
    assert lengths.tolist() == [5, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_check_clip_takes_every_float_dtype_on_the_cpu(dtype):
    clip = (torch.arange(800) / 800).to(dtype)
    checked = check_clip(clip, "clip")
    assert checked.dtype == torch.float32
    assert torch.equal(checked, clip.float())


@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"),
                                          (-2e9, "magnitude")])
def test_check_clip_refuses_bad_samples_in_numpy_arrays(bad, message):
    clip = np.zeros(800, dtype=np.float64)
    clip[400] = bad
    with pytest.raises(ValueError, match=message):
        check_clip(clip, "clip 3")
