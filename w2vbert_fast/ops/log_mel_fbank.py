"""Kaldi-style log-mel filterbank features, normalised per utterance: the numbers of transformers'
``SeamlessM4TFeatureExtractor`` before its padding and stride-2 stacking (those are in ``features.py``).

Per utterance of n samples: × 32768; frames of 400 samples every 160 (no centring, 1 + (n − 400) // 160 of
them); per frame DC removal, pre-emphasis 0.97 (the first sample against itself), povey window; |DFT₅₁₂|²;
80 kaldi-scale mel filters (20 Hz – 8 kHz, triangular in mel space); natural log floored at 1.19e-7; then per mel
bin, over the utterance's frames, (x − mean) / sqrt(var(ddof=1) + 1e-7).

Everything before the square is linear in the frame, so the kernel folds ×32768, DC removal, pre-emphasis and the
window into the DFT matrix and runs each block of frames as two matmuls (real, imaginary) on the tensor cores in
3×TF32, which keeps fp32 accuracy; the power spectrum's matmul with the mel filters and the log follow in
registers. DFT bins 0 and 256 carry no mel weight (the filters start at 20 Hz and end at 8 kHz), so 256 bins,
1 … 255 and a zero, are computed. The per-utterance normalisation is a few batched tensor ops over (B, F, 80).

Reading order: reference → kernel → launcher → torch.library op → dispatch.
"""

import functools
from typing import Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from ._backend import triton_interpreter_enabled, use_triton

SAMPLE_RATE = 16000
FRAME_LENGTH = 400
HOP_LENGTH = 160
FFT_LENGTH = 512
NUM_MEL_BINS = 80
MEL_FLOOR = 1.192092955078125e-07
PREEMPHASIS = 0.97
INT16_SCALE = 32768.0
VARIANCE_EPS = 1e-7
_NUM_BINS = 256  # DFT bins 0 … 255; bin 256 (8 kHz) has zero weight in every filter


def num_frames(num_samples):
    """Frames of a clip of ``num_samples`` (≥ 400) samples; works on ints and integer tensors."""
    return 1 + (num_samples - FRAME_LENGTH) // HOP_LENGTH


# ------------------------------------------------------------------------------------- constants (numpy, fp64)
@functools.lru_cache(maxsize=None)
def povey_window() -> np.ndarray:
    return np.power(np.hanning(FRAME_LENGTH), 0.85)


@functools.lru_cache(maxsize=None)
def kaldi_mel_filters() -> np.ndarray:
    """(257, 80): triangular filters in kaldi mel space over the 257 one-sided DFT bins, 20 Hz – 8 kHz."""

    def to_mel(hz):
        return 1127.0 * np.log(1.0 + hz / 700.0)

    mel_points = np.linspace(to_mel(20.0), to_mel(SAMPLE_RATE / 2), NUM_MEL_BINS + 2)
    bin_mels = to_mel(SAMPLE_RATE / FFT_LENGTH * np.arange(FFT_LENGTH // 2 + 1))
    slopes = mel_points[None, :] - bin_mels[:, None]
    gaps = np.diff(mel_points)
    down = -slopes[:, :-2] / gaps[:-1]
    up = slopes[:, 2:] / gaps[1:]
    return np.maximum(0.0, np.minimum(down, up))


@functools.lru_cache(maxsize=None)
def _folded_dft_matrices() -> Tuple[np.ndarray, np.ndarray]:
    """(400, 256) real and imaginary DFT matrices with ×32768, DC removal, pre-emphasis and the window folded in:
    ``frame @ real`` is Re(DFT₅₁₂(window · preemphasis(frame·32768 − mean)))."""
    n = FRAME_LENGTH
    remove_dc = np.eye(n) - 1.0 / n
    preemphasis = np.eye(n)  # column j of the output = x[j] − 0.97·x[j−1]; x[0]·(1 − 0.97)
    preemphasis[np.arange(1, n), np.arange(1, n)] = 1.0
    preemphasis[np.arange(0, n - 1), np.arange(1, n)] = -PREEMPHASIS
    preemphasis[0, 0] = 1.0 - PREEMPHASIS
    linear = INT16_SCALE * remove_dc @ preemphasis @ np.diag(povey_window())
    angles = 2 * np.pi * np.outer(np.arange(n), np.arange(_NUM_BINS)) / FFT_LENGTH
    return linear @ np.cos(angles), linear @ -np.sin(angles)


@functools.lru_cache(maxsize=None)
def _device_constants(device: torch.device, padded_rows: int):
    real, imag = _folded_dft_matrices()
    dft = np.zeros((2, padded_rows, _NUM_BINS))
    dft[0, :FRAME_LENGTH], dft[1, :FRAME_LENGTH] = real, imag
    mel = np.zeros((_NUM_BINS, 128))
    mel[:, :NUM_MEL_BINS] = kaldi_mel_filters()[:_NUM_BINS]
    as_tensor = functools.partial(torch.tensor, dtype=torch.float32, device=device)
    return as_tensor(dft), as_tensor(mel)


# ----------------------------------------------------------------------------------------------- reference
def normalize_per_mel_bin(log_mel, frame_counts):
    """(x − mean) / sqrt(var(ddof=1) + 1e-7) per clip and mel bin over the clip's frames; padded frames → 0.

    A clip of one frame has no variance (transformers returns NaN): its features are defined as 0 (x − mean = 0).
    """
    frames = log_mel.shape[1]
    valid = (torch.arange(frames, device=log_mel.device)[None, :] < frame_counts[:, None])[..., None]
    counts = frame_counts.to(log_mel.dtype)[:, None, None]
    mean = (log_mel * valid).sum(1, keepdim=True) / counts
    centred = (log_mel - mean) * valid
    variance = centred.square().sum(1, keepdim=True) / (counts - 1).clamp_min(1)
    return centred / torch.sqrt(variance + VARIANCE_EPS)


def log_mel_fbank_reference(waveforms, lengths):
    """PyTorch reference (the CPU path and the oracle): the steps as transformers does them, in fp64, clip by clip
    over its valid frames (vectorised across frames; no work on padding).

    waveforms: (B, N) float, right-padded; lengths: (B,) integer sample counts in [400, N].
    Returns (B, 1 + (N − 400) // 160, 80) float32, normalised; frames past a clip's end are 0.
    """
    batch, total = waveforms.shape
    frame_counts = num_frames(lengths.to(torch.int64).cpu())
    out = torch.zeros(batch, int(num_frames(total)), NUM_MEL_BINS, dtype=torch.float64)
    window = torch.from_numpy(povey_window())
    filters = torch.from_numpy(kaldi_mel_filters())
    for i, count in enumerate(frame_counts.tolist()):
        used = FRAME_LENGTH + HOP_LENGTH * (count - 1)
        frames = (waveforms[i, :used].detach().cpu().double() * INT16_SCALE).unfold(0, FRAME_LENGTH, HOP_LENGTH)
        frames = frames - frames.mean(-1, keepdim=True)
        frames = torch.cat([frames[:, :1] * (1 - PREEMPHASIS), frames[:, 1:] - PREEMPHASIS * frames[:, :-1]], dim=-1)
        spectrum = torch.fft.rfft(frames * window, n=FFT_LENGTH)
        power = spectrum.real.square() + spectrum.imag.square()
        out[i, :count] = (power @ filters).clamp_min(MEL_FLOOR).log()
    # transformers casts the log-mel to float32 before normalising
    features = normalize_per_mel_bin(out.float().double(), frame_counts).float()
    return features.to(waveforms.device)


# -------------------------------------------------------------------------------------------------- kernel
@triton.jit
def _log_mel_kernel(
    wave_ptr, lengths_ptr, dft_ptr, mel_ptr, out_ptr,
    stride_wb, stride_ob, stride_of, max_frames,
    FRAME: tl.constexpr, HOP: tl.constexpr, FRAME_PADDED: tl.constexpr, NUM_BINS: tl.constexpr,
    NUM_MEL: tl.constexpr, BLOCK_MEL: tl.constexpr, MEL_FLOOR_VALUE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    block_f = tl.program_id(0)
    b = tl.program_id(1)
    clip_frames = (tl.load(lengths_ptr + b).to(tl.int32) - FRAME) // HOP + 1
    offs_f = block_f * BLOCK_F + tl.arange(0, BLOCK_F)
    frame_valid = offs_f < clip_frames
    offs_bin = tl.arange(0, NUM_BINS)
    wave = wave_ptr + b.to(tl.int64) * stride_wb

    real = tl.zeros([BLOCK_F, NUM_BINS], dtype=tl.float32)
    imag = tl.zeros([BLOCK_F, NUM_BINS], dtype=tl.float32)
    for k0 in tl.static_range(0, FRAME_PADDED, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        samples = tl.load(wave + offs_f[:, None].to(tl.int64) * HOP + offs_k[None, :],
                          mask=frame_valid[:, None] & (offs_k[None, :] < FRAME), other=0.0).to(tl.float32)
        # rows past the frame length are zero in the matrices, so the padded K chunk adds nothing
        dft_rows = dft_ptr + offs_k[:, None] * NUM_BINS + offs_bin[None, :]
        real = tl.dot(samples, tl.load(dft_rows), real, input_precision=DOT_PRECISION)
        imag = tl.dot(samples, tl.load(dft_rows + FRAME_PADDED * NUM_BINS), imag, input_precision=DOT_PRECISION)
    power = real * real + imag * imag
    offs_mel = tl.arange(0, BLOCK_MEL)
    filters = tl.load(mel_ptr + offs_bin[:, None] * BLOCK_MEL + offs_mel[None, :])
    mel = tl.dot(power, filters, input_precision=DOT_PRECISION)
    log_mel = tl.log(tl.maximum(mel, MEL_FLOOR_VALUE))
    log_mel = tl.where(frame_valid[:, None], log_mel, 0.0)
    out = out_ptr + b.to(tl.int64) * stride_ob + offs_f[:, None].to(tl.int64) * stride_of + offs_mel[None, :]
    tl.store(out, log_mel, mask=(offs_f[:, None] < max_frames) & (offs_mel[None, :] < NUM_MEL))


# ------------------------------------------------------------------------------------------------ launcher
def _launch_log_mel(waveforms, lengths, block_f=None):
    """Unnormalised log-mel (B, F, 80) fp32 of every frame of every clip in one launch; frames past a clip's end 0."""
    batch, total = waveforms.shape
    frames = int(num_frames(total))
    block_k = 16 if triton_interpreter_enabled() else 32
    frame_padded = triton.cdiv(FRAME_LENGTH, block_k) * block_k
    dft, mel = _device_constants(waveforms.device, frame_padded)
    if block_f is None:
        block_f = 16 if triton_interpreter_enabled() else 32
    out = torch.empty(batch, frames, NUM_MEL_BINS, device=waveforms.device, dtype=torch.float32)
    if waveforms.stride(1) != 1:
        waveforms = waveforms.contiguous()
    grid = (triton.cdiv(frames, block_f), batch)
    _log_mel_kernel[grid](
        waveforms, lengths, dft, mel, out,
        waveforms.stride(0), out.stride(0), out.stride(1), frames,
        FRAME=FRAME_LENGTH, HOP=HOP_LENGTH, FRAME_PADDED=frame_padded, NUM_BINS=_NUM_BINS,
        NUM_MEL=NUM_MEL_BINS, BLOCK_MEL=128, MEL_FLOOR_VALUE=MEL_FLOOR,
        # 3×TF32 on the tensor cores keeps fp32 accuracy; the interpreter computes in plain fp32 anyway
        DOT_PRECISION="ieee" if triton_interpreter_enabled() else "tf32x3",
        BLOCK_F=block_f, BLOCK_K=block_k, num_warps=8,
    )
    return out


# ---------------------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("w2vbert_fast::log_mel_fbank", mutates_args=())
def _log_mel_fbank_op(waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    log_mel = _launch_log_mel(waveforms, lengths)
    return normalize_per_mel_bin(log_mel, num_frames(lengths.to(torch.int64)))


@_log_mel_fbank_op.register_fake
def _(waveforms, lengths):
    return waveforms.new_empty(waveforms.shape[0], int(num_frames(waveforms.shape[1])), NUM_MEL_BINS,
                               dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ dispatch
def log_mel_fbank(waveforms, lengths=None):
    """Normalised log-mel features of a right-padded batch of 16 kHz clips, as SeamlessM4TFeatureExtractor.

    waveforms: (B, N) float tensor of samples in [-1, 1] (the extractor's input scale), right-padded;
    lengths: optional (B,) integer sample counts, each in [400, N] (default: all N).
    Returns (B, 1 + (N − 400) // 160, 80) float32: per clip, its 1 + (length − 400) // 160 frames normalised per mel
    bin, zeros after them. A one-frame clip (400–559 samples) gets zeros (its variance is undefined).
    """
    if not isinstance(waveforms, torch.Tensor) or waveforms.dim() != 2:
        shape = tuple(waveforms.shape) if isinstance(waveforms, torch.Tensor) else type(waveforms).__name__
        raise ValueError(f"waveforms must be a (batch, samples) tensor, got {shape}")
    if not waveforms.dtype.is_floating_point:
        raise ValueError(f"waveforms must be a floating-point tensor, got {waveforms.dtype}")
    batch, total = waveforms.shape
    if total < FRAME_LENGTH:
        raise ValueError(f"waveforms must have at least {FRAME_LENGTH} samples (one frame), got {total}")
    if lengths is None:
        lengths = torch.full((batch,), total, dtype=torch.int64, device=waveforms.device)
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch:
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a (batch,) = ({batch},) integer tensor, got {shape}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if batch and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < FRAME_LENGTH or high > total:
            raise ValueError(f"lengths must lie in [{FRAME_LENGTH}, {total}] samples, got [{low}, {high}]")
    lengths = lengths.to(waveforms.device)
    if use_triton(waveforms) and batch:
        return _log_mel_fbank_op(waveforms.float(), lengths.to(torch.int32))
    return log_mel_fbank_reference(waveforms, lengths)
