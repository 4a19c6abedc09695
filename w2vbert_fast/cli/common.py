"""What the commands share: the named architectures of ``--random-weights``, the device and dtype of
``--device`` / ``--dtype``, the model a command runs (from explicit values, never the argparse namespace; loaded by
``extract.pipeline.load_model``), and the usage error that main() prints without a traceback.

And how many threads a command gives torch (the second half): the CPUs this process may really use, not the cores
it can see.

PyTorch starts one intra-op thread per core it sees. In a container whose cgroup CPU quota is below that (the
common case on shared clusters: 4 CPUs' worth of quota on a 64-core host), or under an affinity mask
(``taskset``, a batch scheduler's binding), or beside other busy processes, those threads outnumber the CPU time
there is, and every parallel region waits for a descheduled thread. So ``extract``, ``demo`` and ``bench`` size
torch's threads before any work, in this order:

1. ``--threads N``, when given;
2. ``OMP_NUM_THREADS``, when set (torch reads it too; torchrun sets it to 1 for each of several processes unless it
   is given): the user's choice;
3. the CPUs this process may use: the affinity mask (``os.sched_getaffinity``), capped by the cgroup CPU quota
   (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; the tightest of the process's cgroup
   and its ancestors) rounded down, at least 1; under torchrun divided among the ``LOCAL_WORLD_SIZE`` processes
   of the machine.

The library never changes these global settings (a program that imports it keeps its own); only the commands do.
"""

import contextlib
import math
import os
import sys
from dataclasses import dataclass

import torch

from ..extract.pipeline import ModelSource, load_model

ARCHITECTURES = {
    # facebook/w2v-bert-2.0 (600M parameters)
    "w2v-bert-2.0": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         feature_projection_input_dim=160, hidden_act="swish", position_embeddings_type="relative_key",
                         left_max_position_embeddings=64, right_max_position_embeddings=8,
                         conv_depthwise_kernel_size=31, add_adapter=False),
    # for tests and quick checks: the same structure, small
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 feature_projection_input_dim=160, hidden_act="swish", position_embeddings_type="relative_key",
                 left_max_position_embeddings=64, right_max_position_embeddings=8, conv_depthwise_kernel_size=31,
                 add_adapter=False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(Exception):
    """A usage problem found after parsing (a device that is not there): printed without a traceback, exit 2."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_dtype(device_name=None, dtype_name=None):
    """(torch.device, torch.dtype) of ``--device`` / ``--dtype``: the default device when None, bfloat16 on CUDA
    and float32 on the CPU by default; CommandError for a device that does not exist here."""
    try:
        device = torch.device(device_name or default_device())
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device_name}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {device_name}: this package runs on cpu or cuda (cuda:N), not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device_name}: no CUDA device is available (torch.cuda.is_available() is "
                           f"False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {device_name}: there are {torch.cuda.device_count()} CUDA devices "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    dtype = DTYPES[dtype_name or ("bfloat16" if device.type == "cuda" else "float32")]
    note = slow_dtype_note(device, dtype)
    if note:
        print(note, file=sys.stderr)
    return device, dtype


def cpu_has_amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private in torch 2.x; absent: cannot tell
    return bool(check and check())


def slow_dtype_note(device, dtype):
    """A warning line for ``--dtype bfloat16`` on a CPU without AMX tiles, where bf16 was measured slower than fp32
    (benchmarks/results/cpu-bf16-isa-74483e2.json: oneDNN capped to AVX512-BF16 0.76×, AVX-512 0.28×, AVX2 0.21×
    the fp32 speed, 2 full-size layers at 6 s), or None."""
    if device.type != "cpu" or dtype != torch.bfloat16 or cpu_has_amx():
        return None
    return ("note: this CPU has no AMX tiles; bfloat16 ran at 0.2-0.8x the speed of float32 on such CPUs "
            "(README, 'On a CPU'): --dtype float32 is likely faster here")


def model_source(folder=None, random_weights=None, seed=0) -> ModelSource:
    """``--model FOLDER``, else ``--random-weights ARCH`` with ``--seed``."""
    if folder:
        return ModelSource(folder=folder)
    return ModelSource(architecture=ARCHITECTURES[random_weights], name=random_weights, seed=seed)


def random_model(architecture: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32):
    """A Wav2Vec2BertModel of a named architecture with seeded random weights (built on the CPU, so the same
    seed gives the same weights on any device)."""
    return load_model(model_source(random_weights=architecture, seed=seed), device, dtype)[0]


# ------------------------------------------------------------------------------------------------ threads
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
# where cgroup v1 mounts its cpu controller under CGROUP_ROOT (distributions differ; often both, one a symlink)
V1_CPU_MOUNTS = ("cpu,cpuacct", "cpu", "cpuacct,cpu")


@dataclass(frozen=True)
class ThreadChoice:
    """``threads`` for torch, and ``reason``: where the number came from, for the command's start line."""

    threads: int
    reason: str

    def describe(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads != 1 else ''} ({self.reason})"


def affinity_cpus() -> int:
    """The CPUs this process may be scheduled on (its affinity mask); all the machine's where there is no mask."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _read(path):
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _ancestors(root, path):
    """``root/path`` and each folder above it up to ``root`` itself: a quota set on a parent binds its children."""
    parts = [p for p in path.split("/") if p]
    return [os.path.join(root, *parts[:n]) for n in range(len(parts), -1, -1)]


def _cgroup_paths(proc_cgroup):
    """{"v2": path} and/or {"v1": path} of this process's cgroups, from /proc/self/cgroup."""
    paths = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if controllers == "":
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    return paths


def _v2_limit(folder):
    """CPUs of a cgroup v2 ``cpu.max`` ("QUOTA PERIOD", QUOTA "max" = none), or None."""
    fields = (_read(os.path.join(folder, "cpu.max")) or "").split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder):
    """CPUs of a cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota -1 = none), or None."""
    try:
        quota = int(_read(os.path.join(folder, "cpu.cfs_quota_us")) or "")
        period = int(_read(os.path.join(folder, "cpu.cfs_period_us")) or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_limit(root=None, proc_cgroup=None):
    """The CPUs' worth of time the cgroup CPU quota allows this process (a float, e.g. 1.5), or None when no
    quota applies or none can be read. The tightest quota over the process's cgroup (v2 and v1) and every cgroup
    above it; a path that is not under ``root`` (a container without its own cgroup namespace sees the host's
    path) falls back to the folders that exist, ``root`` itself last."""
    root, proc_cgroup = root or CGROUP_ROOT, proc_cgroup or PROC_CGROUP
    limits = []
    paths = _cgroup_paths(proc_cgroup)
    if "v2" in paths:
        # the unified hierarchy at the root, or beside v1's controllers on a hybrid system
        base = root if os.path.exists(os.path.join(root, "cgroup.controllers")) else os.path.join(root, "unified")
        limits += [_v2_limit(folder) for folder in _ancestors(base, paths["v2"])]
    if "v1" in paths:
        for mount in V1_CPU_MOUNTS:
            base = os.path.join(root, mount)
            if os.path.isdir(base):
                limits += [_v1_limit(folder) for folder in _ancestors(base, paths["v1"])]
                break
    limits = [limit for limit in limits if limit is not None]
    return min(limits) if limits else None


def _omp_threads(value):
    """OMP_NUM_THREADS as torch reads it: the first number of a list ("4,2" → 4); None when not a positive int."""
    try:
        threads = int(value.split(",")[0])
    except ValueError:
        return None
    return threads if threads > 0 else None


def choose_threads(requested=None, environ=None, affinity=None, cgroup_limit=None) -> ThreadChoice:
    """The threads a command gives torch, and why (see the module docstring for the order). ``affinity`` and
    ``cgroup_limit`` default to this process's (:func:`affinity_cpus`, :func:`cgroup_cpu_limit`); ``environ`` to
    ``os.environ``. ValueError for ``requested`` below 1."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--threads must be a positive number of threads, got {requested!r}")
        return ThreadChoice(requested, f"--threads {requested}")
    if environ.get("OMP_NUM_THREADS"):
        value = environ["OMP_NUM_THREADS"]
        threads = _omp_threads(value)
        if threads is not None:
            return ThreadChoice(threads, f"OMP_NUM_THREADS={value} from the environment")
    affinity = affinity_cpus() if affinity is None else affinity
    limit = cgroup_cpu_limit() if cgroup_limit is None else cgroup_limit
    cpus = affinity if limit is None else max(1, min(affinity, math.floor(limit)))
    why = f"affinity {affinity} CPU{'s' if affinity != 1 else ''}, " + (
        "no cgroup CPU quota" if limit is None else f"cgroup CPU quota {limit:g} CPUs")
    if environ.get("OMP_NUM_THREADS"):  # set, but not a number: torch ignores it too
        why += f"; OMP_NUM_THREADS={environ['OMP_NUM_THREADS']!r} is not a positive number, ignored"
    processes = _omp_threads(environ.get("LOCAL_WORLD_SIZE") or "1") or 1
    if processes > 1:
        return ThreadChoice(max(1, cpus // processes), f"the {cpus} CPUs this process may use ({why}) shared by "
                                                       f"{processes} processes on this machine (LOCAL_WORLD_SIZE)")
    return ThreadChoice(cpus, f"the CPUs this process may use: {why}")


def apply_threads(choice: ThreadChoice) -> int:
    """Give torch ``choice.threads`` intra-op threads, and as many inter-op threads where that can still be set
    (only before the first inter-op work, once per process); returns the intra-op count it replaced."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    try:
        torch.set_num_interop_threads(choice.threads)
    except RuntimeError:  # already set, or inter-op work has started: torch allows it once, before any
        pass
    return previous


@contextlib.contextmanager
def command_threads(requested=None):
    """For a command's duration: torch sized by :func:`choose_threads`; yields the choice. The intra-op count is
    restored on the way out (for a program that calls ``cli.main`` itself)."""
    import torch

    from .common import CommandError

    try:
        choice = choose_threads(requested)
    except ValueError as error:  # a bad --threads: a usage error, printed without a traceback
        raise CommandError(str(error)) from None
    previous = apply_threads(choice)
    try:
        yield choice
    finally:
        torch.set_num_threads(previous)
