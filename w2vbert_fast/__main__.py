"""Command line: ``python -m w2vbert_fast demo | extract | bench`` (also installed as ``w2vbert-fast``).

* ``demo``: a bundled speech clip through features and encoder, the fast path against the reference path
  (transformers when installed, else our PyTorch reference), printing the max difference and the time of each.
* ``extract``: audio files → one safetensors file of one layer's hidden states per clip, batched by length,
  resumable, unreadable files reported by name without stopping the rest.
* ``bench``: the benchmark suite (a repository checkout's ``benchmarks/``) and its report.

The standalone path (extract) never imports transformers.
"""

import argparse
import contextlib
import os
import subprocess
import sys
import time

import torch

from .cli_common import (ARCHITECTURES, DTYPES, SAMPLE_RATE, CommandError, default_device,  # noqa: F401
                         feature_extractor, load_model, random_model, resolve_device_dtype)


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


# --------------------------------------------------------------------------------------------------- demo
def reference_features(clip, use_transformers):
    """(input_features (1, F, 160) float32 CPU, description)."""
    if use_transformers:
        import transformers

        batch = transformers.SeamlessM4TFeatureExtractor()([clip], sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return batch["input_features"], "transformers SeamlessM4TFeatureExtractor (numpy, CPU)"
    with backend("torch"):
        batch = feature_extractor()([clip], sampling_rate=SAMPLE_RATE, device="cpu")
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


def demo(args):
    from .audio import AudioError, bundled_clip_path, read_audio
    from .features import MAX_ABS_SAMPLE

    device, dtype = resolve_device_dtype(args)
    use_transformers = not args.no_transformers
    if use_transformers:
        try:
            import transformers  # noqa: F401
        except ImportError:
            use_transformers = False
    path = args.audio or bundled_clip_path()
    try:
        clip, _ = read_audio(path, downmix=True, resample=True)
    except AudioError as error:
        raise CommandError(f"--audio {error}") from None
    if len(clip) < 560:  # FbankExtractor needs two 25 ms frames to normalise
        raise CommandError(f"--audio {path}: {len(clip)} samples at 16 kHz is too short (at least 560, 35 ms)")
    if float(abs(clip).max()) > MAX_ABS_SAMPLE:
        raise CommandError(f"--audio {path}: samples reach {float(abs(clip).max()):.3g}, above "
                           f"{MAX_ABS_SAMPLE:.0e} (the fp32 power spectrum would overflow); samples are expected in "
                           f"[-1, 1]")
    warmup, repeat = 1, 3

    print(f"w2vbert_fast demo on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {str(dtype)[6:]}")
    if device.type != "cuda":
        print("  no CUDA device: the fast path runs its CPU implementation (PyTorch, chunked O(L) attention); the "
              "Triton kernels need a GPU.\n  Short clips are matmul-bound on a CPU (the same Linear layers on both "
              "paths); the gap grows with length (README, 'On a CPU')")
    print(f"audio: {os.path.basename(path)}, {len(clip) / SAMPLE_RATE:.2f} s")

    # features
    extractor = feature_extractor(args.model)
    fast_batch, fast_ms = timed(lambda: extractor([clip], sampling_rate=SAMPLE_RATE, device=device), device,
                                warmup=warmup, repeat=repeat)
    (ref_features, ref_description), ref_ms = timed(lambda: reference_features(clip, use_transformers), device,
                                                 warmup=warmup, repeat=repeat)
    fast_features = fast_batch["input_features"]
    print(f"features  fast      FbankExtractor on {device.type:<6} {fast_ms:10.1f} ms")
    print(f"          reference {ref_description}  {ref_ms:10.1f} ms")
    print(f"          max |diff| {max_diff(fast_features, ref_features):.2e}  "
          f"({fast_features.shape[1]} frames x {fast_features.shape[2]})")

    # encoder, both on the reference features
    model, description = load_model(args, device, dtype)
    print(f"model: {description}, {count_parameters(model)} parameters")
    run_reference, ref_description = reference_encoder(model, use_transformers, device, dtype)
    features = ref_features.to(device=device, dtype=dtype)
    with torch.inference_mode():
        fast_out, fast_ms = timed(lambda: model(features).last_hidden_state, device, warmup=warmup, repeat=repeat)
        ref_out, ref_ms = timed(lambda: run_reference(features), device, warmup=warmup, repeat=repeat)
    diff = max_diff(fast_out, ref_out)
    relative = ((fast_out.double() - ref_out.double()).norm() / ref_out.double().norm().clamp_min(1e-30)).item()
    print(f"encoder   fast      w2vbert_fast.Wav2Vec2BertModel  {fast_ms:10.1f} ms")
    print(f"          reference {ref_description}  {ref_ms:10.1f} ms")
    print(f"          max |diff| {diff:.2e}, relative error {relative:.2e}  (last hidden state "
          f"{fast_out.shape[1]} x {fast_out.shape[2]})")
    if ref_ms > 0:
        print(f"          speed-up {ref_ms / fast_ms:.2f}x (median of {repeat} calls after one warm-up; see "
              f"benchmarks/ for careful numbers)")
    return 0


# -------------------------------------------------------------------------------------------------- bench
def bench(args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    benchmarks = os.path.join(repo, "benchmarks")
    if not os.path.isfile(os.path.join(benchmarks, "conftest.py")):
        print("bench needs a checkout of the w2vbert_fast repository (its benchmarks/ folder is not installed with "
              "the package):\n  git clone … && cd w2vbert_fast && pip install -e '.[test]' && "
              "python -m w2vbert_fast bench", file=sys.stderr)
        return 2
    if args.budget_s is not None:
        import runpy

        campaign = runpy.run_path(os.path.join(benchmarks, "campaign.py"), run_name="w2vbert_fast_campaign")
        out = ["--out", args.out] if args.out else []
        return campaign["main"](["--budget-s", str(args.budget_s), *out, *args.pytest_args])
    on_gpu = torch.cuda.is_available()
    json_path = args.json
    if json_path is None:
        if on_gpu:
            name = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name()).strip("-").lower()
            commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=repo, capture_output=True,
                                    text=True).stdout.strip() or "nocommit"
            json_path = os.path.join(benchmarks, "results", f"{name}-{commit}-{time.strftime('%Y%m%d-%H%M%S')}.json")
        else:
            import tempfile

            json_path = os.path.join(tempfile.mkdtemp(prefix="w2vbert_fast-bench-"), "cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    command = [sys.executable, "-m", "pytest", benchmarks, "--benchmark-only", "-q", f"--benchmark-json={json_path}",
               *args.pytest_args]
    print("running: " + " ".join(command), file=sys.stderr, flush=True)
    status = subprocess.run(command, cwd=repo).returncode
    if not os.path.isfile(json_path):
        print(f"pytest exited with {status} and wrote no {json_path}", file=sys.stderr)
        return status or 1
    report = [sys.executable, os.path.join(benchmarks, "report.py")]
    if on_gpu and args.json is None:
        import glob

        results = sorted(glob.glob(os.path.join(benchmarks, "results", "*.json")))
        subprocess.run(report + results + ["-o", os.path.join(benchmarks, "RESULTS.md")], check=True)
        print(f"results: {json_path} (commit it) and benchmarks/RESULTS.md (generated)", file=sys.stderr)
    else:
        if not on_gpu:
            print(f"no GPU: CPU smoke run, kept out of benchmarks/results/ ({json_path}); its report:", file=sys.stderr)
        subprocess.run(report + [json_path], check=True)
    return status


# --------------------------------------------------------------------------------------------------- main
def run_extract(args):
    from . import extract

    return extract.extract(args)


def add_runtime_options(parser):
    parser.add_argument("--device", help="cuda, cuda:1, cpu … (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")


def add_model_options(parser, random_default=None):
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--model", metavar="FOLDER",
                       help="a transformers-format checkpoint folder (config.json + model.safetensors), e.g. a "
                            "download of facebook/w2v-bert-2.0")
    group.add_argument("--random-weights", choices=sorted(ARCHITECTURES), default=random_default,
                       help="seeded random weights of a named architecture instead of a checkpoint"
                            + (f" (default: {random_default})" if random_default else " (for tests)"))
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights (default 0)")


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m w2vbert_fast",
                                     description="Fast Wav2Vec2-BERT (w2v-bert-2.0) encoder: demo, extract, bench")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("demo", help="a short speech clip through the fast path and the reference path",
                            description="Features and encoder on a bundled speech clip, fast path vs reference "
                                        "path: max difference and time of each, on whatever device is there.")
    add_model_options(p, random_default="w2v-bert-2.0")
    p.add_argument("--tiny", dest="random_weights", action="store_const", const="tiny",
                   help="the tiny random architecture (seconds on a CPU; same as --random-weights tiny)")
    p.add_argument("--audio", metavar="FILE", help="another clip instead of the bundled one")
    p.add_argument("--no-transformers", action="store_true",
                   help="use our PyTorch reference as the reference path even when transformers is installed")
    add_runtime_options(p)
    p.set_defaults(handler=demo)

    p = commands.add_parser("extract", help="audio files → one safetensors file of a layer's hidden states per clip",
                            description="Hidden states of one layer for every clip: OUT/<name>.safetensors with a "
                                        "tensor 'hidden_states' (frames, hidden) and metadata (layer, source, sample "
                                        "rate, model identity, dtype). A rerun resumes: outputs that check out are "
                                        "skipped, damaged or out-of-date ones redone, and ones computed with another "
                                        "layer, model or dtype stop the run (see --overwrite). Unreadable files are "
                                        "reported by name at the end (exit status 1); the rest are written.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files or folders (searched recursively for "
                                                              ".wav, .flac, …)")
    p.add_argument("--list", metavar="FILE", help="a text file of audio paths, one per line")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_model_options(p)
    p.add_argument("--layer", type=int, default=None,
                   help="which hidden state: 0 = after the feature projection, N = output of layer N (default 17, "
                        "what TTS systems use with w2v-bert-2.0; the last layer of a model with fewer)")
    p.add_argument("--batch-seconds", type=float, default=None,
                   help="padded audio per batch, in seconds (default: 300 on CUDA, 60 on CPU)")
    p.add_argument("--resample", action="store_true", help="resample clips that are not 16 kHz (else an error)")
    p.add_argument("--downmix", action="store_true", help="average multi-channel clips to mono (else an error)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite outputs that already exist, even ones computed with another layer, model or dtype")
    p.add_argument("--quiet", action="store_true", help="no progress line (clips, hours of audio, rate, ETA)")
    p.add_argument("--rank-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for a silent rank (crashed, killed) before giving up "
                        "with exit status 1 (default 300)")
    add_runtime_options(p)
    p.set_defaults(handler=run_extract)

    p = commands.add_parser("bench", help="run the benchmark suite and write its report",
                            description="pytest benchmarks --benchmark-only --benchmark-json=… then "
                                        "benchmarks/report.py. On a GPU the JSON goes to benchmarks/results/ and "
                                        "RESULTS.md is regenerated; on a CPU it is a smoke run printed to stdout.")
    p.add_argument("--json", help="where to write the pytest-benchmark JSON")
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help="the one-call campaign instead (benchmarks/campaign.py): GPU-only tests, then the "
                        "benchmarks in priority order, within SECONDS; JSON written after each case")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="with --budget-s: the results folder (default $OUT, else benchmarks/results/campaign-…)")
    p.epilog = ("Any other argument goes to pytest, e.g. `bench -k encoder`; with --budget-s, to "
                "benchmarks/campaign.py, e.g. `--cases encoder,long-audio`.")
    p.set_defaults(handler=bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.pytest_args = unknown
    if args.command == "extract":
        if not args.inputs and not args.list:
            parser.error("extract: give audio files or folders, or --list FILE")
        if not args.model and not args.random_weights:
            parser.error("extract needs --model FOLDER (a transformers-format checkpoint: config.json + "
                         "model.safetensors, e.g. a download of facebook/w2v-bert-2.0); --random-weights is for tests")
        if args.batch_seconds is None:
            args.batch_seconds = 300.0 if (args.device or default_device()).startswith("cuda") else 60.0
    try:
        return args.handler(args)
    except CommandError as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
