"""Kaldi-style log-mel filterbank features, normalised per utterance: the numbers of transformers'
``SeamlessM4TFeatureExtractor`` before its padding and stride-2 stacking (those are in ``features.py``).

Per utterance of n samples: × 32768; frames of 400 samples every 160 (no centring, 1 + (n − 400) // 160 of
them); per frame DC removal, pre-emphasis 0.97 (the first sample against itself), povey window; |DFT₅₁₂|²;
80 kaldi-scale mel filters (20 Hz – 8 kHz, triangular in mel space); natural log floored at 1.19e-7; then per mel
bin, over the utterance's frames, (x − mean) / sqrt(var(ddof=1) + 1e-7).

Precision decides the design. transformers computes the DFT in fp64, and clean synthetic audio (a chirp, a tone
with no noise floor) has mel bins 10⁻¹³ below the peak power: any fp32 DFT, as a matmul (3×TF32 or plain fp32
FMA) or an FFT, makes a rounding error of ~1e-7 of the frame's amplitude, as large as those bins themselves, so
their log-mel, and after normalisation the features, land far outside the 1e-3 tolerance. An fp64 DFT as a matmul costs ~410 kFLOP a frame, the
whole fp64 CUDA-core budget of an H100 at 200 hours of audio a second; an fp64 FFT costs ~12 kFLOP. So the GPU
path is two Triton kernels around cuFFT: one launch frames the whole padded batch (×32768, DC removal,
pre-emphasis, window, in fp64, zero-padded to 512), cuFFT takes the fp64 real FFT, and a second launch takes
|X|² (bins 0 … 255: bin 256, 8 kHz, has zero weight in every filter), the mel matmul (positive terms, so fp32 is
exact enough) and the floored log. The per-utterance normalisation is a few batched tensor ops over (B, F, 80).

Reading order: reference → kernel → launcher → torch.library op → dispatch.
"""

import functools
from typing import Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from ._backend import check_lengths, triton_interpreter_enabled, use_triton

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
def _device_constants(device: torch.device):
    window = torch.tensor(povey_window(), dtype=torch.float64, device=device)
    mel = np.zeros((_NUM_BINS, 128))
    mel[:, :NUM_MEL_BINS] = kaldi_mel_filters()[:_NUM_BINS]
    return window, torch.tensor(mel, dtype=torch.float32, device=device)


# ----------------------------------------------------------------------------------------------- reference
def normalize_per_mel_bin(log_mel, frame_counts):
    """(x − mean) / sqrt(var(ddof=1) + 1e-7) per clip and mel bin over the clip's frames, in log_mel's dtype (fp32,
    as transformers); ``log_mel`` must be 0 on padded frames, which stay 0.

    A clip of one frame has no variance (transformers returns NaN): its features are defined as 0 (x − mean = 0).
    """
    frames = log_mel.shape[1]
    valid = (torch.arange(frames, device=log_mel.device)[None, :] < frame_counts[:, None])[..., None]
    counts = frame_counts.to(log_mel.dtype)[:, None, None]
    mean = log_mel.sum(1, keepdim=True) / counts
    centred = (log_mel - mean).mul_(valid)
    variance = centred.square().sum(1, keepdim=True) / (counts - 1).clamp_min(1)
    return centred.div_(variance.add_(VARIANCE_EPS).sqrt_())


@functools.lru_cache(maxsize=None)
def _interleaved_mel_filters() -> torch.Tensor:
    """(514, 80): the filters repeated for the real and imaginary part of each bin, so the power spectrum and
    the mel sum are one square and one matmul over the FFT output viewed as reals."""
    return torch.from_numpy(np.repeat(kaldi_mel_filters(), 2, axis=0)).float()


def log_mel_reference(waveforms, lengths):
    """Unnormalised log-mel (B, 1 + (N − 400) // 160, 80) in fp64; frames past a clip's end are 0.

    The steps transformers runs per frame, in fp64, as a dozen whole-batch tensor ops: the clips are laid end to
    end, each starting at a multiple of the hop, so every frame of every clip is a row of one strided view (the
    few rows straddling two clips are computed and dropped). Pre-emphasis runs once over that buffer; it is
    linear, so a frame's DC removal becomes − 0.03·mean·window, with the means from sums of 80-sample blocks, and
    each frame's first sample is redone against itself. ×32768 is folded into the window. Then one real FFT of all
    frames (pre-padded to 512: asking torch to pad is 6× slower), |X|², the mel sum and the log.
    """
    batch, total = waveforms.shape
    counts = num_frames(lengths.to(torch.int64).cpu())
    sizes = lengths.to(torch.int64).cpu().tolist()
    regions = [-(-n // HOP_LENGTH) * HOP_LENGTH for n in sizes]
    offsets = [0]
    for region in regions[:-1]:
        offsets.append(offsets[-1] + region)
    signal = torch.zeros(offsets[-1] + regions[-1] + FRAME_LENGTH, dtype=torch.float64)
    source = waveforms.detach().cpu()
    for i, (offset, n) in enumerate(zip(offsets, sizes)):
        signal[offset:offset + n] = source[i, :n]
    rows = (signal.shape[0] - FRAME_LENGTH) // HOP_LENGTH + 1

    window = torch.from_numpy(povey_window()) * INT16_SCALE
    emphasised = torch.empty_like(signal)
    emphasised[0] = signal[0]
    torch.sub(signal[1:], signal[:-1], alpha=PREEMPHASIS, out=emphasised[1:])
    framed = torch.empty(rows, FFT_LENGTH, dtype=torch.float64)
    framed[:, FRAME_LENGTH:].zero_()
    body = framed[:, :FRAME_LENGTH]
    torch.mul(emphasised.unfold(0, FRAME_LENGTH, HOP_LENGTH), window, out=body)
    body[:, 0] = (1 - PREEMPHASIS) * window[0] * signal[: rows * HOP_LENGTH : HOP_LENGTH]  # against itself
    # a frame (400 samples from a multiple of 160) is exactly five consecutive 80-sample blocks
    blocks = signal[: (signal.shape[0] // 80) * 80].view(-1, 80).sum(1)
    means = blocks.unfold(0, 5, 2)[:rows].sum(1) / FRAME_LENGTH
    body.addr_(means, window, alpha=-(1 - PREEMPHASIS))

    spectrum = torch.fft.rfft(framed, dim=-1)
    power = torch.view_as_real(spectrum).reshape(rows, -1).square_()
    # the mel sum of positive terms loses nothing in fp32 (~1e-7 relative) and is 3× faster than in fp64
    mel = power.float() @ _interleaved_mel_filters()
    keep = torch.cat([torch.arange(count) + offset // HOP_LENGTH for offset, count in zip(offsets, counts.tolist())])
    max_frames = int(num_frames(total))
    out = torch.zeros(batch, max_frames, NUM_MEL_BINS, dtype=torch.float64)
    out[torch.arange(max_frames)[None, :] < counts[:, None]] = mel[keep].double().clamp_min_(MEL_FLOOR).log_()
    return out


def log_mel_fbank_reference(waveforms, lengths):
    """PyTorch reference (the CPU path and the oracle). waveforms: (B, N) float, right-padded; lengths: (B,) integer
    sample counts in [400, N]. Returns (B, 1 + (N − 400) // 160, 80) float32, normalised; zeros past a clip's end."""
    # transformers casts the log-mel to float32 and normalises in float32
    log_mel = log_mel_reference(waveforms, lengths).float()
    return normalize_per_mel_bin(log_mel, num_frames(lengths.to(torch.int64).cpu())).to(waveforms.device)


# ------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _frames_kernel(
    wave_ptr, lengths_ptr, window_ptr, frames_ptr, stride_wb, stride_fb, stride_ff, max_frames,
    FRAME: tl.constexpr, HOP: tl.constexpr, FFT: tl.constexpr, SCALE: tl.constexpr, PREEMPHASIS_COEF: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """fp64 frames (B, F, 512) ready for the FFT: ×32768, − frame mean, pre-emphasis, window, zeros after 400 samples
    and for frames past a clip's end."""
    b = tl.program_id(1)
    clip_frames = (tl.load(lengths_ptr + b).to(tl.int32) - FRAME) // HOP + 1
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_n = tl.arange(0, FFT)
    in_frame = offs_n < FRAME
    frame_valid = offs_f < clip_frames
    mask = frame_valid[:, None] & in_frame[None, :]
    samples = wave_ptr + b.to(tl.int64) * stride_wb + offs_f[:, None].to(tl.int64) * HOP + offs_n[None, :]
    x = tl.load(samples, mask=mask, other=0.0).to(tl.float64) * SCALE
    # sample n - 1 of the frame; the first sample is pre-emphasised against itself
    previous = tl.load(samples - 1, mask=mask & (offs_n[None, :] > 0), other=0.0).to(tl.float64) * SCALE
    mean = tl.sum(x, 1) / FRAME
    centred = x - mean[:, None]
    previous = tl.where(offs_n[None, :] > 0, previous - mean[:, None], centred)
    window = tl.load(window_ptr + offs_n, mask=in_frame, other=0.0)
    y = tl.where(mask, (centred - PREEMPHASIS_COEF * previous) * window[None, :], 0.0)
    out = frames_ptr + b.to(tl.int64) * stride_fb + offs_f[:, None].to(tl.int64) * stride_ff + offs_n[None, :]
    tl.store(out, y, mask=offs_f[:, None] < max_frames)


@triton.jit
def _log_mel_kernel(
    spectrum_ptr, lengths_ptr, mel_ptr, out_ptr, stride_sb, stride_sf, stride_ob, stride_of, max_frames,
    FRAME: tl.constexpr, HOP: tl.constexpr, NUM_BINS: tl.constexpr, NUM_MEL: tl.constexpr, BLOCK_MEL: tl.constexpr,
    MEL_FLOOR_VALUE: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """log(max(|X|² @ filters, floor)) from the FFT's (B, F, 257, 2) fp64 output; frames past a clip's end → 0."""
    b = tl.program_id(1)
    clip_frames = (tl.load(lengths_ptr + b).to(tl.int32) - FRAME) // HOP + 1
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    frame_valid = offs_f < clip_frames
    offs_bin = tl.arange(0, NUM_BINS)
    bins = spectrum_ptr + b.to(tl.int64) * stride_sb + offs_f[:, None].to(tl.int64) * stride_sf + 2 * offs_bin[None, :]
    real = tl.load(bins, mask=frame_valid[:, None], other=0.0)
    imag = tl.load(bins + 1, mask=frame_valid[:, None], other=0.0)
    # a sum of positive terms: fp32 keeps ~1e-7 relative accuracy, and the fp32 FMA path is exact enough
    power = (real * real + imag * imag).to(tl.float32)
    offs_mel = tl.arange(0, BLOCK_MEL)
    filters = tl.load(mel_ptr + offs_bin[:, None] * BLOCK_MEL + offs_mel[None, :])
    mel = tl.dot(power, filters, input_precision="ieee")
    log_mel = tl.where(frame_valid[:, None], tl.log(tl.maximum(mel, MEL_FLOOR_VALUE)), 0.0)
    out = out_ptr + b.to(tl.int64) * stride_ob + offs_f[:, None].to(tl.int64) * stride_of + offs_mel[None, :]
    tl.store(out, log_mel, mask=(offs_f[:, None] < max_frames) & (offs_mel[None, :] < NUM_MEL))


# ------------------------------------------------------------------------------------------------ launcher
def _launch_log_mel(waveforms, lengths, block_f=None, out=None):
    """Unnormalised log-mel (B, F, 80) fp32 of every frame of every clip: two launches around one fp64 FFT.
    ``out``: a preallocated buffer (tests pass one filled with NaN); ``block_f``: frames per program."""
    batch, total = waveforms.shape
    frames = int(num_frames(total))
    window, mel = _device_constants(waveforms.device)
    if waveforms.stride(1) != 1:
        waveforms = waveforms.contiguous()
    if block_f is None:
        block_f = 8 if triton_interpreter_enabled() else 16
    grid = (triton.cdiv(frames, block_f), batch)
    framed = torch.empty(batch, frames, FFT_LENGTH, device=waveforms.device, dtype=torch.float64)
    _frames_kernel[grid](
        waveforms, lengths, window, framed, waveforms.stride(0), framed.stride(0), framed.stride(1), frames,
        FRAME=FRAME_LENGTH, HOP=HOP_LENGTH, FFT=FFT_LENGTH, SCALE=INT16_SCALE, PREEMPHASIS_COEF=PREEMPHASIS,
        BLOCK_F=block_f, num_warps=4,
    )
    spectrum = torch.view_as_real(torch.fft.rfft(framed, dim=-1))  # (B, F, 257, 2) fp64
    del framed
    if out is None:
        out = torch.empty(batch, frames, NUM_MEL_BINS, device=waveforms.device, dtype=torch.float32)
    _log_mel_kernel[grid](
        spectrum, lengths, mel, out, spectrum.stride(0), spectrum.stride(1), out.stride(0), out.stride(1), frames,
        FRAME=FRAME_LENGTH, HOP=HOP_LENGTH, NUM_BINS=_NUM_BINS, NUM_MEL=NUM_MEL_BINS, BLOCK_MEL=128,
        MEL_FLOOR_VALUE=MEL_FLOOR, BLOCK_F=block_f, num_warps=4,
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
    check_lengths(lengths, batch)
    if batch and not torch.compiler.is_compiling():
        low, high = int(lengths.min()), int(lengths.max())
        if low < FRAME_LENGTH or high > total:
            raise ValueError(f"lengths must lie in [{FRAME_LENGTH}, {total}] samples, got [{low}, {high}]")
    lengths = lengths.to(waveforms.device)
    if use_triton(waveforms) and batch:
        return _log_mel_fbank_op(waveforms.float(), lengths.to(torch.int32))
    return log_mel_fbank_reference(waveforms, lengths)
