"""The one GPU call: every GPU-only test and benchmark, in priority order, inside a time budget.

    PYTHONPATH=. python -m w2vbert_fast bench --budget-s 480 --out "$OUT"
    (or: PYTHONPATH=. python benchmarks/tools/campaign.py --budget-s 480 --out "$OUT")

Lent GPU time is short, so nothing here may be lost to a timeout: each case is its own pytest process (a crash
or a hang ends that case only) with a timeout of what is left of the budget (and at most the case's own cap), and
the plugin ``benchmarks/tools/campaign_plugin.py`` appends each finished test's outcome and benchmark result to
``NN-case.jsonl`` and fsyncs it at once. After each case the campaign appends the case's status to ``campaign.jsonl`` and rewrites
``campaign-results.json`` (pytest-benchmark's format: ``benchmarks/tools/report.py`` reads it) and ``summary.txt`` (the
one-screen summary against the targets of issues 3-6 and 9, also printed). Autotuning is capped
(``W2VBERT_FAST_AUTOTUNE_MAX_CONFIGS``, default 3: each autotuner tries only its first configs).

On a CPU the same cases run at the benchmarks' small sizes as a smoke test (CI runs it with a tiny budget); the
GPU-only tests then select nothing.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

BENCHMARKS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this file is in benchmarks/tools/
REPO = os.path.dirname(BENCHMARKS)
RESERVE_S = 5.0  # kept back from the last case for the merge and the summary
MIN_CASE_S = 10.0  # a case is not started with less than this left (a GPU case could not even import)


@dataclass
class Case:
    name: str
    args: list  # pytest arguments, paths relative to the repository root
    cap_s: float  # the most a case may take of the budget on a GPU
    what: str


BENCH = ["--benchmark-only"]
CASES = [  # priority order: what answers the most open questions first
    # a test file that does not import (someone's work in progress) must not cost the other files their run
    Case("gpu-tests", ["tests", "--campaign-gpu-only", "--continue-on-collection-errors",
                       "--ignore=tests/test_compile_model.py"], 120,
         "GPU-only tests: bf16 accuracy, memory linear in L, length clamping, training on the GPU"),
    Case("gpu-graphs", ["tests/test_compile_model.py", "--campaign-gpu-only"], 90,
         "GPU-only tests: no host sync on the masked forward, CUDA graph capture, reduce-overhead compile"),
    Case("attention-L1500", ["benchmarks/bench_rel_key_attention.py", "-k", "core and B16-L1500", *BENCH], 60,
         "attention kernel at L = 1500 against transformers, FlexAttention and SDPA without bias"),
    Case("conv", ["benchmarks/bench_conv_module.py", "-k", "not training", *BENCH], 60,
         "conv module and its fused middle against eager, torch.compile and the copy floor"),
    Case("fbank", ["benchmarks/bench_features.py", *BENCH], 60, "features: our GPU kernel against transformers"),
    Case("encoder", ["benchmarks/bench_encoder.py", "-k", "test_encoder and not compile and not transformers",
                     *BENCH], 60, "encoder B=8 x 30 s: ours, ours + CUDA graph"),
    Case("encoder-reference", ["benchmarks/bench_encoder.py", "-k", "test_encoder and sdpa and not compile",
                               *BENCH], 60, "encoder B=8 x 30 s: transformers sdpa (the reference)"),
    Case("long-audio", ["benchmarks/bench_long_audio.py", *BENCH], 120, "5, 20, 60 minutes in one pass"),
    Case("encoder-compiled", ["benchmarks/bench_encoder.py", "-k", "test_encoder and compile", *BENCH], 180,
         "encoder B=8 x 30 s under torch.compile: ours (fullgraph) and transformers sdpa"),
    Case("encoder-eager", ["benchmarks/bench_encoder.py", "-k", "test_encoder and eager", *BENCH], 60,
         "encoder B=8 x 30 s: transformers eager"),
    Case("attention-rest", ["benchmarks/bench_rel_key_attention.py", "-k", "not (core and B16-L1500)", *BENCH], 120,
         "attention at the other lengths and the whole self-attention module"),
    Case("training", ["benchmarks/bench_training.py", *BENCH], 180, "training step and the longest trainable clip"),
    Case("conv-training", ["benchmarks/bench_conv_module.py", "-k", "training", *BENCH], 60,
         "conv middle forward + backward"),
    Case("waveform", ["benchmarks/bench_encoder.py", "-k", "waveform", *BENCH], 60,
         "waveform to hidden state, features included"),
]


# ------------------------------------------------------------------------------------------------- running
def read_jsonl(path):
    records = []
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut by a kill: the ones before it stand
    return records


def run_case(case, index, out, timeout_s, env, python=sys.executable):
    """One pytest process for ``case``, killed (its whole process group) after ``timeout_s``. Returns its status
    record: passed | failed | timeout | nothing-selected, with rc, wall time and test counts."""
    stem = os.path.join(out, f"{index:02d}-{case.name}")
    jsonl = stem + ".jsonl"
    command = [python, "-m", "pytest", *case.args, "-q", "-p", "benchmarks.tools.campaign_plugin",
               f"--campaign-jsonl={jsonl}",
               "-p", "no:cacheprovider"]
    start = time.monotonic()
    with open(stem + ".log", "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        try:
            rc = process.wait(timeout=max(timeout_s, 0.1))
            status = {0: "passed", 5: "nothing-selected"}.get(rc, "failed")
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the results so far are on disk already
            process.wait()
            rc, status = None, "timeout"
    records = read_jsonl(jsonl)
    tests = [r for r in records if r.get("type") == "test"]
    ended = {r["nodeid"] for r in tests}
    running = [r["nodeid"] for r in records if r.get("type") == "start" and r["nodeid"] not in ended]
    counts = {}
    for r in tests:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return {"case": case.name, "what": case.what, "status": status, "rc": rc,
            "wall_s": round(time.monotonic() - start, 2), "timeout_s": round(timeout_s, 2), "tests": counts,
            "failed": [r["nodeid"] for r in tests if r["outcome"] == "failed"],
            "killed_in": running[-1] if status == "timeout" and running else None,
            "log": os.path.basename(stem) + ".log"}


def case_environment(autotune_max_configs):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    env["W2VBERT_FAST_AUTOTUNE_MAX_CONFIGS"] = str(autotune_max_configs)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ------------------------------------------------------------------------------------------------- merging
def merged_document(out, environment):
    """Every benchmark result of every case so far, as one pytest-benchmark document."""
    results = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".jsonl") and name != "campaign.jsonl":
            results += [r["benchmark"] for r in read_jsonl(os.path.join(out, name)) if r.get("type") == "benchmark"]
    return {"datetime": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()), "version": "campaign",
            "machine_info": environment, "commit_info": {"id": environment.get("commit")}, "benchmarks": results}


def write_atomically(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- targets
def rows_by_case(document):
    cases = {}
    for result in document["benchmarks"]:
        info = result.get("extra_info") or {}
        if "case" in info and "contender" in info:
            cases.setdefault(info["case"], {})[info["contender"]] = info
    return cases


def _ms(row):
    return None if row is None or row.get("oom") else row.get("median_ms")


def _find(cases, case_start, contender):
    """The row of ``contender`` (its exact name, else the first name starting with it) in the first case whose
    name starts with ``case_start``."""
    for case, rows in cases.items():
        if case.startswith(case_start):
            if contender in rows:
                return rows[contender]
            return next((row for name, row in rows.items() if name.startswith(contender)), None)
    return None


def speedup(cases, case, ours, other):
    a, b = _ms(_find(cases, case, ours)), _ms(_find(cases, case, other))
    return None if a is None or b is None else b / a


def targets(cases):
    """(issue, target, measured value or None, bound, higher_is_better, unit) for each GPU target."""
    att, enc = "rel_key_attention core B16-L1500", "encoder B8 x 30 s"
    mfu = (_find(cases, enc, "ours") or {}).get("mfu")
    conv_middle = next((r for c, rows in cases.items() if c.startswith("conv middle B8") for n, r in rows.items()
                        if n == "ours" and r.get("copy_fraction") is not None), {})
    fbank = next((r for c, rows in cases.items() if c.startswith("features") for n, r in rows.items()
                  if n.startswith("ours") and "GPU" in n and r.get("hours_audio_per_s")), {})
    hour = _find(cases, "long audio 60 min", "ours")
    training = "training step B8 x 30 s"
    return [
        (3, "attention L=1500 vs SDPA without bias (ceiling)", speedup(cases, att, "ours", "sdpa, no bias"), 0.8, True, "x"),
        (3, "attention L=1500 vs transformers bias + sdpa", speedup(cases, att, "ours", "transformers"), 4.0, True, "x"),
        (3, "attention L=1500 vs FlexAttention", speedup(cases, att, "ours", "flex"), 2.0, True, "x"),
        (4, "conv middle, fraction of copy bandwidth", conv_middle.get("copy_fraction"), 0.85, True, ""),
        (4, "conv module vs transformers eager", speedup(cases, "conv module B8", "ours", "transformers eager"), 2.0, True, "x"),
        (4, "conv module vs torch.compile(transformers)", speedup(cases, "conv module B8", "ours", "torch.compile"), 1.0, True, "x"),
        (5, "features, hours of audio per second", fbank.get("hours_audio_per_s"), 200.0, True, " h/s"),
        (6, "encoder vs transformers sdpa", speedup(cases, enc, "ours", "transformers sdpa"), 2.5, True, "x"),
        (6, "encoder vs torch.compile(transformers sdpa)", speedup(cases, enc, "ours", "torch.compile(transformers"), 1.5, True, "x"),
        (6, "encoder MFU", mfu, 0.5, True, ""),
        (11, "encoder: ours + CUDA graph vs ours", speedup(cases, enc, "ours + CUDA graph", "ours"), 1.0, True, "x"),
        (6, "long audio, 60 min in seconds", None if _ms(hour) is None else _ms(hour) / 1e3, 15.0, False, " s"),
        (9, "training step vs transformers sdpa", speedup(cases, training, "ours", "transformers sdpa"), 1.8, True, "x"),
    ]


def summary(statuses, document, budget_s, elapsed_s, environment):
    lines = [f"w2vbert_fast campaign on {environment.get('device')} (torch {environment.get('torch')}, triton "
             f"{environment.get('triton')}, commit {str(environment.get('commit'))[:10]}): {elapsed_s:.0f} s of "
             f"{budget_s:.0f} s budget", ""]
    lines.append(f"{'case':<18} {'status':<16} {'wall s':>7}  tests")
    for s in statuses:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(s.get("tests", {}).items())) or "-"
        lines.append(f"{s['case']:<18} {s['status']:<16} {s.get('wall_s', 0):>7.1f}  {counts}")
        for nodeid in s.get("failed", [])[:5]:
            lines.append(f"{'':<18} FAILED {nodeid}")
        if s.get("killed_in"):
            lines.append(f"{'':<18} stopped in {s['killed_in']}")
    lines += ["", f"{'issue':<6}{'target':<50}{'measured':>12}{'bound':>10}  verdict"]
    for issue, name, value, bound, higher, unit in targets(rows_by_case(document)):
        if value is None:
            measured, verdict = "-", "not measured"
        else:
            measured = f"{value:.3g}{unit}"
            verdict = "met" if (value >= bound if higher else value <= bound) else "MISSED"
        lines.append(f"{issue:<6}{name:<50}{measured:>12}{('>= ' if higher else '<= ') + f'{bound:g}':>10}  {verdict}")
    lines.append(f"\n{len(document['benchmarks'])} benchmark results; tables: python benchmarks/tools/report.py "
                 "campaign-results.json")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- main
def load_benchmarks_conftest():
    """benchmarks/conftest.py under its own name (``conftest`` may be tests/conftest.py in this process)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("w2vbert_fast_benchmarks_conftest",
                                                  os.path.join(BENCHMARKS, "conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def default_out():
    if os.environ.get("OUT"):
        return os.environ["OUT"]
    return os.path.join(BENCHMARKS, "results", "campaign-" + time.strftime("%Y%m%d-%H%M%S"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget for the whole campaign")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT, else benchmarks/results/campaign-…)")
    parser.add_argument("--cases", default=None,
                        help=f"comma-separated subset, in priority order anyway; of: {', '.join(c.name for c in CASES)}")
    parser.add_argument("--autotune-max-configs", type=int, default=3,
                        help="each Triton autotuner tries only its first N configs (default 3)")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.autotune_max_configs < 1:
        parser.error(f"--autotune-max-configs must be at least 1, got {args.autotune_max_configs}")
    cases = CASES
    if args.cases:
        wanted = [name.strip() for name in args.cases.split(",") if name.strip()]
        unknown = sorted(set(wanted) - {c.name for c in CASES})
        if unknown:
            parser.error(f"--cases: unknown case(s) {unknown}; known: {[c.name for c in CASES]}")
        cases = [c for c in CASES if c.name in wanted]
    start = time.monotonic()
    out = os.path.abspath(args.out or default_out())
    os.makedirs(out, exist_ok=True)

    bench_conftest = load_benchmarks_conftest()  # the same record every benchmark result carries
    env_info, on_gpu = bench_conftest.environment(), bench_conftest.ON_GPU
    env = case_environment(args.autotune_max_configs)
    statuses = []
    for index, case in enumerate(cases, start=1):
        left = args.budget_s - (time.monotonic() - start) - RESERVE_S
        if left < MIN_CASE_S:
            status = {"case": case.name, "what": case.what, "status": "skipped (budget)", "wall_s": 0.0}
        else:
            timeout = min(left, case.cap_s) if on_gpu else left
            print(f"[{time.monotonic() - start:6.1f} s] {case.name}: {case.what} (up to {timeout:.0f} s)", flush=True)
            status = run_case(case, index, out, timeout, env)
        statuses.append(status)
        with open(os.path.join(out, "campaign.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(status) + "\n")
        document = merged_document(out, env_info)
        write_atomically(os.path.join(out, "campaign-results.json"), json.dumps(document, indent=1, default=str))
        text = summary(statuses, document, args.budget_s, time.monotonic() - start, env_info)
        write_atomically(os.path.join(out, "summary.txt"), text + "\n")
    print(text)
    print(f"\nresults in {out}")
    bad = [s for s in statuses if s["status"] in ("failed",)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
