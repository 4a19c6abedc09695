"""The committed CPU peers run, in one command, for a quiet machine:

    python benchmarks/tools/cpu_peers_run.py            # about 45 minutes on 2 cores

runs ``benchmarks/bench_cpu_peers.py`` at full size (``W2VBERT_FAST_CPU_PEERS=1``: 24 layers + adapter, 6 / 20 / 30 s,
every contender in fp32 and bf16 / int8), writes ``benchmarks/results/cpu-peers-<commit>.json`` (each result
carries the load average before its contender; this script adds the load before and after the whole run to the
file's ``machine_info``), then regenerates ``benchmarks/RESULTS.md`` from every file in ``benchmarks/results/``.

It refuses to start when the 1-minute load average is above ``--max-load`` (default 0.5 per CPU this process may
use): on a shared machine the times say more about the neighbours than about the contenders. ``--seconds 6,20``
reruns some lengths only; extra arguments go to pytest (e.g. ``-k "not compile"``). Needs the ``[peers]`` and
``[test]`` extras (``pip install -e ".[test,peers]"``); a missing peer is skipped, named, and its rows are absent.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", default="6,20,30", help="clip lengths, comma-separated (default 6,20,30)")
    parser.add_argument("--max-load", type=float, default=None,
                        help="refuse to start above this 1-minute load average (default 0.5 per usable CPU)")
    parser.add_argument("--json", help="where to write (default benchmarks/results/cpu-peers-<commit>.json)")
    parser.add_argument("--smoke", action="store_true",
                        help="the bench's smoke size instead (1 layer, 2 s: checks the wiring in a minute or two)")
    args, pytest_args = parser.parse_known_args(argv)
    sys.path.insert(0, ROOT)
    from w2vbert_fast.cli.common import choose_threads

    cpus = choose_threads(environ={}).threads
    max_load = args.max_load if args.max_load is not None else 0.5 * cpus
    load_before = os.getloadavg()
    if load_before[0] > max_load:
        print(f"the 1-minute load average is {load_before[0]:.2f}, above {max_load:.2f} ({cpus} CPUs): not a quiet "
              f"machine; wait, or pass --max-load", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short=7", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "nocommit"
    path = args.json or os.path.join(RESULTS, f"cpu-peers-{commit}.json")
    env = dict(os.environ, W2VBERT_FAST_CPU_PEERS="0" if args.smoke else "1", CUDA_VISIBLE_DEVICES="",
               W2VBERT_FAST_CPU_PEERS_SECONDS="" if args.smoke else args.seconds,
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(cpus)))
    command = [sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks", "bench_cpu_peers.py"),
               "--benchmark-only", "--benchmark-quiet", "-q", "-p", "no:cacheprovider", f"--benchmark-json={path}",
               *pytest_args]
    print(f"load {load_before[0]:.2f}; running ({env['OMP_NUM_THREADS']} threads): {' '.join(command)}",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    status = subprocess.run(command, cwd=ROOT, env=env).returncode
    minutes = (time.perf_counter() - started) / 60
    if not os.path.isfile(path):
        print(f"pytest exited with {status} and wrote no {path}", file=sys.stderr)
        return status or 1
    with open(path) as f:
        document = json.load(f)
    document.setdefault("machine_info", {}).update(load_before=[round(x, 2) for x in load_before],
                                                   load_after=[round(x, 2) for x in os.getloadavg()],
                                                   run_minutes=round(minutes, 1), threads=int(env["OMP_NUM_THREADS"]))
    with open(path, "w") as f:
        json.dump(document, f, indent=1)
    if os.path.dirname(os.path.abspath(path)) == RESULTS:  # a committed result: the report follows it
        results = sorted(os.path.join(RESULTS, name) for name in os.listdir(RESULTS) if name.endswith(".json"))
        subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tools", "report.py"), *results, "-o",
                        os.path.join(ROOT, "benchmarks", "RESULTS.md")], check=True)
        print(f"commit {os.path.relpath(path, ROOT)} and benchmarks/RESULTS.md", file=sys.stderr)
    print(f"{minutes:.1f} min; pytest status {status}; {path}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
