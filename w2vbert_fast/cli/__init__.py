"""Command line: ``python -m w2vbert_fast demo | extract | bench | check`` (also installed as ``w2vbert-fast``).

* ``demo``: a bundled speech clip through features and encoder, the fast path against the reference path
  (transformers when installed, else our PyTorch reference), printing the max difference and the time of each.
* ``extract``: audio files, folders, lists or manifests → one layer's hidden states per clip (a safetensors file
  each, or shards), batched by length, pipelined, resumable, unreadable files reported by name without stopping
  the rest (the ``w2vbert_fast.extract`` application; this file turns the arguments into its ExtractOptions).
* ``bench``: the benchmark suite (a repository checkout's ``benchmarks/``) and its report.
* ``check``: versions, device, the path each op takes there and why, each op against its reference (cli/check.py).

The standalone path (extract) never imports transformers.
"""

import argparse
import sys

from ..extract import ExtractError, ExtractOptions, extract
from . import bench, check, demo
from .common import ARCHITECTURES, DTYPES, CommandError, model_source, resolve_device_dtype
from .common import command_threads


def extract_options(args, threads=None) -> ExtractOptions:
    """The typed options of ``extract``'s arguments; the batch defaults to 300 s of audio on CUDA, 60 s on a CPU.
    ``threads``: the command's ThreadChoice (cli.common), for the start line."""
    device, dtype = resolve_device_dtype(args.device, args.dtype)
    batch_seconds = args.batch_seconds
    if batch_seconds is None:
        batch_seconds = 300.0 if device.type == "cuda" else 60.0
    return ExtractOptions(
        out=args.out, model=model_source(args.model, args.random_weights, args.seed), inputs=tuple(args.inputs),
        list_file=args.list, manifest=args.manifest, layer=args.layer, batch_seconds=batch_seconds, device=device,
        dtype=dtype, save_dtype=DTYPES[args.save_dtype] if args.save_dtype else None, shard_size=args.shard_size,
        workers=args.workers, resample=args.resample, downmix=args.downmix, overwrite=args.overwrite,
        quiet=args.quiet, rank_timeout=args.rank_timeout, threads=threads.describe() if threads else "")


def add_runtime_options(parser):
    parser.add_argument("--device", help="cuda, cuda:1, cpu … (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU "
                                                                "(bfloat16 runs on a CPU too: README 'On a CPU')")
    add_threads_option(parser)


def add_threads_option(parser):
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch's threads (default: OMP_NUM_THREADS when set, else the CPUs this process may "
                             "use: its affinity mask capped by its cgroup CPU quota)")


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

    p = commands.add_parser("extract", help="audio files → one safetensors file of a layer's hidden states per clip",
                            description="Hidden states of one layer for every clip: OUT/<name>.safetensors with a "
                                        "tensor 'hidden_states' (frames, hidden) and metadata (layer, source, sample "
                                        "rate, model identity, dtype), or shards of many clips (--shard-size); "
                                        "w2vbert_fast.load_features(OUT) reads either back. A rerun resumes: "
                                        "outputs that check out are skipped, damaged or out-of-date ones redone, and "
                                        "ones computed with another layer, model or dtype stop the run (see "
                                        "--overwrite). Unreadable files are reported by name at the end (exit status "
                                        "1); the rest are written. OUT/manifest.json lists every clip.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="audio files or folders (searched recursively for "
                                                              ".wav, .flac, …)")
    p.add_argument("--list", metavar="FILE", help="a text file of audio paths, one per line")
    p.add_argument("--manifest", metavar="FILE",
                   help="JSON lines ({\"path\": …, \"duration\": s, \"sample_rate\": Hz, \"name\": …}) or TSV "
                        "(path, duration, sample_rate): clips whose duration is given are not opened before their "
                        "batch; relative paths are relative to the manifest's folder")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add_model_options(p)
    p.add_argument("--layer", type=int, default=None,
                   help="which hidden state, numbered as transformers' hidden_states: 0 = the feature projection's "
                        "output, N = output of layer N, and only layers 1…N run (default 17, what TTS systems use "
                        "with w2v-bert-2.0; the last layer of a model with fewer)")
    p.add_argument("--batch-seconds", type=float, default=None,
                   help="padded audio per batch, in seconds (default: 300 on CUDA, 60 on CPU)")
    p.add_argument("--shard-size", type=int, default=None, metavar="N",
                   help="N clips per safetensors shard in OUT/shards/ (one fsync per shard; resume per shard) "
                        "instead of one file per clip")
    p.add_argument("--save-dtype", choices=sorted(DTYPES),
                   help="store the hidden states in this dtype (bfloat16 or float16: half the bytes; default: "
                        "--dtype)")
    p.add_argument("--workers", type=int, default=4, metavar="N",
                   help="threads that decode audio ahead of the model (and up to 4 that write outputs behind it); "
                        "0: every stage in turn on one thread (default 4)")
    p.add_argument("--resample", action="store_true", help="resample clips that are not 16 kHz (else an error)")
    p.add_argument("--downmix", action="store_true", help="average multi-channel clips to mono (else an error)")
    p.add_argument("--overwrite", action="store_true",
                   help="rewrite outputs that already exist, even ones computed with another layer, model or dtype")
    p.add_argument("--quiet", action="store_true", help="no progress line (clips, hours of audio, rate, ETA)")
    p.add_argument("--rank-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="under torchrun: how long a rank waits for a silent rank (crashed, killed) before giving up "
                        "with exit status 1 (default 300)")
    add_runtime_options(p)

    p = commands.add_parser("bench", help="run the benchmark suite and write its report",
                            description=f"pytest benchmarks --benchmark-only --benchmark-json=… then "
                                        f"{bench.REPORT} (its table only). On a GPU the JSON goes to "
                                        f"benchmarks/results/ and RESULTS.md is regenerated; on a CPU it is a smoke "
                                        f"run printed to stdout. Needs the test extras: pip install -e \".[test]\".")
    p.add_argument("--json", help="where to write the pytest-benchmark JSON")
    add_threads_option(p)
    p.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                   help=f"the one-call campaign instead ({bench.CAMPAIGN}): GPU-only tests, then the benchmarks in "
                        f"priority order, within SECONDS; JSON written after each case")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="with --budget-s: the results folder (default $OUT, else benchmarks/results/campaign-…)")
    p.epilog = (f"Any other argument goes to pytest, e.g. `bench -k encoder`; with --budget-s, to {bench.CAMPAIGN}, "
                f"e.g. `--cases encoder,long-audio`.")
    check.add_parser(commands)
    return parser


def check_extract_arguments(parser, args):
    if not args.inputs and not args.list and not args.manifest:
        parser.error("extract: give audio files or folders, --list FILE or --manifest FILE")
    if not args.model and not args.random_weights:
        parser.error("extract needs --model FOLDER (a transformers-format checkpoint: config.json + "
                     "model.safetensors, e.g. a download of facebook/w2v-bert-2.0); --random-weights is for tests")


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "bench":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "extract":
        check_extract_arguments(parser, args)
    try:
        with command_threads(args.threads) as threads:  # before any work; the start line says why
            if args.command == "extract":
                return extract(extract_options(args, threads))
            if args.command == "bench":
                return bench.bench(args, unknown, threads)
            if args.command == "check":
                return check.check(args)
            return demo.demo(args, threads)
    except (CommandError, ExtractError) as error:
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
