"""One set-up for every benchmark: device, sizes, timing, and what each result records.

On a GPU the cases run at the real sizes in bf16 and each call is timed with CUDA events (median of many, warmed
up, inputs rotated so the L2 does not flatter); on a CPU they run at small sizes in fp32 so anyone can exercise
them (a smoke run, not a claim: there "ours" is the PyTorch reference). Every result's ``extra_info`` carries the
device, torch/triton/transformers versions, the git commit, and the contender's median ms, peak memory and (when
given) TFLOP/s and GB/s; ``benchmarks/tools/report.py`` turns ``--benchmark-json`` output into RESULTS.md.

Conventions a bench file follows so the report can read it (all keys of ``extra_info``):

* ``case``: the row group (one table per case and device); ``contender``: the row.
* ``role``: ``"reference"`` for the one contender each case's ratios are taken against (transformers, as a user
  runs it), ``"ceiling"`` for a bound no contender should beat (SDPA without bias, a plain copy of the same bytes);
  absent for everything else. Pass it as ``measure(..., role="reference")``.
* ``flops`` / ``bytes_moved`` → ``tflops`` / ``gbps``; with ``peak_tflops`` / ``peak_gbps`` (see
  :func:`matmul_tflops`, :func:`copy_gbps`) also ``mfu`` / ``copy_fraction``.
* ``audio_seconds`` (the audio one call processes) → ``hours_audio_per_s``.
* ``oom``: True when the contender ran out of GPU memory (then ``median_ms`` is None and ``error`` says what the
  allocator was asked for); the test still passes, so the report can say where a contender stops.
* ``claim``: True when the figure is a measurement of what a user gets at real sizes — every GPU result, and the
  CPU cases that run at real sizes on the CPU path a user runs (feature extraction, ``bench_long_audio``'s
  full-size CPU cases). False for the CPU smoke runs at tiny sizes. A case passes ``claim=True`` to
  ``measure`` to say so on a CPU; the report puts claims and smoke runs under separate headings.
"""

import functools
import gc
import os
import platform
import subprocess
import sys
import time

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
# The dtype the cases run in: bf16 on a GPU (what inference uses), fp32 on a CPU (bf16 matmuls there are slow
# and say nothing).
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
if not ON_GPU and "triton" not in sys.modules:
    # Lets a CPU run exercise the Triton kernels too (slowly, at the small sizes).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def sizes(gpu, cpu):
    """The real size on a GPU, the small one on a CPU: ``SHAPES = sizes([(8, 1500)], [(2, 64)])``."""
    return gpu if ON_GPU else cpu


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
        dirty = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip())
    except Exception:
        commit, dirty = None, None
    return {
        "device": torch.cuda.get_device_name() if ON_GPU else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "cuda": torch.version.cuda if ON_GPU else None,
        "commit": commit,
        "dirty": dirty,  # uncommitted changes to tracked files when it ran
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
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------------- measured ceilings
@functools.lru_cache(maxsize=None)
def matmul_tflops(dtype=DTYPE) -> float:
    """The measured dense matmul rate of this device in ``dtype`` (TFLOP/s), once per session: the denominator of
    MFU. A GPU multiplies 8192² matrices (the rate cuBLAS reaches on large GEMMs); a CPU 1024²."""
    n = 8192 if ON_GPU else 1024
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    pairs = [(torch.randn(n, n, device=DEVICE, generator=generator).to(dtype),
              torch.randn(n, n, device=DEVICE, generator=generator).to(dtype)) for _ in range(2)]
    ms = time_ms(torch.matmul, pairs, warmup=3, repeats=20 if ON_GPU else 5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


@functools.lru_cache(maxsize=None)
def copy_gbps() -> float:
    """The measured device-memory copy bandwidth (GB/s, bytes read + written), once per session: the denominator
    of ``copy_fraction``. 1 GiB buffers on a GPU (well past the L2), 64 MiB on a CPU."""
    numel = (1 << 30 if ON_GPU else 1 << 26) // 4
    sources = [torch.ones(numel, device=DEVICE) for _ in range(2)]
    destination = torch.empty(numel, device=DEVICE)
    ms = time_ms(destination.copy_, [(s,) for s in sources], warmup=3, repeats=20 if ON_GPU else 5)
    del sources, destination
    return 2 * numel * 4 / (ms * 1e-3) / 1e9


def _free_memory():
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


@pytest.fixture
def measure(benchmark):
    """``measure(fn, inputs, case=..., contender=..., flops=None, bytes_moved=None, **extra)``.

    ``inputs`` is a list of argument tuples (several, so rotation defeats the cache); ``fn(*args)`` is one call.
    Runs pytest-benchmark on it (synchronised inside the timed call) and records the CUDA-event median,
    peak memory and throughput in ``extra_info``. Returns the median ms, or None when the GPU ran out of memory
    (recorded as ``oom``; see the module docstring for every key). ``rounds``: pytest-benchmark's rounds
    (default ``max(3, repeats // 4)``); long cases pass 1.
    """

    def run(fn, inputs, *, case, contender, flops=None, bytes_moved=None, warmup=3, repeats=20, rounds=None,
            peak_tflops=None, peak_gbps=None, claim=False, **extra):
        info = benchmark.extra_info
        info.update(environment())
        info.update(case=case, contender=contender, claim=ON_GPU or claim)
        base = 0
        if ON_GPU:
            _free_memory()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        counter = iter(range(1 << 62))

        def one_call():
            fn(*inputs[next(counter) % len(inputs)])
            synchronize()

        oom_message = None
        try:
            median_ms = time_ms(fn, inputs, warmup=warmup, repeats=repeats)
            peak = (torch.cuda.max_memory_allocated() - base) if ON_GPU else None
            benchmark.pedantic(one_call, rounds=rounds or max(3, repeats // 4), iterations=1, warmup_rounds=0)
        except torch.cuda.OutOfMemoryError as error:
            oom_message = str(error).split("\n")[0][:300] or "CUDA out of memory"
        if oom_message is not None:  # outside the except block: its traceback no longer holds the tensors
            peak = (torch.cuda.max_memory_allocated() - base) if ON_GPU else None
            _free_memory()
            # a result entry must exist for the report to show the OOM: time a no-op, flagged
            benchmark.pedantic(lambda: None, rounds=1, iterations=1)
            info.update(extra, oom=True, error=oom_message, median_ms=None, peak_extra_bytes=peak)
            return None
        info.update(median_ms=median_ms, peak_extra_bytes=peak)
        if flops is not None:
            info["flops"] = flops
            info["tflops"] = flops / (median_ms * 1e-3) / 1e12
            if peak_tflops:
                info["peak_tflops"] = peak_tflops
                info["mfu"] = info["tflops"] / peak_tflops
        if bytes_moved is not None:
            info["bytes_moved"] = bytes_moved
            info["gbps"] = bytes_moved / (median_ms * 1e-3) / 1e9
            if peak_gbps:
                info["peak_gbps"] = peak_gbps
                info["copy_fraction"] = info["gbps"] / peak_gbps
        if extra.get("audio_seconds"):
            info["hours_audio_per_s"] = extra["audio_seconds"] / 3600 / (median_ms * 1e-3)
        info.update(extra)
        return median_ms

    return run


def pytest_collect_file(file_path, parent):
    """The suites are ``bench_*.py`` (so ``pytest tests`` never picks them up): collect them here."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        # (a file named on the command line is collected by pytest itself)
        return pytest.Module.from_parent(parent, path=file_path)
