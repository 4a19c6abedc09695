"""Feature extraction: raw 16 kHz clips → (B, F, 160) normalised log-mel features + attention mask.

GPU: 64 clips of 2–30 s (seeded lengths; speech-like signal: harmonics under a moving pitch plus noise, never zeros).
CPU: 8 clips of 2–10 s. Contenders: transformers' SeamlessM4TFeatureExtractor (numpy, one clip at a time: the
reference), our PyTorch CPU path (the ``auto`` backend on CPU tensors), and on a GPU our Triton kernels and a
straightforward torch.stft implementation in fp32 (the obvious alternative; it is not exact on clean synthetic
audio, see ops/log_mel_fbank.py). Every contender starts from the same host numpy clips and ends with tensors on
its device. ``hours_audio_per_s`` is the throughput. The floor, recorded with every result: ``bytes_moved`` counts
the bytes no implementation can avoid, samples read (fp32) and features written (fp32), ``floor_ms`` is those bytes
at the measured copy bandwidth (``conftest.copy_gbps``); ``flops`` counts the arithmetic of the cheapest exact
method, ~15 kFLOP a frame (an fp64 512-point real FFT ≈ 2.5·512·log₂512, framing, |X|², the 501 non-zero mel weights,
log, normalisation). A window-folded DFT as a matmul would be ~410 kFLOP a frame (400 × 514 MACs) instead.
"""

import numpy as np
import pytest
import torch
from conftest import DEVICE, ON_GPU, copy_gbps

import w2vbert_fast
from w2vbert_fast.ops.log_mel_fbank import kaldi_mel_filters, povey_window

RATE = 16000
NUM_CLIPS, SHORTEST_S, LONGEST_S = (64, 2, 30) if ON_GPU else (8, 2, 10)


def speech_like_clips(seed=0):
    rng = np.random.default_rng(seed)
    clips = []
    for seconds in rng.uniform(SHORTEST_S, LONGEST_S, NUM_CLIPS):
        n = int(seconds * RATE)
        t = np.arange(n) / RATE
        pitch = 120 + 40 * np.sin(2 * np.pi * 0.7 * t)
        phase = 2 * np.pi * np.cumsum(pitch) / RATE
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        clips.append((0.2 * voiced + 0.02 * rng.standard_normal(n)).astype(np.float32))
    return clips


CLIPS = speech_like_clips()
AUDIO_SECONDS = sum(len(c) for c in CLIPS) / RATE
FRAMES = sum(1 + (len(c) - 400) // 160 for c in CLIPS)
FLOOR_BYTES = 4 * sum(len(c) for c in CLIPS) + 4 * 80 * FRAMES
FLOPS_PER_FRAME = 2.5 * 512 * 9 + 4 * 400 + 2 * 514 + 2 * 501 + 4 * 80
FLOOR_FLOPS = int(FLOPS_PER_FRAME * FRAMES)


def transformers_extractor():
    transformers = pytest.importorskip("transformers")
    fe = transformers.SeamlessM4TFeatureExtractor()
    return lambda clips: fe(clips, sampling_rate=RATE, return_tensors="pt")


def ours(device):
    fe = w2vbert_fast.FbankExtractor()
    return lambda clips: fe(clips, sampling_rate=RATE, device=device)


def ours_one_thread():
    """Our CPU path with torch limited to one thread (restored after each call): the thread-count measurement."""
    fe = w2vbert_fast.FbankExtractor()

    def run(clips):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fe(clips, sampling_rate=RATE, device="cpu")
        finally:
            torch.set_num_threads(threads)

    return run


def torch_stft_extractor():
    """The obvious GPU code: pad the batch, torch.stft in fp32 with the povey window, the same post-processing."""
    window = torch.zeros(512, device=DEVICE)
    window[:400] = torch.tensor(povey_window(), dtype=torch.float32, device=DEVICE)
    filters = torch.tensor(kaldi_mel_filters(), dtype=torch.float32, device=DEVICE)

    def run(clips):
        lengths = torch.tensor([len(c) for c in clips], device=DEVICE)
        waves = torch.zeros(len(clips), int(lengths.max()), device=DEVICE)
        for i, c in enumerate(clips):
            waves[i, : len(c)] = torch.from_numpy(c).to(DEVICE, non_blocking=True)
        frames = (waves * 32768).unfold(1, 400, 160)
        frames = frames - frames.mean(-1, keepdim=True)
        frames = torch.cat([frames[..., :1] * 0.03, frames[..., 1:] - 0.97 * frames[..., :-1]], dim=-1)
        spectrum = torch.fft.rfft(torch.nn.functional.pad(frames, (0, 112)) * window, dim=-1)
        log_mel = (spectrum.abs().square() @ filters).clamp_min(1.192092955078125e-07).log()
        counts = 1 + (lengths - 400) // 160
        valid = (torch.arange(log_mel.shape[1], device=DEVICE)[None, :] < counts[:, None])[..., None]
        mean = (log_mel * valid).sum(1, keepdim=True) / counts[:, None, None]
        var = ((log_mel - mean) * valid).square().sum(1, keepdim=True) / (counts[:, None, None] - 1)
        features = (log_mel - mean) / torch.sqrt(var + 1e-7) * valid
        frames_even = features.shape[1] - features.shape[1] % 2
        return features[:, :frames_even].reshape(len(clips), frames_even // 2, 160), valid[:, 1:frames_even:2, 0]

    return run


CONTENDERS = {
    "transformers SeamlessM4TFeatureExtractor (CPU)": (transformers_extractor, {"role": "reference"}),
    "ours, PyTorch path (CPU)": (lambda: ours("cpu"), {}),
    "ours, PyTorch path (CPU), 1 thread": (ours_one_thread, {}),
    "ours, Triton (GPU)": (lambda: ours(DEVICE), {}),
    "torch.stft fp32 (GPU)": (torch_stft_extractor, {}),
}


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_feature_extraction(measure, contender):
    make, extra = CONTENDERS[contender]
    if "(GPU)" in contender and not ON_GPU:
        pytest.skip("needs a CUDA GPU: this contender runs on the GPU (no GPU on this machine)")
    fn = make()
    slow = contender.startswith("transformers")
    bandwidth = copy_gbps()
    measure(fn, [(CLIPS,)], case=f"features {NUM_CLIPS} clips {SHORTEST_S}-{LONGEST_S} s", contender=contender,
            bytes_moved=FLOOR_BYTES, peak_gbps=bandwidth, flops=FLOOR_FLOPS, audio_seconds=AUDIO_SECONDS,
            warmup=1 if slow else 3, repeats=3 if slow else 10, rounds=1 if slow else None, frames=FRAMES,
            floor_ms=FLOOR_BYTES / (bandwidth * 1e9) * 1e3, claim=True, **extra)
