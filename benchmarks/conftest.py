"""One set-up for every benchmark: device, sizes, timing, and what each result records.

On a GPU the cases run at the real sizes and each call is timed with CUDA events (median of many, warmed up,
inputs rotated so the L2 does not flatter); on a CPU they run at small sizes so anyone can exercise them.
Every result's ``extra_info`` carries the device, torch/triton/transformers versions, the git commit, and the
contender's median ms, peak memory and (when given) TFLOP/s and GB/s: ``scripts``-free, ``benchmarks/report.py``
turns ``--benchmark-json`` output into RESULTS.md.
"""

import functools
import os
import platform
import subprocess
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
if not ON_GPU and "triton" not in sys.modules:
    # Lets a CPU run exercise the Triton kernels too (slowly, at the small sizes).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@functools.lru_cache(maxsize=None)
def environment() -> dict:
    def version(name):
        try:
            return __import__(name).__version__
        except Exception:  # not installed
            return None

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except Exception:
        commit = None
    return {
        "device": torch.cuda.get_device_name() if ON_GPU else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "cuda": torch.version.cuda if ON_GPU else None,
        "commit": commit,
    }


def synchronize():
    if ON_GPU:
        torch.cuda.synchronize()


def time_ms(fn, inputs, warmup=3, repeats=20):
    """Median wall time of ``fn(*inputs[i % len(inputs)])`` in ms; CUDA events on a GPU."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    synchronize()
    times = []
    for i in range(repeats):
        args = inputs[i % len(inputs)]
        if ON_GPU:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            import time

            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


@pytest.fixture
def measure(benchmark):
    """``measure(fn, inputs, case=..., contender=..., flops=None, bytes_moved=None, **extra)``.

    ``inputs`` is a list of argument tuples (several, so rotation defeats the cache); ``fn(*args)`` is one call.
    Runs pytest-benchmark on it (synchronised inside the timed call) and records the CUDA-event median,
    peak memory and throughput in ``extra_info``. Returns the median ms.
    """

    def run(fn, inputs, *, case, contender, flops=None, bytes_moved=None, warmup=3, repeats=20, **extra):
        if ON_GPU:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        median_ms = time_ms(fn, inputs, warmup=warmup, repeats=repeats)
        peak = (torch.cuda.max_memory_allocated() - base) if ON_GPU else None
        counter = iter(range(1 << 62))

        def one_call():
            fn(*inputs[next(counter) % len(inputs)])
            synchronize()

        benchmark.pedantic(one_call, rounds=max(3, repeats // 4), iterations=1, warmup_rounds=1)
        info = benchmark.extra_info
        info.update(environment())
        info.update(case=case, contender=contender, median_ms=median_ms, peak_extra_bytes=peak)
        if flops is not None:
            info["tflops"] = flops / (median_ms * 1e-3) / 1e12
        if bytes_moved is not None:
            info["gbps"] = bytes_moved / (median_ms * 1e-3) / 1e9
        info.update(extra)
        return median_ms

    return run
