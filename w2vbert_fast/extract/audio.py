"""Reading audio files for ``extract`` and ``demo``: WAV with the standard library, everything else with soundfile.

``read_audio(path) -> (float32 mono samples in [-1, 1], sample rate)``; ``audio_info(path)`` reads only the header.
WAV (PCM 8/16/24/32-bit, IEEE float 32/64-bit, plain or WAVE_FORMAT_EXTENSIBLE) is parsed here, so no extra
package is needed; FLAC, OGG and the rest go through ``soundfile`` when it is installed, else a clear error says to
install it. Every failure is an :class:`AudioError` whose message starts with the file's path: decoding errors and
operating-system faults alike (no permission, a file removed or truncated while read, a FIFO, a folder), so a caller
going through many files can name the bad one and go on.

Multi-channel audio is an error unless ``downmix=True`` (the mean of the channels); a sample rate other than the
one asked for is an error unless ``resample=True`` (windowed-sinc, in bounded memory for any rate: below).
A header whose rate lies outside ``MIN_SAMPLE_RATE`` … ``MAX_SAMPLE_RATE`` (1 kHz – 384 kHz) is refused naming the
rate (a damaged header claiming 1 Hz would make a 32 KB file hours of "audio"), and so is a file that holds fewer
frames than its header says (truncated, or cut while a run goes): never decoded from the part that is left.

Resampling (``resample_audio``): band-limited, in bounded memory, for any pair of rates.

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

import contextlib
import functools
import math
import os
import stat
import struct
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

from ..ops.log_mel_fbank import SAMPLE_RATE

__all__ = ["AUDIO_EXTENSIONS", "AudioError", "AudioInfo", "audio_info", "bundled_clip_path", "check_sample_rate",
           "read_audio", "read_clip", "resample_audio"]

MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384000
BLOCK_VALUES = 1 << 20  # gathered input samples per block of outputs (4 MB float32, 8 MB of int64 indices)

WAV_EXTENSIONS = (".wav", ".wave")
SOUNDFILE_EXTENSIONS = (".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au")
AUDIO_EXTENSIONS = WAV_EXTENSIONS + SOUNDFILE_EXTENSIONS

_PCM, _FLOAT, _EXTENSIBLE = 1, 3, 0xFFFE


class AudioError(ValueError):
    """A file that cannot be used: unreadable, unsupported, multi-channel, wrong rate. The message names it."""


@dataclass
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def check_sample_rate(path, rate):
    """AudioError naming the rate unless MIN_SAMPLE_RATE ≤ rate ≤ MAX_SAMPLE_RATE."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{path}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}–{MAX_SAMPLE_RATE} Hz (a damaged "
                         f"header?); convert the file if the rate is real")


def bundled_clip_path() -> str:
    """A short English speech clip shipped with the package (16 kHz mono, about 6 s)."""
    return str(resources.files("w2vbert_fast").joinpath("data", "speech_en_16k.wav"))


# ------------------------------------------------------------------------------------------------ WAV
@dataclass
class _WavLayout:
    info: AudioInfo
    format: int  # _PCM or _FLOAT
    bits: int
    data_offset: int


def _wav_layout(path) -> _WavLayout:
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            raise AudioError(f"{path}: not a WAV file (no RIFF/WAVE header)")
        fmt = None
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                raise AudioError(f"{path}: WAV file has no data chunk" if fmt else f"{path}: WAV file has no fmt chunk")
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                body = f.read(size)
                if len(body) < 16:
                    raise AudioError(f"{path}: truncated WAV fmt chunk")
                tag, channels, rate, _, _, bits = struct.unpack("<HHIIHH", body[:16])
                if tag == _EXTENSIBLE and len(body) >= 26:
                    tag = struct.unpack("<H", body[24:26])[0]  # the sub-format GUID starts with the format tag
                fmt = (tag, channels, rate, bits)
            elif name == b"data":
                if fmt is None:
                    raise AudioError(f"{path}: WAV data chunk before its fmt chunk")
                tag, channels, rate, bits = fmt
                if tag not in (_PCM, _FLOAT):
                    raise AudioError(f"{path}: WAV sample format {tag:#x} is not supported (PCM or IEEE float only; "
                                     f"install soundfile or convert the file)")
                if (tag == _PCM and bits not in (8, 16, 24, 32)) or (tag == _FLOAT and bits not in (32, 64)):
                    raise AudioError(f"{path}: {bits}-bit {'PCM' if tag == _PCM else 'float'} WAV is not supported")
                if channels < 1:
                    raise AudioError(f"{path}: WAV header says {channels} channels at {rate} Hz")
                check_sample_rate(path, rate)
                block = channels * bits // 8
                available = os.path.getsize(path) - f.tell()
                if size == 0xFFFFFFFF:  # streamed (or RF64): the data runs to the end of the file
                    size = available
                elif size // block > available // block:
                    raise AudioError(f"{path}: truncated: its header says {size // block} frames, the file holds "
                                     f"{available // block}")
                return _WavLayout(AudioInfo(rate, size // block, channels), tag, bits, f.tell())
            else:
                f.seek(size + (size & 1), os.SEEK_CUR)  # chunks are word-aligned


def _read_wav(path):
    layout = _wav_layout(path)
    info, bits = layout.info, layout.bits
    count = info.frames * info.channels
    with open(path, "rb") as f:
        f.seek(layout.data_offset)
        raw = f.read(count * bits // 8)
    if len(raw) < count * bits // 8:  # the file shrank since its header was read
        raise AudioError(f"{path}: truncated while being read ({len(raw)} of {count * bits // 8} data bytes)")
    if layout.format == _FLOAT:
        data = np.frombuffer(raw, dtype="<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:
        data = (np.frombuffer(raw, dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 16:
        data = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    elif bits == 24:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        data = (np.where(value >= 1 << 23, value - (1 << 24), value)).astype(np.float32) / float(1 << 23)
    else:
        data = (np.frombuffer(raw, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    return data.reshape(-1, info.channels), info.sample_rate


# ------------------------------------------------------------------------------------------ soundfile
def _soundfile(path):
    try:
        import soundfile
    except ImportError:
        raise AudioError(f"{path}: reading {os.path.splitext(path)[1] or 'this'} files needs the soundfile package "
                         f"(pip install soundfile); WAV needs nothing") from None
    return soundfile


def _check_regular_file(path):
    """AudioError unless ``path`` is a regular file: a FIFO or device would block or never end when read."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file") from None
    except OSError as error:
        raise AudioError(f"{path}: cannot read: {error.strerror}") from None
    if stat.S_ISDIR(mode):
        raise AudioError(f"{path}: is a folder, not an audio file")
    if not stat.S_ISREG(mode):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise AudioError(f"{path}: is {kind}, not a regular file")


@contextlib.contextmanager
def _reading(path):
    """OS and decoding faults while reading ``path`` (permission, a file that vanished or shrank, a short read)
    as AudioError naming it, so that a caller handling many files can list it and go on."""
    try:
        yield
    except AudioError:
        raise
    except FileNotFoundError:
        raise AudioError(f"{path}: no such file (removed while being read?)") from None
    except PermissionError:
        raise AudioError(f"{path}: cannot read: permission denied") from None
    except OSError as error:
        raise AudioError(f"{path}: cannot read: {error.strerror or error}") from None
    except (ValueError, struct.error) as error:
        raise AudioError(f"{path}: cannot decode: {error}") from None


def audio_info(path) -> AudioInfo:
    """Sample rate, length and channel count, from the header only."""
    path = os.fspath(path)
    _check_regular_file(path)
    with _reading(path):
        if path.lower().endswith(WAV_EXTENSIONS):
            return _wav_layout(path).info
        soundfile = _soundfile(path)
        try:
            info = soundfile.info(path)
        except Exception as error:
            raise AudioError(f"{path}: cannot read audio: {error}") from None
    check_sample_rate(path, int(info.samplerate))
    return AudioInfo(int(info.samplerate), int(info.frames), int(info.channels))


def _read_soundfile(path):
    """(samples (frames, channels), rate) through soundfile; AudioError if fewer frames decode than its header says."""
    soundfile = _soundfile(path)
    try:
        with soundfile.SoundFile(path) as f:
            check_sample_rate(path, int(f.samplerate))
            frames = f.frames
            data = f.read(dtype="float32", always_2d=True)
            rate = int(f.samplerate)
    except AudioError:
        raise
    except Exception as error:
        raise AudioError(f"{path}: cannot read audio: {error}") from None
    if frames >= 0 and data.shape[0] != frames:  # soundfile gives a negative count where the header has none
        raise AudioError(f"{path}: truncated: its header says {frames} frames, {data.shape[0]} decode")
    return data, rate


# ----------------------------------------------------------------------------------------- resampling
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


# ------------------------------------------------------------------------------------------- one clip
def read_audio(path, sample_rate=SAMPLE_RATE, *, downmix=False, resample=False):
    """``(samples, sample_rate)``: float32 mono numpy samples in [-1, 1] at ``sample_rate``.

    Raises AudioError (naming the file) for unreadable files, multi-channel audio without ``downmix``, another
    rate without ``resample``, and non-finite samples. ``sample_rate=None`` keeps the file's rate.
    """
    samples, file_rate = read_clip(path, sample_rate, downmix=downmix, resample=resample)
    return samples, file_rate if sample_rate is None else sample_rate


def read_clip(path, sample_rate=SAMPLE_RATE, *, downmix=False, resample=False):
    """``(samples at sample_rate, the file's own rate)``: as :func:`read_audio`, and the rate it was read at."""
    path = os.fspath(path)
    _check_regular_file(path)
    with _reading(path):
        data, rate = _read_wav(path) if path.lower().endswith(WAV_EXTENSIONS) else _read_soundfile(path)
    if data.shape[1] > 1:
        if not downmix:
            raise AudioError(f"{path}: {data.shape[1]} channels; the encoder takes mono audio (pass --downmix to "
                             f"average the channels)")
        data = data.mean(axis=1, dtype=np.float32)
    else:
        data = data[:, 0]
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio has NaN or infinite samples")
    if sample_rate is not None and rate != sample_rate:
        if not resample:
            raise AudioError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz (pass --resample to convert)")
        try:
            data = resample_audio(torch.from_numpy(np.ascontiguousarray(data)), rate, sample_rate).numpy()
        except (RuntimeError, MemoryError, ValueError) as error:  # an allocation failure fails this clip alone
            raise AudioError(f"{path}: cannot resample {rate} Hz to {sample_rate} Hz ({type(error).__name__}: "
                             f"{error})") from None
    return np.ascontiguousarray(data, dtype=np.float32), rate
