"""pytest plugin for benchmarks/tools/campaign.py (``-p benchmarks.tools.campaign_plugin``): what one case's pytest
run needs so that a timeout loses nothing and autotuning cannot eat the budget.

* ``--campaign-jsonl FILE``: after each test, one JSON line is appended and flushed to disk: the test's outcome
  and, when it ran a pytest-benchmark, the result as pytest-benchmark would write it in ``--benchmark-json``
  (``name``, ``fullname``, ``stats``, ``extra_info``), so the campaign can merge it into a file report.py reads.
* ``--campaign-gpu-only``: keep only the tests marked GPU-only (a ``skipif`` whose reason names a GPU or CUDA).
* ``W2VBERT_FAST_AUTOTUNE_MAX_CONFIGS=N``: every Triton autotuner in ``w2vbert_fast.ops`` tries only its first N
  configs per launch (each file lists its configs best first; per precision where it prunes by one), applied once
  the ops are imported, before any test runs.
"""

import importlib
import json
import os
import pkgutil
import time

import pytest


def pytest_addoption(parser):
    group = parser.getgroup("campaign")
    group.addoption("--campaign-jsonl", default=None, help="append one JSON line per finished test to this file")
    group.addoption("--campaign-gpu-only", action="store_true", help="run only the GPU-only tests")


def cap_autotuner(autotuner, limit: int) -> bool:
    """Make ``autotuner`` try at most ``limit`` configs per launch; whether anything was cut. An autotuner whose
    ``early_config_prune`` picks the configs of a launch (attention: per input precision) is capped after it, so
    every launch keeps its own first configs; any other loses the configs past ``limit``."""
    prune = autotuner.early_config_prune
    if prune is not None:
        def capped(configs, named_args, **kwargs):
            return prune(configs, named_args, **kwargs)[:limit]

        autotuner.early_config_prune = capped
        return len(autotuner.configs) > limit
    if len(autotuner.configs) > limit:
        autotuner.configs = autotuner.configs[:limit]
        return True
    return False


def cap_autotuners(limit: int) -> list:
    """Cap every ``triton.runtime.autotuner.Autotuner`` found in the ``w2vbert_fast.ops`` modules at ``limit``
    configs per launch (``cap_autotuner``); returns ``[(module.name, configs before, limit)]`` of those cut."""
    from triton.runtime.autotuner import Autotuner

    import w2vbert_fast.ops as ops

    capped = []
    for info in pkgutil.iter_modules(ops.__path__):
        module = importlib.import_module(f"{ops.__name__}.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, Autotuner):
                before = len(value.configs)
                if cap_autotuner(value, limit):
                    capped.append((f"{module.__name__}.{name}", before, limit))
    return capped


def pytest_configure(config):
    limit = os.environ.get("W2VBERT_FAST_AUTOTUNE_MAX_CONFIGS")
    if limit:
        if not limit.isdigit() or int(limit) < 1:
            raise pytest.UsageError(f"W2VBERT_FAST_AUTOTUNE_MAX_CONFIGS must be a positive integer, got {limit!r}")
        config._campaign_capped = cap_autotuners(int(limit))


def is_gpu_only(item) -> bool:
    for mark in item.iter_markers("skipif"):
        reason = str(mark.kwargs.get("reason", ""))
        if "GPU" in reason or "CUDA" in reason:
            return True
    return False


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--campaign-gpu-only"):
        return
    selected = [item for item in items if is_gpu_only(item)]
    deselected = [item for item in items if not is_gpu_only(item)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = selected


def append_line(path, record):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def benchmark_record(item):
    fixture = getattr(item, "funcargs", {}).get("benchmark")
    stats = getattr(fixture, "stats", None)
    if stats is None:
        return None
    record = stats.as_dict(include_data=False)
    record["extra_info"] = dict(getattr(fixture, "extra_info", {}) or {})
    return record


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """A line as each test starts: when a case is killed, the test it was in is the last one started, not ended."""
    path = item.config.getoption("--campaign-jsonl")
    if path is not None:
        append_line(path, {"type": "start", "nodeid": item.nodeid, "time": time.time()})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    path = item.config.getoption("--campaign-jsonl")
    report = outcome.get_result()
    if path is None or not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    record = {"type": "test", "nodeid": item.nodeid, "outcome": report.outcome, "duration_s": report.duration,
              "time": time.time()}
    if report.skipped and isinstance(report.longrepr, tuple):
        record["message"] = report.longrepr[2]
    elif report.failed:
        record["message"] = str(report.longrepr)[-2000:]
    append_line(path, record)
    if report.when == "call":
        result = benchmark_record(item)
        if result is not None:
            append_line(path, {"type": "benchmark", "benchmark": result})
