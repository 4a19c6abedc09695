"""``demo``: a bundled speech clip through features and encoder, the fast path against the reference path
(transformers when installed, else our PyTorch reference), printing the max difference and the time of each."""

import contextlib
import os
import time

import torch

from ..extract.audio import bundled_clip_path, read_audio
from ..extract.pipeline import feature_extractor, load_model
from ..features import FbankExtractor, check_clip
from ..ops.log_mel_fbank import SAMPLE_RATE
from .common import CommandError, model_source, resolve_device_dtype

WARMUP, REPEAT = 1, 3


@contextlib.contextmanager
def backend(name):
    """W2VBERT_FAST_BACKEND for the duration of a block (it is read at every call)."""
    old = os.environ.get("W2VBERT_FAST_BACKEND")
    os.environ["W2VBERT_FAST_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["W2VBERT_FAST_BACKEND"]
        else:
            os.environ["W2VBERT_FAST_BACKEND"] = old


def timed(fn, device, warmup=0, repeat=1):
    """(result, ms): the median of ``repeat`` calls after ``warmup`` calls, synchronised on CUDA."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return result, sorted(times)[len(times) // 2]


def count_parameters(model) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def reference_features(clip, use_transformers):
    """(input_features (1, F, 160) float32 CPU, description)."""
    if use_transformers:
        import transformers

        batch = transformers.SeamlessM4TFeatureExtractor()([clip], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return batch["input_features"], "transformers SeamlessM4TFeatureExtractor (numpy, CPU)"
    with backend("torch"):
        batch = FbankExtractor()([clip], sampling_rate=SAMPLE_RATE, device="cpu")
    return batch["input_features"], "w2vbert_fast PyTorch reference (CPU)"


def reference_encoder(model, use_transformers, device, dtype):
    """(callable features → last hidden state, description): transformers' model with the same weights, or ours
    with the PyTorch reference ops."""
    if use_transformers:
        import transformers

        config = transformers.Wav2Vec2BertConfig(**model.config.to_dict())
        config._attn_implementation = "sdpa"
        with torch.device("meta"):
            reference = transformers.Wav2Vec2BertModel(config)
        reference.load_state_dict(model.state_dict(), strict=True, assign=True)
        reference = reference.to(device=device, dtype=dtype).eval()

        def run(features):
            return reference(features).last_hidden_state

        return run, "transformers Wav2Vec2BertModel (sdpa)"

    def run_ours(features):
        with backend("torch"):
            return model(features).last_hidden_state

    return run_ours, "w2vbert_fast with W2VBERT_FAST_BACKEND=torch (the PyTorch reference ops)"


def max_diff(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def transformers_available(wanted) -> bool:
    if not wanted:
        return False
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def read_clip(path):
    """The clip at 16 kHz mono, checked as the extractor would (``features.check_clip``)."""
    try:
        clip, _ = read_audio(path, downmix=True, resample=True)
        check_clip(clip, path)
    except ValueError as error:  # AudioError is one; both start with the path
        raise CommandError(f"--audio {error}") from None
    return clip


def demo(args, threads=None):
    """``threads``: the ThreadChoice the command runs with (cli.common), shown in the start line."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    use_transformers = transformers_available(not args.no_transformers)
    path = args.audio or bundled_clip_path()
    clip = read_clip(path)
    source = model_source(args.model, args.random_weights, args.seed)

    print(f"w2vbert_fast demo on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{str(dtype)[6:]}" + (f", {threads.describe()}" if threads else ""))
    if device.type != "cuda":
        print("  no CUDA device: the fast path runs its CPU implementation (PyTorch, chunked O(L) attention); the "
              "Triton kernels need a GPU.\n  Short clips are matmul-bound on a CPU (the same Linear layers on both "
              "paths); the gap grows with length (README, 'On a CPU')")
    print(f"audio: {os.path.basename(path)}, {len(clip) / SAMPLE_RATE:.2f} s")
    ref_features = compare_features(clip, feature_extractor(source), use_transformers, device)
    model, description = load_model(source, device, dtype)
    print(f"model: {description}, {count_parameters(model)} parameters")
    compare_encoders(model, ref_features.to(device=device, dtype=dtype), use_transformers, device, dtype)
    return 0


def compare_features(clip, extractor, use_transformers, device):
    """Print the fast and reference features' times and difference; the reference features."""
    fast_batch, fast_ms = timed(lambda: extractor([clip], sampling_rate=SAMPLE_RATE, device=device), device,
                                warmup=WARMUP, repeat=REPEAT)
    (ref_features, ref_description), ref_ms = timed(lambda: reference_features(clip, use_transformers), device,
                                                    warmup=WARMUP, repeat=REPEAT)
    fast_features = fast_batch["input_features"]
    print(f"features  fast      FbankExtractor on {device.type:<6} {fast_ms:10.1f} ms")
    print(f"          reference {ref_description}  {ref_ms:10.1f} ms")
    print(f"          max |diff| {max_diff(fast_features, ref_features):.2e}  "
          f"({fast_features.shape[1]} frames x {fast_features.shape[2]})")
    return ref_features


def compare_encoders(model, features, use_transformers, device, dtype):
    """Print the fast and reference encoders' times, difference and the speed-up, both on the same features."""
    run_reference, ref_description = reference_encoder(model, use_transformers, device, dtype)
    with torch.inference_mode():
        fast_out, fast_ms = timed(lambda: model(features).last_hidden_state, device, warmup=WARMUP, repeat=REPEAT)
        ref_out, ref_ms = timed(lambda: run_reference(features), device, warmup=WARMUP, repeat=REPEAT)
    diff = max_diff(fast_out, ref_out)
    relative = ((fast_out.double() - ref_out.double()).norm() / ref_out.double().norm().clamp_min(1e-30)).item()
    print(f"encoder   fast      w2vbert_fast.Wav2Vec2BertModel  {fast_ms:10.1f} ms")
    print(f"          reference {ref_description}  {ref_ms:10.1f} ms")
    print(f"          max |diff| {diff:.2e}, relative error {relative:.2e}  (last hidden state "
          f"{fast_out.shape[1]} x {fast_out.shape[2]})")
    if ref_ms > 0:
        print(f"          speed-up {ref_ms / fast_ms:.2f}x (median of {REPEAT} calls after one warm-up; see "
              f"benchmarks/ for careful numbers)")
