"""The CPU path on a shared CPU: feature extraction and the encoder, quiet and with every core busy, 1 thread
against N, this checkout against the package before its fbank ran on the calling thread, and transformers.

    python benchmarks/bench_cpu_contention.py [--json benchmarks/results/cpu-contention-<commit>.json]

Conditions: ``quiet`` (nothing started by this script; the load average before says what else ran) and ``loaded``
(one busy-loop Python process per CPU this process may use, started before and stopped after: what a shared
machine, or a container whose cgroup quota is below its visible cores, does to torch's threads). Threads: 1 and N
(the CPUs this process may use, ``w2vbert_fast.cli.common``), set as ``OMP_NUM_THREADS`` for a fresh process per
(condition, threads, package), so torch, MKL and numpy's OpenBLAS all take it.

Workloads, each timed in that process after one untimed call:

* ``features``: 8 clips, prefixes of the bundled speech clip of 5.0 … 5.98 s (44 s of audio), FbankExtractor
  (``auto`` on the CPU) against transformers' SeamlessM4TFeatureExtractor (numpy), the same clips;
* ``encoder``: the w2v-bert-2.0 layer sizes with 2 layers (seeded random weights, fp32), one 6 s clip of speech-like
  audio: ours (``w2vbert_fast.Wav2Vec2BertModel``) against transformers' Wav2Vec2BertModel with sdpa, same weights,
  in alternating rounds (ours first, then transformers first, …) so that a neighbour's burst lands on both; the
  speed-up is given from the medians and as the median of the per-round ratios.

``before`` is the package at BEFORE (``git archive``), features only. The issue's targets: loaded, FbankExtractor
never slower than transformers' extractor; the encoder's ratio to transformers within 10 % of its quiet ratio.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE = "05759878086141c8c23b4361dea2cc30cd599d2f"  # the fbank CPU path as PyTorch ops (the parent of c0e7655)

# Runs in a fresh process: argv = [package root, options as JSON]; prints one JSON line.
RUNNER = r'''
import json, os, sys, time
root, options = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
import numpy as np
import torch
import w2vbert_fast
from w2vbert_fast.extract.audio import bundled_clip_path, read_audio

def timed(fn, repeats):
    fn()  # one-time costs (FFT plans, the allocator, the thread pool) out of the timing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return dict(median_ms=sorted(times)[len(times) // 2], min_ms=min(times), times_ms=[round(t, 2) for t in times])

def timed_interleaved(contenders, repeats):
    """Rounds of one call each, the order alternating per round, so a neighbour's burst falls on both sides: each
    contender's times, and per round the first contender's time over each other's (``ratio_to``)."""
    names = list(contenders)
    for fn in contenders.values():
        fn()
    times = {name: [] for name in names}
    for round_ in range(repeats):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            contenders[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    result = {name: dict(median_ms=median(ts), min_ms=min(ts), times_ms=[round(t, 2) for t in ts])
              for name, ts in times.items()}
    first = names[0]
    for name in names[1:]:
        result[first].setdefault("ratio_to", {})[name] = dict(
            median_per_round=round(median([b / a for a, b in zip(times[first], times[name])]), 3))
    return result

speech = np.asarray(read_audio(bundled_clip_path())[0], dtype=np.float32)
result = dict(threads=torch.get_num_threads(), w2vbert_fast=w2vbert_fast.__file__)
if "features" in options["workloads"]:
    clips = [speech[: int(16000 * s)] for s in np.linspace(5.0, 5.98, 8)]
    ours = w2vbert_fast.FbankExtractor()
    result["features"] = {"FbankExtractor": timed(lambda: ours(clips, sampling_rate=16000), options["repeats"])}
    if options["transformers"]:
        import transformers
        theirs = transformers.SeamlessM4TFeatureExtractor()
        result["features"]["transformers SeamlessM4TFeatureExtractor"] = timed(
            lambda: theirs(clips, sampling_rate=16000, return_tensors="pt"), max(3, options["repeats"] // 3))
    result["audio_seconds"] = sum(len(c) for c in clips) / 16000
if "encoder" in options["workloads"]:
    import transformers
    sizes = dict(hidden_size=1024, num_hidden_layers=options["layers"], num_attention_heads=16,
                 intermediate_size=4096, feature_projection_input_dim=160, hidden_act="swish",
                 position_embeddings_type="relative_key", left_max_position_embeddings=64,
                 right_max_position_embeddings=8, conv_depthwise_kernel_size=31, add_adapter=False)
    torch.manual_seed(0)
    reference = transformers.Wav2Vec2BertModel(transformers.Wav2Vec2BertConfig(**sizes, attn_implementation="sdpa")).eval()
    ours = w2vbert_fast.Wav2Vec2BertModel(w2vbert_fast.Wav2Vec2BertConfig(**sizes)).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    samples = int(16000 * options["encoder_seconds"])
    clip = np.tile(speech, samples // len(speech) + 1)[:samples]
    features = w2vbert_fast.FbankExtractor()([clip], sampling_rate=16000)["input_features"]
    with torch.inference_mode():
        result["encoder"] = timed_interleaved(
            {"ours": lambda: ours(features), "transformers sdpa": lambda: reference(features)},
            options["encoder_repeats"])
        difference = (ours(features).last_hidden_state - reference(features).last_hidden_state).abs().max().item()
    result["encoder_max_abs_diff"] = difference
    result["encoder_frames"] = features.shape[1]
print(json.dumps(result))
'''


def package_before(folder):
    """The package at BEFORE, unpacked into ``folder``; its root."""
    os.makedirs(folder, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", BEFORE, "w2vbert_fast"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)
    return folder


def run_worker(root, threads, options):
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS=str(threads), W2VBERT_FAST_BACKEND="auto")
    done = subprocess.run([sys.executable, "-c", RUNNER, root, json.dumps(options)], capture_output=True,
                          text=True, env=env, timeout=3600, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{root} with {threads} threads: exit {done.returncode}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class BusyCores:
    """``count`` busy-loop processes for the block's duration (stopped by their own pids)."""

    def __init__(self, count):
        self.count, self.processes = count, []

    def __enter__(self):
        self.processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(1.0)  # let the scheduler spread them
        return self

    def __exit__(self, *exc):
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait()


def environment():
    sys.path.insert(0, ROOT)
    import torch

    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "w2vbert_fast",
                            "benchmarks/bench_cpu_contention.py"], capture_output=True, text=True).stdout.split("\n")
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    return dict(commit=commit, uncommitted=[line[3:] for line in dirty if line.strip()], before=BEFORE[:7],
                python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                cpu_flags=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed feature calls per process (default 10)")
    parser.add_argument("--encoder-repeats", type=int, default=9, help="timed rounds per process, ours and "
                        "transformers alternating (default 9)")
    parser.add_argument("--encoder-seconds", type=float, default=6.0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--no-encoder", action="store_true", help="features only")
    parser.add_argument("--json", help="where to write the results (default: print them)")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    from w2vbert_fast.cli.common import choose_threads

    cpus = choose_threads(environ={}).threads  # the CPUs this process may use (affinity, quota)
    thread_counts = sorted({1, cpus})
    workloads = ["features"] + ([] if args.no_encoder else ["encoder"])
    options = dict(repeats=args.repeats, encoder_repeats=args.encoder_repeats, encoder_seconds=args.encoder_seconds,
                   layers=args.layers)
    result = dict(environment=environment(), cpus=cpus, thread_counts=thread_counts, busy_processes=cpus,
                  options=options, conditions={},
                  note="one fresh process per (condition, threads, package); the machine may be shared: the load "
                       "average before and after each condition says what else ran")
    with tempfile.TemporaryDirectory(prefix="bench_cpu_contention-") as tmp:
        before_root = package_before(os.path.join(tmp, "before"))
        for condition in ("quiet", "loaded"):
            runs = {}
            load_before = os.getloadavg()
            with BusyCores(cpus if condition == "loaded" else 0):
                load_started = os.getloadavg()
                for threads in thread_counts:
                    runs[f"{threads} thread{'s' if threads > 1 else ''}"] = dict(
                        this_checkout=run_worker(ROOT, threads, dict(options, workloads=workloads, transformers=True)),
                        before=run_worker(before_root, threads, dict(options, workloads=["features"],
                                                                      transformers=False)))
            result["conditions"][condition] = dict(
                load_before=[round(x, 2) for x in load_before], load_started=[round(x, 2) for x in load_started],
                load_after=[round(x, 2) for x in os.getloadavg()], runs=runs)
    result["summary"] = summary(result)
    text = json.dumps(result, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


def summary(result):
    """Median ms per (condition, threads): features ours / before / transformers, encoder ours / transformers."""
    rows = {}
    for condition, data in result["conditions"].items():
        for threads, run in data["runs"].items():
            now, before = run["this_checkout"], run["before"]
            row = {"FbankExtractor": now["features"]["FbankExtractor"]["median_ms"],
                   "FbankExtractor before": before["features"]["FbankExtractor"]["median_ms"],
                   "transformers extractor": now["features"]["transformers SeamlessM4TFeatureExtractor"]["median_ms"]}
            if "encoder" in now:
                row["encoder ours"] = now["encoder"]["ours"]["median_ms"]
                row["encoder transformers sdpa"] = now["encoder"]["transformers sdpa"]["median_ms"]
                row["encoder speed-up"] = round(row["encoder transformers sdpa"] / row["encoder ours"], 3)
                per_round = now["encoder"]["ours"].get("ratio_to", {}).get("transformers sdpa")
                if per_round:  # transformers' time over ours, round by round: the less noisy ratio
                    row["encoder speed-up, median per round"] = per_round["median_per_round"]
            rows[f"{condition}, {threads}"] = {k: round(v, 1) if isinstance(v, float) and "speed-up" not in k else v
                                              for k, v in row.items()}
    return rows


if __name__ == "__main__":
    main()
