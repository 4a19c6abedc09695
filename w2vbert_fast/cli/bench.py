"""``bench``: in a repository checkout, the benchmark suite (``pytest benchmarks --benchmark-only``) and one table
per run, the report's (pytest-benchmark's own table is turned off: it would show the same cases a second time, in
other units); or, with ``--budget-s``, the one-call campaign."""

import glob
import importlib.util
import os
import runpy
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCHMARKS = os.path.join(REPO, "benchmarks")
# the suite's tools, relative to the repository (as the help text shows them)
TOOLS = os.path.join("benchmarks", "tools")
REPORT = os.path.join(TOOLS, "report.py")
CAMPAIGN = os.path.join(TOOLS, "campaign.py")
# the [test] extras of pyproject.toml, by module name: the suite needs all three
TEST_EXTRAS = {"pytest": "pytest", "pytest_benchmark": "pytest-benchmark", "transformers": "transformers"}


def missing_test_extras() -> list:
    """The [test] extras that are not installed, by package name."""
    return [package for module, package in TEST_EXTRAS.items() if importlib.util.find_spec(module) is None]


def bench(args, pytest_args, threads=None) -> int:
    """``threads``: the ThreadChoice (cli.common) the benchmark processes get, as OMP_NUM_THREADS."""
    if not os.path.isfile(os.path.join(BENCHMARKS, "conftest.py")):
        print("bench needs a checkout of the w2vbert_fast repository (its benchmarks/ folder is not installed with "
              "the package):\n  git clone … && cd w2vbert_fast && pip install -e '.[test]' && "
              "python -m w2vbert_fast bench", file=sys.stderr)
        return 2
    missing = missing_test_extras()
    if missing:
        print(f"bench needs the test extras, and {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
              f"installed: pip install -e \".[test]\" (in {REPO})", file=sys.stderr)
        return 2
    env = dict(os.environ)
    if threads is not None:
        print(f"bench: {threads.describe()}", file=sys.stderr, flush=True)
        env["OMP_NUM_THREADS"] = str(threads.threads)  # the benchmark processes' torch reads it at start
    if args.budget_s is not None:
        campaign = runpy.run_path(os.path.join(REPO, CAMPAIGN), run_name="w2vbert_fast_campaign")
        out = ["--out", args.out] if args.out else []
        saved = os.environ.get("OMP_NUM_THREADS")
        if "OMP_NUM_THREADS" in env:
            os.environ["OMP_NUM_THREADS"] = env["OMP_NUM_THREADS"]  # the campaign's cases inherit it
        try:
            return campaign["main"](["--budget-s", str(args.budget_s), *out, *pytest_args])
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved
    on_gpu = torch.cuda.is_available()
    json_path = args.json or default_json_path(on_gpu)
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    command = [sys.executable, "-m", "pytest", BENCHMARKS, "--benchmark-only", "--benchmark-quiet", "-q",
               f"--benchmark-json={json_path}", *pytest_args]
    print("running: " + " ".join(command), file=sys.stderr, flush=True)
    status = subprocess.run(command, cwd=REPO, env=env).returncode
    if not os.path.isfile(json_path):
        print(f"pytest exited with {status} and wrote no {json_path}", file=sys.stderr)
        return status or 1
    if on_gpu and args.json is None:
        results = sorted(glob.glob(os.path.join(BENCHMARKS, "results", "*.json")))
        subprocess.run([sys.executable, os.path.join(REPO, REPORT), *results, "-o", os.path.join(BENCHMARKS, "RESULTS.md")], check=True)
        print(f"results: {json_path} (commit it) and benchmarks/RESULTS.md (generated)", file=sys.stderr)
    else:
        if not on_gpu:
            print(f"no GPU: CPU smoke run, kept out of benchmarks/results/ ({json_path}); its report:", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(REPO, REPORT), json_path], check=True)
    return status


def default_json_path(on_gpu) -> str:
    """On a GPU benchmarks/results/<gpu>-<commit>-<time>.json (to commit); on a CPU a temporary file."""
    if not on_gpu:
        return os.path.join(tempfile.mkdtemp(prefix="w2vbert_fast-bench-"), "cpu.json")
    name = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name()).strip("-").lower()
    commit = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip() or "nocommit"
    return os.path.join(BENCHMARKS, "results", f"{name}-{commit}-{time.strftime('%Y%m%d-%H%M%S')}.json")
