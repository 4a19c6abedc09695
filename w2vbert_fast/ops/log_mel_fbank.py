"""Kaldi-style log-mel filterbank features, normalised per utterance: the numbers of transformers'
``SeamlessM4TFeatureExtractor`` before its padding and stride-2 stacking (those are in ``features.py``).

Per utterance of n samples: × 32768; frames of 400 samples every 160 (no centring, 1 + (n − 400) // 160 of
them); per frame DC removal, pre-emphasis 0.97 (the first sample against itself), povey window; |DFT₅₁₂|²;
80 kaldi-scale mel filters (20 Hz – 8 kHz, triangular in mel space); natural log floored at 1.19e-7; then per mel
bin, over the utterance's frames, (x − mean) / sqrt(var(ddof=1) + 1e-7).

Precision decides the design. transformers computes the DFT in fp64, and clean synthetic audio (a chirp, a tone
with no noise floor) has mel bins 10⁻¹³ below the peak power: any fp32 DFT, as a matmul (3×TF32 or plain fp32
FMA) or an FFT, makes a rounding error of ~1e-7 of the frame's amplitude, as large as those bins themselves, so
their log-mel, and after normalisation the features, land far outside the 1e-3 tolerance. An fp64 DFT as a matmul
costs ~410 kFLOP a frame, the whole fp64 CUDA-core budget of an H100 at 200 hours of audio a second; an fp64 FFT
costs ~12 kFLOP. So the GPU path is two Triton kernels around cuFFT: one launch frames the whole padded batch
(×32768, DC removal, pre-emphasis, window, in fp64, zero-padded to 512), cuFFT takes the fp64 real FFT, and a second
launch rounds the spectrum to fp32 (as transformers' complex64) and takes |X|² (bins 0 … 255: bin 256, 8 kHz, has
zero weight in every filter), the mel matmul (positive terms, so fp32 is exact enough) and the floored log. fp64
arithmetic runs in the framing kernel only (the compile check checks the machine code for it). The per-utterance
normalisation is a few batched tensor ops over (B, F, 80).

Three implementations (see ``log_mel_fbank``): the kernels; the fast CPU path (``auto`` on CPU tensors), the same
arithmetic over chunks of 64 frames of one clip on the calling thread (numpy: fp64 framing, pocketfft fp64 FFT, the
mel sum as five banded blocks, normalisation in place per clip; no parallel region to stall on a shared CPU)
(``log_mel_cpu``); and the literal reference, transformers' steps one clip at a time (``log_mel_reference``), the
tests' oracle (``W2VBERT_FAST_BACKEND=torch``).

Reading order: reference → fast CPU path → kernels → configs → launcher → torch.library op → dispatch → LAUNCH_META.
"""

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from ._backend import FAST, TRITON, KernelLaunch, check_lengths, dispatch, triton_interpreter_enabled, values_checkable

SAMPLE_RATE = 16000
FRAME_LENGTH = 400
HOP_LENGTH = 160
FFT_LENGTH = 512
NUM_MEL_BINS = 80
MEL_FLOOR = 1.192092955078125e-07
PREEMPHASIS = 0.97
INT16_SCALE = 32768.0
VARIANCE_EPS = 1e-7
_CHUNK_ROWS = 64  # frames per step of the CPU path (its fp64 buffers stay in the cache; see log_mel_cpu)
_NUM_BINS = 256  # DFT bins 0 … 255; bin 256 (8 kHz) has zero weight in every filter


def num_frames(num_samples):
    """Frames of a clip of ``num_samples`` (≥ 400) samples; works on ints and integer tensors."""
    return 1 + (num_samples - FRAME_LENGTH) // HOP_LENGTH


# ----------------------------------------------------------------------------------------------- reference
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


def log_mel_reference(waveforms, lengths):
    """Log-mel (B, 1 + (N − 400) // 160, 80) float32 of a right-padded batch, unnormalised; frames past a clip's end
    are 0. transformers' ``spectrogram(waveform × 32768, povey window, frame_length=400, hop_length=160,
    fft_length=512, power=2.0, center=False, preemphasis=0.97, mel_filters=kaldi, log_mel="log",
    mel_floor=1.192092955078125e-07, remove_dc_offset=True)`` step by step, one clip at a time, in fp64, with its
    one rounding: the spectrum is stored as complex64."""
    batch, total = waveforms.shape
    out = torch.zeros(batch, int(num_frames(total)), NUM_MEL_BINS, dtype=torch.float32)
    window = torch.from_numpy(povey_window())
    mel_filters = torch.from_numpy(kaldi_mel_filters())
    for clip, n in enumerate(lengths.tolist()):
        frames = (waveforms[clip, :n].detach().cpu().double() * INT16_SCALE).unfold(0, FRAME_LENGTH, HOP_LENGTH)
        frames = frames - frames.mean(1, keepdim=True)
        frames = torch.cat([frames[:, :1] * (1 - PREEMPHASIS), frames[:, 1:] - PREEMPHASIS * frames[:, :-1]], 1)
        spectrum = torch.fft.rfft(frames * window, n=FFT_LENGTH).to(torch.complex64)
        power = spectrum.to(torch.complex128).abs() ** 2
        out[clip, : frames.shape[0]] = torch.log(torch.clamp(power @ mel_filters, min=MEL_FLOOR)).float()
    return out


def log_mel_fbank_reference(waveforms, lengths):
    """The literal reference, the tests' oracle. waveforms: (B, N) float, right-padded; lengths: (B,) integer sample
    counts in [400, N]. Returns (B, 1 + (N − 400) // 160, 80) float32 on waveforms' device: :func:`log_mel_reference`
    normalised per clip and mel bin in fp32 as transformers does, (x − mean) / sqrt(var(ddof=1) + 1e-7); zeros past
    a clip's end. A clip of one frame has no variance (transformers returns NaN): its features are defined as 0."""
    log_mel = log_mel_reference(waveforms, lengths)
    for clip, count in enumerate(num_frames(lengths.to(torch.int64)).tolist()):
        x = log_mel[clip, :count]
        if count < 2:
            x.zero_()
        else:
            log_mel[clip, :count] = (x - x.mean(0)) / torch.sqrt(x.var(0, correction=1) + VARIANCE_EPS)
    return log_mel.to(waveforms.device)


# ------------------------------------------------------------------------------------------- fast CPU path
@functools.lru_cache(maxsize=None)
def _mel_filter_blocks(groups=5):
    """The interleaved filters cut into ``groups`` blocks of consecutive mel bins, each with only the rows (DFT bins
    × re/im) where one of its filters is non-zero: (low, high, mel_low, mel_high, (high − low, mel_high − mel_low))
    float32 numpy array)."""
    filters, blocks, width = _interleaved_mel_filters(), [], NUM_MEL_BINS // groups
    for mel_low in range(0, NUM_MEL_BINS, width):
        rows = np.flatnonzero((filters[:, mel_low:mel_low + width] != 0).any(1))
        low, high = int(rows[0]), int(rows[-1]) + 1
        blocks.append((low, high, mel_low, mel_low + width,
                       np.ascontiguousarray(filters[low:high, mel_low:mel_low + width])))
    return tuple(blocks)


@functools.lru_cache(maxsize=None)
def _scaled_window() -> np.ndarray:
    """The povey window × 32768 (the int16 scale, folded in), fp64."""
    return povey_window() * INT16_SCALE


@functools.lru_cache(maxsize=None)
def _interleaved_mel_filters() -> np.ndarray:
    """(514, 80) float32: the filters repeated for the real and imaginary part of each bin, so the power spectrum
    and the mel sum are one square and one matmul over the FFT output viewed as reals."""
    return np.repeat(kaldi_mel_filters(), 2, axis=0).astype(np.float32)


def log_mel_cpu(waveforms, lengths, normalize=False):
    """Log-mel (B, 1 + (N − 400) // 160, 80) float32 of a right-padded batch, normalised per clip and mel bin when
    ``normalize`` (as :func:`log_mel_fbank_reference`); frames past a clip's end are 0.

    The steps transformers runs per frame, over chunks of up to 64 frames of one clip, in fp64 (the fp32 samples
    are exact in it): the chunk's samples are copied to fp64 once; pre-emphasis runs over them once (it is linear:
    a frame's DC removal becomes − 0.03·mean, with the frame sums from 80-sample blocks, a frame being five of
    them; each frame's first sample is redone against itself, 0.03·(x₀ − mean)); the frames are a strided view of
    that, written into a buffer pre-padded to 512 and × the window (×32768 folded in); one fp64 real FFT
    (numpy's pocketfft, the FFT transformers' extractor runs); |X|² and the mel sum. Chunks keep every fp64 buffer
    in the cache and allocate next to nothing once: on a small VM, the page faults of whole-batch fp64 buffers cost
    as much as the arithmetic.

    Every step runs on the calling thread, whatever torch's thread count: numpy's element-wise operations and FFT
    never start threads, and each mel GEMM (64 frames × at most 226 reals × 16 bins, 0.23 M multiply-adds) is below
    the size at which OpenBLAS starts its threads (0.26 M). The whole batch is a few ms of work cut into hundreds of
    small steps: run as PyTorch ops with several threads, each step was a parallel region, and on a shared CPU each
    region waits for a descheduled worker thread, up to a scheduler time slice (measured, before and after, quiet
    and with every core busy: ``benchmarks/bench_cpu_contention.py``, README "On a CPU").

    Precision as transformers: it frames and transforms in fp64 but stores the spectrum as complex64, so rounding the
    FFT output to fp32 first loses nothing; |X|² and the mel sum of positive terms in fp32 keep ~1e-7 relative
    accuracy, as does the log (transformers casts the log-mel to fp32 anyway). Only the framing and the FFT need
    fp64 (an fp32 FFT loses the weak bins of clean synthetic audio, see the module docstring).
    """
    batch, total = waveforms.shape
    sizes = lengths.to(torch.int64).cpu().tolist()
    source = waveforms.detach().cpu().float().numpy()
    max_frames = int(num_frames(total))
    out = np.empty((batch, max_frames, NUM_MEL_BINS), dtype=np.float32)
    window = _scaled_window()  # fp64
    chunk = min(max_frames, _CHUNK_ROWS)
    span = (chunk - 1) * HOP_LENGTH + FRAME_LENGTH
    segment = np.empty(span)  # fp64
    emphasised = np.empty(span)
    framed = np.zeros((chunk, FFT_LENGTH))  # columns 400 … 511 stay 0: the FFT's padding
    spectrum = np.empty((chunk, FFT_LENGTH // 2 + 1), dtype=np.complex128)
    power = np.empty((chunk, 2 * (FFT_LENGTH // 2 + 1)), dtype=np.float32)
    block_sums = np.empty(span // 80)  # sums of 80-sample blocks, a frame being 5 of them
    frame_sums = np.empty(chunk)
    # strided views made once: row f of all_frames is emphasised[160 f: 160 f + 400], of all_block_sums its 5 blocks
    step = emphasised.strides[0]
    all_frames = np.lib.stride_tricks.as_strided(emphasised, (chunk, FRAME_LENGTH), (HOP_LENGTH * step, step))
    all_block_sums = np.lib.stride_tricks.as_strided(block_sums, (chunk, 5), (2 * step, step))
    dc_weight = (1 - PREEMPHASIS) / FRAME_LENGTH
    for clip, n in enumerate(sizes):
        count = 1 + (n - FRAME_LENGTH) // HOP_LENGTH
        for start in range(0, count, chunk):
            size = min(chunk, count - start)
            length = (size - 1) * HOP_LENGTH + FRAME_LENGTH
            x = segment[:length]
            x[:] = source[clip, start * HOP_LENGTH: start * HOP_LENGTH + length]  # exact
            e = emphasised[:length]
            np.multiply(x[:-1], -PREEMPHASIS, out=e[1:])
            e[1:] += x[1:]  # e[0] is unused: column 0 is set below
            np.sum(x.reshape(-1, 80), axis=1, out=block_sums[: length // 80])
            sums = np.sum(all_block_sums[:size], axis=1, out=frame_sums[:size])
            body = framed[:size, :FRAME_LENGTH]
            np.subtract(all_frames[:size], (dc_weight * sums)[:, None], out=body)
            # each frame's first sample against itself: 0.03 · (x₀ − mean)
            body[:, 0] = (1 - PREEMPHASIS) * (x[: size * HOP_LENGTH: HOP_LENGTH] - sums / FRAME_LENGTH)
            body *= window
            spec = _rfft(framed[:size], spectrum[:size])
            squared = power[:size]
            squared[:] = spec.view(np.float64)  # rounded to fp32 first, as transformers' complex64 spectrum
            np.square(squared, out=squared)
            mel = out[clip, start:start + size]
            # the filter bank is banded: five (bins × 16 mel) blocks hold every non-zero weight, 1/5 of the work
            for low, high, mel_low, mel_high, block in _mel_filter_blocks():
                np.matmul(squared[:, low:high], block, out=mel[:, mel_low:mel_high])
        log_mel = out[clip, :count]
        np.log(np.maximum(log_mel, MEL_FLOOR, out=log_mel), out=log_mel)  # NaN stays NaN
        if normalize:
            _normalize_clip_(log_mel)
        out[clip, count:] = 0.0
    return torch.from_numpy(out)


# numpy ≥ 2.0 writes an FFT into a given buffer; older numpy allocates it
_RFFT_TAKES_OUT = np.lib.NumpyVersion(np.__version__) >= "2.0.0"


def _rfft(frames, out):
    """The fp64 real FFT of each row of ``frames`` (… , 512) → (…, 257) complex128, into ``out`` where numpy can."""
    if _RFFT_TAKES_OUT:
        return np.fft.rfft(frames, axis=-1, out=out)
    return np.fft.rfft(frames, axis=-1)


def _normalize_clip_(log_mel):
    """In place, one clip's (frames, 80) numpy array: as :func:`log_mel_fbank_reference`, in fp32 like transformers,
    the sums over frames accumulated in fp64."""
    frames = log_mel.shape[0]
    log_mel -= log_mel.mean(0, dtype=np.float64).astype(np.float32)
    if frames < 2:  # one frame: no variance (transformers returns NaN); x − mean = 0 is our defined output
        log_mel[:] = 0.0
        return
    variance = (np.square(log_mel).sum(0, dtype=np.float64) / (frames - 1)).astype(np.float32)
    log_mel /= np.sqrt(variance + np.float32(VARIANCE_EPS))


def log_mel_fbank_cpu(waveforms, lengths, normalize=True):
    """The fast CPU path (``auto`` on CPU tensors): :func:`log_mel_fbank_reference`'s result (``normalize=False``:
    :func:`log_mel_reference`'s), from :func:`log_mel_cpu`, on waveforms' device."""
    # transformers casts the log-mel to float32 and normalises in float32
    return log_mel_cpu(waveforms, lengths, normalize=normalize).to(waveforms.device)


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
    # fp32 samples ×32768 are exact in fp64; the loads stay fp32 until the arithmetic (half the registers)
    x = tl.load(samples, mask=mask, other=0.0)
    previous = tl.load(samples - 1, mask=mask & (offs_n[None, :] > 0), other=0.0)
    mean = tl.sum(x.to(tl.float64), 1) * SCALE / FRAME
    # pre-emphasis of the centred frame: (x - mean) - c·(x₋₁ - mean), the first sample against itself
    emphasised = x.to(tl.float64) * SCALE - PREEMPHASIS_COEF * tl.where(
        offs_n[None, :] > 0, previous.to(tl.float64) * SCALE, x.to(tl.float64) * SCALE)
    window = tl.load(window_ptr + offs_n, mask=in_frame, other=0.0)
    y = tl.where(mask, (emphasised - (1.0 - PREEMPHASIS_COEF) * mean[:, None]) * window[None, :], 0.0)
    out = frames_ptr + b.to(tl.int64) * stride_fb + offs_f[:, None].to(tl.int64) * stride_ff + offs_n[None, :]
    tl.store(out, y, mask=offs_f[:, None] < max_frames)


@triton.jit
def _log_mel_kernel(
    spectrum_ptr, lengths_ptr, mel_ptr, out_ptr, stride_sb, stride_sf, stride_ob, stride_of, max_frames,
    FRAME: tl.constexpr, HOP: tl.constexpr, NUM_BINS: tl.constexpr, NUM_MEL: tl.constexpr, BLOCK_MEL: tl.constexpr,
    MEL_FLOOR_VALUE: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """log(max(|X|² @ filters, floor)) from the FFT's (B, F, 257, 2) fp64 output; frames past a clip's end → 0.

    The DFT bins are summed in chunks of BLOCK_K: only a (BLOCK_K, 128) slice of the filters is in shared memory at
    a time (the whole (256, 128) bank would be 128 KB, one block per SM)."""
    b = tl.program_id(1)
    clip_frames = (tl.load(lengths_ptr + b).to(tl.int32) - FRAME) // HOP + 1
    offs_f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    frame_valid = offs_f < clip_frames
    offs_mel = tl.arange(0, BLOCK_MEL)
    rows = spectrum_ptr + b.to(tl.int64) * stride_sb + offs_f[:, None].to(tl.int64) * stride_sf
    mel = tl.zeros([BLOCK_F, BLOCK_MEL], dtype=tl.float32)
    for k in range(0, NUM_BINS, BLOCK_K):
        offs_bin = k + tl.arange(0, BLOCK_K)
        bins = rows + 2 * offs_bin[None, :]
        # the spectrum rounded to fp32 first, then squared in fp32, as transformers (complex64 spectrum): a sum of
        # positive terms, so fp32 keeps ~1e-7 relative accuracy with no fp64 arithmetic here
        real = tl.load(bins, mask=frame_valid[:, None], other=0.0).to(tl.float32)
        imag = tl.load(bins + 1, mask=frame_valid[:, None], other=0.0).to(tl.float32)
        filters = tl.load(mel_ptr + offs_bin[:, None] * BLOCK_MEL + offs_mel[None, :])
        mel = tl.dot(real * real + imag * imag, filters, mel, input_precision="ieee")
    # NaN in (a NaN sample) stays NaN out, as in the reference (torch's clamp keeps NaN; tl.maximum would drop it)
    floored = tl.maximum(mel, MEL_FLOOR_VALUE, propagate_nan=tl.PropagateNan.ALL)
    log_mel = tl.where(frame_valid[:, None], tl.log(floored), 0.0)
    out = out_ptr + b.to(tl.int64) * stride_ob + offs_f[:, None].to(tl.int64) * stride_of + offs_mel[None, :]
    tl.store(out, log_mel, mask=(offs_f[:, None] < max_frames) & (offs_mel[None, :] < NUM_MEL))


# ------------------------------------------------------------------------------------------------- configs
# Launch configurations on a GPU (the compile check compiles exactly these; ptxas, triton 3.9).
# Framing: 4 frames × 512 per 8-warp program, 8 samples a thread: 57-60 registers on sm_75/80/86/89/90a, no spill,
# 32 warps resident per SM. (With 4 warps, 16 samples a thread, ptxas held sm_75/86/89 to 80 registers and spilled
# 4 B a thread; 16 frames a program needed 255 and spilled.) Log-mel: 32 frames a program, 32 bins a step, 8 warps:
# 93 / 80 registers (sm_90a / the others), 36 KB of shared memory (the whole filter bank at once asked for 144 KB,
# one block per SM, and spilled). The launcher runs the first of each list.
FRAMES_CONFIGS = [triton.Config({"BLOCK_F": 4}, num_warps=8)]
LOG_MEL_CONFIGS = [triton.Config({"BLOCK_F": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2)]
# Under the interpreter the cost is per program and per op: bigger blocks, fewer steps.
INTERPRETER_FRAMES_CONFIG = triton.Config({"BLOCK_F": 8}, num_warps=4)
INTERPRETER_LOG_MEL_CONFIG = triton.Config({"BLOCK_F": 16, "BLOCK_K": 128}, num_warps=4)


# ------------------------------------------------------------------------------------------------ launcher
@functools.lru_cache(maxsize=None)
def _device_constants(device: torch.device):
    window = torch.tensor(povey_window(), dtype=torch.float64, device=device)
    mel = np.zeros((_NUM_BINS, 128))
    mel[:, :NUM_MEL_BINS] = kaldi_mel_filters()[:_NUM_BINS]
    return window, torch.tensor(mel, dtype=torch.float32, device=device)


def _frame_buffer(waveforms):
    """(B, F, 512) fp64: the framing kernel's output, the FFT's input."""
    return torch.empty(waveforms.shape[0], int(num_frames(waveforms.shape[1])), FFT_LENGTH, device=waveforms.device,
                       dtype=torch.float64)


def _spectrum(framed):
    """(B, F, 257, 2) fp64: the one-sided DFT of every frame, as reals."""
    return torch.view_as_real(torch.fft.rfft(framed, dim=-1))


def _frames_args(waveforms, lengths, framed):
    return dict(
        wave_ptr=waveforms, lengths_ptr=lengths, window_ptr=_device_constants(waveforms.device)[0], frames_ptr=framed,
        stride_wb=waveforms.stride(0), stride_fb=framed.stride(0), stride_ff=framed.stride(1),
        max_frames=framed.shape[1], FRAME=FRAME_LENGTH, HOP=HOP_LENGTH, FFT=FFT_LENGTH, SCALE=INT16_SCALE,
        PREEMPHASIS_COEF=PREEMPHASIS,
    )


def _log_mel_args(spectrum, lengths, out):
    return dict(
        spectrum_ptr=spectrum, lengths_ptr=lengths, mel_ptr=_device_constants(spectrum.device)[1], out_ptr=out,
        stride_sb=spectrum.stride(0), stride_sf=spectrum.stride(1), stride_ob=out.stride(0), stride_of=out.stride(1),
        max_frames=out.shape[1], FRAME=FRAME_LENGTH, HOP=HOP_LENGTH, NUM_BINS=_NUM_BINS, NUM_MEL=NUM_MEL_BINS,
        BLOCK_MEL=128, MEL_FLOOR_VALUE=MEL_FLOOR,
    )


def _grid(batch, frames, config):
    # both kernels: BLOCK_F frames of one clip per program
    return triton.cdiv(frames, config.kwargs["BLOCK_F"]), batch


def _launch_log_mel(waveforms, lengths, frames_config=None, log_mel_config=None, out=None):
    """Unnormalised log-mel (B, F, 80) fp32 of every frame of every clip: two launches around one fp64 FFT.
    ``lengths``: int32, in [400, N]. ``out``: a preallocated buffer (tests pass one filled with NaN);
    ``frames_config``/``log_mel_config``: triton.Configs to force (default: the first of FRAMES_CONFIGS and
    LOG_MEL_CONFIGS on a GPU, the interpreter's under it)."""
    batch, total = waveforms.shape
    frames = int(num_frames(total))
    if waveforms.stride(1) != 1:
        waveforms = waveforms.contiguous()
    interpreted = triton_interpreter_enabled()
    frames_config = frames_config or (INTERPRETER_FRAMES_CONFIG if interpreted else FRAMES_CONFIGS[0])
    log_mel_config = log_mel_config or (INTERPRETER_LOG_MEL_CONFIG if interpreted else LOG_MEL_CONFIGS[0])
    framed = _frame_buffer(waveforms)
    _frames_kernel[_grid(batch, frames, frames_config)](**_frames_args(waveforms, lengths, framed),
                                                        **frames_config.all_kwargs())
    spectrum = _spectrum(framed)
    del framed
    if out is None:
        out = torch.empty(batch, frames, NUM_MEL_BINS, device=waveforms.device, dtype=torch.float32)
    _log_mel_kernel[_grid(batch, frames, log_mel_config)](**_log_mel_args(spectrum, lengths, out),
                                                          **log_mel_config.all_kwargs())
    return out


def normalize_per_mel_bin(log_mel, frame_counts):
    """(x − mean) / sqrt(var(ddof=1) + 1e-7) per clip and mel bin over the clip's frames, in log_mel's dtype (fp32,
    as transformers); ``log_mel`` must be 0 on padded frames, which stay 0.

    A clip of one frame has no variance (transformers returns NaN): its features are defined as 0 (x − mean = 0).
    """
    frames = log_mel.shape[1]
    valid = (torch.arange(frames, device=log_mel.device)[None, :] < frame_counts[:, None])[..., None]
    counts = frame_counts.to(log_mel.dtype)[:, None, None]
    mean = log_mel.sum(1, keepdim=True) / counts
    # selects, not products: the padding of a clip with a NaN sample stays 0 (its valid frames are NaN)
    centred = torch.where(valid, log_mel - mean, 0.0)
    variance = centred.square().sum(1, keepdim=True) / (counts - 1).clamp_min(1)
    return torch.where(valid, centred / variance.add_(VARIANCE_EPS).sqrt_(), 0.0)



# ---------------------------------------------------------------------------------------- torch.library op
@torch.library.custom_op("w2vbert_fast::log_mel_fbank", mutates_args=())
def _log_mel_fbank_op(waveforms: torch.Tensor, lengths: torch.Tensor, normalize: bool) -> torch.Tensor:
    log_mel = _launch_log_mel(waveforms, lengths)
    return normalize_per_mel_bin(log_mel, num_frames(lengths.to(torch.int64))) if normalize else log_mel


@_log_mel_fbank_op.register_fake
def _(waveforms, lengths, normalize):
    return waveforms.new_empty(waveforms.shape[0], int(num_frames(waveforms.shape[1])), NUM_MEL_BINS,
                               dtype=torch.float32)


# No autograd: features are an input, nothing upstream of them learns.


# ------------------------------------------------------------------------------------------------ dispatch
# The launcher hands the kernels fp32 samples whatever the input's float dtype (transformers' extractor casts to fp32
# too), so every float dtype runs them (``_backend.OP_DTYPES``).
def log_mel_fbank(waveforms, lengths=None, normalize=True):
    """Normalised log-mel features of a right-padded batch of 16 kHz clips, as SeamlessM4TFeatureExtractor.

    waveforms: (B, N) float tensor of samples in [-1, 1] (the extractor's input scale), right-padded;
    lengths: optional (B,) integer sample counts, each in [400, N] (default: all N).
    Returns (B, 1 + (N − 400) // 160, 80) float32: per clip, its 1 + (length − 400) // 160 frames normalised per mel
    bin, zeros after them. A one-frame clip (400–559 samples) gets zeros (its variance is undefined). A NaN sample
    makes every frame of its clip NaN, on every path (FbankExtractor rejects non-finite audio before this).
    ``normalize=False``: the log-mel itself, unnormalised (the extractor's ``do_normalize_per_mel_bins=False``).

    Backends (``W2VBERT_FAST_BACKEND``): ``triton``, or ``auto`` on a GPU (every arch ``_backend``'s table lists), the
    kernels; ``auto`` on CPU tensors the fast CPU path; ``torch`` the literal reference. lengths' values are checked
    where that costs no device sync (``_backend.checks_values``); elsewhere they are clamped to [400, N] on the
    device.
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
    if values_checkable(lengths):
        low, high = int(lengths.min()), int(lengths.max())
        if low < FRAME_LENGTH or high > total:
            raise ValueError(f"lengths must lie in [{FRAME_LENGTH}, {total}] samples, got [{low}, {high}]")
    # unchecked, a length past N would frame samples of the next row (or past the batch), one under 400 a negative
    # frame count: clamped, every path reads inside its own clip
    lengths = lengths.to(waveforms.device).clamp(FRAME_LENGTH, total)
    if batch == 0:
        return torch.zeros(0, int(num_frames(total)), NUM_MEL_BINS, device=waveforms.device)
    path = dispatch(waveforms, op="log_mel_fbank")
    if path == TRITON:
        return _log_mel_fbank_op(waveforms.float(), lengths.to(torch.int32), bool(normalize))
    if path == FAST:
        return log_mel_fbank_cpu(waveforms, lengths, bool(normalize))
    if normalize:
        return log_mel_fbank_reference(waveforms, lengths)
    return log_mel_reference(waveforms, lengths).to(waveforms.device)


# --------------------------------------------------------------------------------------------- LAUNCH_META
def _example_inputs(shape):
    """Meta tensors as the op hands them to the launcher for one of the compile check's shapes: fp32 samples
    (B, samples), int32 lengths."""
    return (torch.empty(shape["batch"], shape["samples"], device="meta", dtype=torch.float32),
            torch.empty(shape["batch"], device="meta", dtype=torch.int32))


def _described(args):
    """A launch's keyword arguments as the compile check takes them: a tensor by its dtype."""
    return {name: value.dtype if isinstance(value, torch.Tensor) else value for name, value in args.items()}


def _frames_example(shape, dtype):
    waveforms, lengths = _example_inputs(shape)
    return _described(_frames_args(waveforms, lengths, _frame_buffer(waveforms)))


def _log_mel_example(shape, dtype):
    waveforms, lengths = _example_inputs(shape)
    out = torch.empty(shape["batch"], int(num_frames(shape["samples"])), NUM_MEL_BINS, device="meta")
    return _described(_log_mel_args(_spectrum(_frame_buffer(waveforms)), lengths, out))


# One input dtype: the launcher always passes fp32 samples (fp64 frames and spectra). The framing is fp64 by design;
# the log-mel kernel has no fp64 arithmetic (it rounds the spectrum to fp32 on load).
LAUNCH_META = {
    "_frames_kernel": KernelLaunch(_frames_kernel, _frames_example, lambda dtype: FRAMES_CONFIGS,
                                   dtypes=("float32",), expect=("no_local",)),
    "_log_mel_kernel": KernelLaunch(_log_mel_kernel, _log_mel_example, lambda dtype: LOG_MEL_CONFIGS,
                                    dtypes=("float32",), expect=("no_fp64", "no_local")),
}
