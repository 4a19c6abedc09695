"""FbankExtractor's sample bound: any clip it accepts gives finite features; beyond ±MAX_ABS_SAMPLE it refuses,
naming the clip, instead of returning NaN features from an overflowed fp32 power spectrum."""

import re

import numpy as np
import pytest
import torch

from w2vbert_fast import FbankExtractor
from w2vbert_fast.features import MAX_ABS_SAMPLE


def worst_case(amplitude, samples=4000):
    """±amplitude alternating: all its energy at Nyquist, where pre-emphasis doubles it (the largest power)."""
    return np.tile(np.array([amplitude, -amplitude], dtype=np.float32), samples // 2)


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_largest_accepted_samples_give_finite_features(backend, backend_name):
    backend(backend_name)
    clips = [worst_case(MAX_ABS_SAMPLE), np.full(4000, MAX_ABS_SAMPLE, np.float32), worst_case(32768.0)]
    features = FbankExtractor()([torch.from_numpy(c) for c in clips], sampling_rate=16000)["input_features"]
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("value", [1e20, -3e9, 1e15], ids=["spike", "negative", "loud"])
def test_samples_beyond_the_bound_are_refused_by_clip(value):
    good = np.sin(np.arange(4000, dtype=np.float32) / 7)
    bad = good.copy()
    bad[1234] = value
    message = f"clip 1 has a sample of magnitude {abs(value):.3g}, above 1e+09: its fp32 power spectrum would overflow"
    with pytest.raises(ValueError, match=re.escape(message)):
        FbankExtractor()([good, bad], sampling_rate=16000)


def test_nan_and_inf_are_still_named():
    clip = np.zeros(4000, np.float32)
    for value in (np.nan, np.inf, -np.inf):
        clip[7] = value
        with pytest.raises(ValueError, match="clip 0 contains NaN or Inf samples"):
            FbankExtractor()([clip], sampling_rate=16000)
