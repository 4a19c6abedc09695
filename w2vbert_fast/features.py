"""FbankExtractor: transformers' SeamlessM4TFeatureExtractor, batched, on any device.

The numbers come from ``ops.log_mel_fbank`` (the Triton kernel on CUDA tensors, a vectorised PyTorch path on the
CPU); this file turns raw clips into one padded batch, checks them, and does the padding, stride-2 stacking and
attention mask exactly as transformers does.

Deliberate differences: a clip of 400–559 samples has one frame, whose per-bin variance is undefined — transformers
returns NaN features for it; we raise a ValueError naming the clip. So does any clip shorter than one frame, and any
clip with a sample beyond ±MAX_ABS_SAMPLE (1e9), whose fp32 power spectrum could overflow into NaN features.
"""

import json
import math
import os

import numpy as np
import torch

from . import ops
from .ops.log_mel_fbank import FRAME_LENGTH, HOP_LENGTH, NUM_MEL_BINS, SAMPLE_RATE, num_frames

_PADDING_CHOICES = (True, False, "longest", "do_not_pad")
# The largest |sample| accepted. The power of one frame is at most 512·400·(2·1.97·32768·A)² ≈ 3.4e15·A²
# (Parseval; ×32768 scaling, DC removal and pre-emphasis at most ×3.94), which must stay below fp32's 3.4e38:
# A = 1e9 leaves five orders of magnitude, and still admits int16-range samples passed as floats.
MAX_ABS_SAMPLE = 1e9
# The fewest samples a clip may have: two 25 ms frames (one frame's per-bin variance is undefined)
MIN_SAMPLES = FRAME_LENGTH + HOP_LENGTH


class FbankExtractor:
    """``fe = FbankExtractor(); batch = fe(clips, sampling_rate=16000, device="cuda")``.

    ``batch["input_features"]``: (B, F, 160) float32, ``batch["attention_mask"]``: (B, F) int32, on ``device``:
    the same values as ``SeamlessM4TFeatureExtractor()(clips, sampling_rate=16000, return_tensors="pt")``.
    """

    def __init__(self, feature_size=80, sampling_rate=16000, num_mel_bins=80, padding_value=0.0, stride=2,
                 **kwargs):
        if num_mel_bins != NUM_MEL_BINS or feature_size != NUM_MEL_BINS:
            raise ValueError(
                f"num_mel_bins and feature_size must be {NUM_MEL_BINS} (the kernel's filter bank), "
                f"got {num_mel_bins} and {feature_size}"
            )
        if sampling_rate != SAMPLE_RATE:
            raise ValueError(f"sampling_rate must be {SAMPLE_RATE} (w2v-bert-2.0's), got {sampling_rate}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        self.feature_size = feature_size
        self.num_mel_bins = num_mel_bins
        self.sampling_rate = sampling_rate
        self.padding_value = float(padding_value)
        self.stride = stride
        self.extra = dict(kwargs)  # unknown keys of preprocessor_config.json, kept

    @classmethod
    def from_pretrained(cls, folder):
        """Read ``preprocessor_config.json`` from a transformers-format folder."""
        path = os.path.join(os.fspath(folder), "preprocessor_config.json")
        if not os.path.isfile(path):
            raise ValueError(f"no preprocessor_config.json in {os.fspath(folder)!r}")
        with open(path, encoding="utf-8") as f:
            try:
                values = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ValueError(f"{path} is not valid JSON ({error}): fix it, or delete it to use w2v-bert-2.0's "
                                 "feature settings") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
        known = ("feature_size", "sampling_rate", "num_mel_bins", "padding_value", "stride")
        return cls(**{k: v for k, v in values.items() if k in known},
                   **{k: v for k, v in values.items() if k not in known})

    def __repr__(self):
        return (f"FbankExtractor(sampling_rate={self.sampling_rate}, num_mel_bins={self.num_mel_bins}, "
                f"stride={self.stride}, padding_value={self.padding_value})")

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, raw_speech, sampling_rate=16000, device=None, padding=True, pad_to_multiple_of=2,
                 return_attention_mask=True, lengths=None):
        """raw_speech: one 1-D clip (numpy array, torch tensor or list of floats), a list of them, or a padded
        (B, N) array/tensor (with ``lengths``, the samples of each row; without, every row is a whole clip).
        Samples are floats at ``sampling_rate`` (must be the extractor's, 16 kHz), nominally in [-1, 1].

        padding: True/"longest" pads to the longest clip, then to a multiple of ``pad_to_multiple_of``;
        False/"do_not_pad" needs every clip to give the same number of frames. Returns a dict of tensors on
        ``device`` (default: the input tensor's device, else the CPU).
        """
        if sampling_rate != self.sampling_rate:
            raise ValueError(
                f"sampling_rate must be the extractor's {self.sampling_rate} Hz, got {sampling_rate}: resample first"
            )
        if padding not in _PADDING_CHOICES:
            raise ValueError(f"padding must be one of {_PADDING_CHOICES}, got {padding!r}")
        if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                               or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        if device is None:
            device = raw_speech.device if isinstance(raw_speech, torch.Tensor) else torch.device("cpu")
        waveforms, clip_lengths = self._batch(raw_speech, lengths, torch.device(device))

        features = ops.log_mel_fbank(waveforms, clip_lengths)  # (B, F, 80), zeros after each clip's frames
        frame_counts = num_frames(clip_lengths.to(torch.int64))
        frames = features.shape[1]
        if padding in (True, "longest"):
            if pad_to_multiple_of is not None and frames % pad_to_multiple_of:
                extra = pad_to_multiple_of - frames % pad_to_multiple_of
                features = torch.nn.functional.pad(features, (0, 0, 0, extra))
                frames += extra
        elif bool((frame_counts != frames).any()):
            raise ValueError(
                f"padding=False needs every clip to give the same number of frames, got {frame_counts.tolist()}"
            )
        mask = (torch.arange(frames, device=features.device)[None, :] < frame_counts[:, None]).to(torch.int32)
        if self.padding_value != 0.0:
            features = features.masked_fill(mask[..., None] == 0, self.padding_value)

        # stride stacking as transformers: drop the remainder, fold `stride` frames into one row of 80·stride
        frames -= frames % self.stride
        batch = features.shape[0]
        features = features[:, :frames].reshape(batch, frames // self.stride, NUM_MEL_BINS * self.stride)
        # a stacked row is real when its frame at offset 1 is (transformers' `indices % stride == 1`)
        mask = mask[:, :frames][:, 1 :: self.stride] if self.stride > 1 else mask[:, :frames]
        out = {"input_features": features}
        if return_attention_mask:
            out["attention_mask"] = mask
        return out

    # ------------------------------------------------------------------------------------------- batching
    def _batch(self, raw_speech, lengths, device):
        """Checked clips → (B, N) float32 padded waveforms and (B,) lengths on ``device``."""
        if lengths is not None:
            if not isinstance(raw_speech, (torch.Tensor, np.ndarray)) or raw_speech.ndim != 2:
                raise ValueError("lengths is only for a padded (batch, samples) array or tensor of raw_speech")
            lengths = torch.as_tensor(lengths)
            if lengths.dim() != 1 or lengths.shape[0] != raw_speech.shape[0] or lengths.dtype.is_floating_point:
                raise ValueError(
                    f"lengths must be ({raw_speech.shape[0]},) integers, got {tuple(lengths.shape)} {lengths.dtype}"
                )
            bad = [i for i, n in enumerate(lengths.tolist()) if not 0 <= n <= raw_speech.shape[1]]
            if bad:
                raise ValueError(f"lengths of clip(s) {bad} lie outside [0, {raw_speech.shape[1]}]")
            clips = [raw_speech[i, :n] for i, n in enumerate(lengths.tolist())]
        else:
            clips = self._split(raw_speech)
        if not clips:
            raise ValueError("raw_speech holds no clip")
        checked = [check_clip(clip, f"clip {i}") for i, clip in enumerate(clips)]
        sizes = [c.shape[0] for c in checked]
        waveforms = torch.empty(len(checked), max(sizes), dtype=torch.float32, device=device)
        for i, clip in enumerate(checked):
            waveforms[i, : clip.shape[0]] = clip.to(device, non_blocking=True)
            waveforms[i, clip.shape[0]:] = 0.0
        return waveforms, torch.tensor(sizes, dtype=torch.int64, device=device)

    @staticmethod
    def _split(raw_speech):
        if isinstance(raw_speech, (torch.Tensor, np.ndarray)):
            if raw_speech.ndim == 1:
                return [raw_speech]
            if raw_speech.ndim == 2:
                return list(raw_speech)
            raise ValueError(
                f"raw_speech must be one clip (samples,) or a batch (batch, samples) of mono audio, "
                f"got shape {tuple(raw_speech.shape)}"
            )
        if isinstance(raw_speech, (list, tuple)):
            if raw_speech and all(isinstance(s, (int, float, np.number)) for s in raw_speech):
                return [raw_speech]  # one clip given as a list of samples
            return list(raw_speech)
        raise ValueError(f"raw_speech must be an array, a tensor or a list of them, got {type(raw_speech).__name__}")


def check_clip(clip, name="clip") -> torch.Tensor:
    """The one check of a clip of samples, for every caller (the extractor, ``extract``, ``demo``): mono, floating
    point, at least two frames (``MIN_SAMPLES``), finite, no sample beyond ``MAX_ABS_SAMPLE``. Returns it as a
    float32 tensor; raises a ValueError that starts with ``name``."""
    if isinstance(clip, torch.Tensor):
        tensor = clip.detach()
    else:
        try:
            array = np.asarray(clip)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} is not an array of samples: {error}") from None
        if array.dtype == object:
            raise ValueError(f"{name} is not an array of samples (ragged or non-numeric)")
        tensor = torch.from_numpy(np.ascontiguousarray(array)) if array.dtype.kind in "fiub" else None
        if tensor is None:
            raise ValueError(f"{name} has samples of type {array.dtype}, expected floats")
        if isinstance(clip, (list, tuple)) and not tensor.dtype.is_floating_point:
            tensor = tensor.float()  # a Python list of numbers
    if tensor.dim() != 1:
        raise ValueError(
            f"{name} must be mono, one dimension of samples; got shape {tuple(tensor.shape)} "
            "(mix or pick a channel first)"
        )
    if not tensor.dtype.is_floating_point:
        raise ValueError(
            f"{name} has {tensor.dtype} samples, expected floats in [-1, 1] (divide 16-bit PCM by 32768)"
        )
    samples = tensor.shape[0]
    if samples < FRAME_LENGTH:
        raise ValueError(f"{name} has {samples} samples, fewer than one {FRAME_LENGTH}-sample frame")
    if samples < MIN_SAMPLES:
        raise ValueError(
            f"{name} has {samples} samples, a single frame (fewer than {MIN_SAMPLES}, 35 ms at 16 kHz): its "
            f"per-bin variance is undefined (transformers returns NaN features); give at least {MIN_SAMPLES} samples"
        )
    tensor = tensor.to(torch.float32)
    # one pass, no copy, one sync for both checks: aminmax gives NaN for both ends when any sample is NaN
    low, high = torch.aminmax(tensor)
    peak = float(torch.maximum(-low, high))
    if not math.isfinite(peak):
        raise ValueError(f"{name} contains NaN or Inf samples")
    if peak > MAX_ABS_SAMPLE:
        raise ValueError(
            f"{name} has a sample of magnitude {peak:.3g}, above {MAX_ABS_SAMPLE:.0e}: its fp32 power "
            "spectrum would overflow to Inf and the features to NaN; samples are expected in [-1, 1]"
        )
    return tensor
