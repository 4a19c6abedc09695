"""Band-limited resampling in bounded memory, for any pair of rates.

The filter is torchaudio's (``torchaudio.functional.resample``, method ``sinc_interp_hann``): a sinc low-pass at
``rolloff`` × the lower Nyquist rate, Hann-windowed over ``lowpass_filter_width`` zero crossings each side. What
differs is how it is laid out. torchaudio reduces the rates by their gcd to ``orig`` → ``new`` and builds a dense
(new, 2·width + orig) kernel: ``new`` phases, each spanning a whole stride of ``orig`` input samples although only
2·width + 1 of them are inside its window. For 44.1 kHz → 16 kHz that is 160 × 475 values; for 16001 Hz → 16 kHz
(gcd 1) it is 16000 × 16015, float64, and the convolution's buffers with it: 10.6 GB and 28.7 s for a 1 s clip,
whatever the clip's length.

Here each phase keeps only its own 2·width + 1 taps (a polyphase filter bank), and every output sample gathers the
input samples under its window. Why this and not a rational approximation of the ratio (bounded up/down factors):
the approximation changes the output rate (16001 Hz read as 16000 Hz is a 60 ppm pitch and length error, and the
error grows as the factors are bounded tighter), and the outputs of ordinary rates would change; the polyphase
bank gives the exact ratio and torchaudio's values (to float rounding) for every rate, and its size is bounded:

* taps per output: 2·width + 1, width = ⌈lowpass_filter_width · orig / (min(orig, new) · rolloff)⌉ input samples —
  15 when upsampling, 293 for 384 kHz → 16 kHz;
* the bank: new × taps ≈ 12 · max(orig, new) values (orig, new after the gcd, new ≤ 16000 for a 16 kHz target) —
  at most about 4.7 M floats (19 MB) for any rate up to 384 kHz, computed once per pair of rates and cached;
* the work buffers: outputs are computed in blocks of at most ``BLOCK_VALUES`` gathered samples (16 MB), so memory
  does not grow with the clip.

16001 Hz → 16 kHz, 1 s: a 16000 × 15 bank and milliseconds (benchmarks/results/extract-*.json, "resample").
"""

import functools
import math

import torch

BLOCK_VALUES = 1 << 20  # gathered input samples per block of outputs (4 MB float32, 8 MB of int64 indices)


@functools.lru_cache(maxsize=4)
def _filter_bank(orig: int, new: int, lowpass_filter_width: int, rolloff: float):
    """(bank (new, taps) float32, width): row r holds the weights of the taps k = q − width … q + width of an
    output sample at input position q + r/new."""
    base = min(orig, new) * rolloff
    width = math.ceil(lowpass_filter_width * orig / base)
    taps = torch.arange(-width, width + 1, dtype=torch.float64)[None, :]
    bank = torch.empty(new, taps.shape[1], dtype=torch.float32)
    rows = max(1, BLOCK_VALUES // taps.shape[1])  # float64 temporaries of a block of rows, not of the whole bank
    for start in range(0, new, rows):
        phase = torch.arange(start, min(start + rows, new), dtype=torch.float64)[:, None] / new
        # the distance in input samples, in torchaudio's time unit (orig samples = 1), times the cut-off
        t = ((taps - phase) / orig * base).clamp(-lowpass_filter_width, lowpass_filter_width)
        window = torch.cos(t * (math.pi / lowpass_filter_width / 2)) ** 2
        t = t * math.pi
        sinc = torch.where(t == 0, 1.0, torch.sin(t) / torch.where(t == 0, 1.0, t))
        bank[start:start + phase.shape[0]] = sinc * window * (base / orig)
    return bank, width


def resample_audio(waveform: torch.Tensor, orig_freq: int, new_freq: int, lowpass_filter_width: int = 6,
                   rolloff: float = 0.99) -> torch.Tensor:
    """A 1-D or (..., T) tensor at ``orig_freq`` Hz → at ``new_freq`` Hz, ⌈T · new / orig⌉ samples: torchaudio's
    windowed-sinc resampling, in memory bounded for any rates (see the module's docstring)."""
    for name, value in (("orig_freq", orig_freq), ("new_freq", new_freq)):
        if isinstance(value, bool) or int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive whole number of Hz, got {value!r}")
    if orig_freq == new_freq:
        return waveform
    gcd = math.gcd(int(orig_freq), int(new_freq))
    orig, new = int(orig_freq) // gcd, int(new_freq) // gcd
    bank, width = _filter_bank(orig, new, int(lowpass_filter_width), float(rolloff))
    dtype = waveform.dtype if waveform.is_floating_point() else torch.float32
    shape = waveform.shape
    length = shape[-1]
    flat = torch.nn.functional.pad(waveform.reshape(-1, length).to(dtype), (width, width))
    bank = bank.to(device=waveform.device, dtype=dtype)
    count = math.ceil(new * length / orig)
    offsets = torch.arange(2 * width + 1, device=waveform.device)
    block = max(1, BLOCK_VALUES // (flat.shape[0] * offsets.numel()))
    out = torch.empty(flat.shape[0], count, dtype=dtype, device=waveform.device)
    for start in range(0, count, block):
        n = torch.arange(start, min(start + block, count), device=waveform.device) * orig  # int64: exact positions
        first, phase = n // new, n % new  # output n sits at input position first + phase/new
        gathered = flat[:, first[:, None] + offsets[None, :]]  # (rows, block, taps); padded: index first + j
        out[:, start:start + n.numel()] = (gathered * bank[phase]).sum(dim=-1)
    return out.reshape(*shape[:-1], count)
