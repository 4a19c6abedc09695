"""What every op shares: the per-call backend choice, the validation policy, the input checks and the launch
metadata the compile check reads.

``W2VBERT_FAST_BACKEND=auto|triton|torch``: ``auto`` runs the Triton kernels on CUDA tensors and each op's fast
PyTorch path on CPU tensors (for attention the chunked O(L) path, not the literal reference). ``triton`` forces
the kernels, on CPU tensors too, which only works under Triton's interpreter (``TRITON_INTERPRET=1`` set before
triton is imported): that is how CI, which has no GPU, checks the kernels themselves. ``torch`` forces the literal
references (the tests' oracle). Every op asks :func:`dispatch` which of the three runs.

``W2VBERT_FAST_VALIDATE=auto|1|0`` says when value checks that need the host run (see :func:`checks_values`).
"""

import dataclasses
import os
from typing import Callable, Dict, Tuple

import torch

BACKENDS = ("auto", "triton", "torch")


def _environment_choice(variable: str, choices: tuple) -> str:
    """``variable``'s value, one of ``choices`` (the first is the default), read at every call so tests can switch
    it; anything else is a ValueError naming the variable."""
    name = os.environ.get(variable, choices[0]).strip().lower() or choices[0]
    if name not in choices:
        raise ValueError(f"{variable} must be one of {choices}, got {name!r}")
    return name


def backend() -> str:
    """``W2VBERT_FAST_BACKEND``: the backend asked for."""
    return _environment_choice("W2VBERT_FAST_BACKEND", BACKENDS)


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an op called on ``tensors`` should launch its Triton kernel (True) or its PyTorch reference (False)."""
    name = backend()
    if name == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if name == "auto":
        return on_cuda
    if not on_cuda and not triton_interpreter_enabled():
        raise RuntimeError(
            "W2VBERT_FAST_BACKEND=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, or use W2VBERT_FAST_BACKEND=auto|torch"
        )
    return True


# What dispatch() returns: which code computes an op for this call.
TRITON = "triton"  # the Triton kernels (on a GPU, or under the interpreter)
FAST = "fast"  # the op's fast PyTorch path (the CPU product path)
REFERENCE = "reference"  # the literal transformers-style reference (``W2VBERT_FAST_BACKEND=torch``)
# The input dtypes the kernels are compiled and checked for on a GPU (benchmarks/tools/compile_check.py).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dispatch(*tensors: torch.Tensor, kernel_dtypes=KERNEL_DTYPES) -> str:
    """The one dispatch rule of every op: TRITON, FAST or REFERENCE for a call on ``tensors``.

    ``torch`` → REFERENCE; ``triton`` or ``auto`` on CUDA tensors → TRITON, except for an input dtype outside
    ``kernel_dtypes`` on a real GPU (no compiled, checked config exists for it: REFERENCE; the interpreter takes
    every dtype); ``auto`` on CPU tensors → FAST. Reads only devices and dtypes: no host sync.
    """
    if backend() == "torch":
        return REFERENCE
    if not use_triton(*tensors):
        return FAST
    dtype = next(t.dtype for t in tensors if t is not None)
    if dtype not in kernel_dtypes and not triton_interpreter_enabled():
        return REFERENCE
    return TRITON


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """How one kernel is launched, for the compile check (``LAUNCH_META`` at the end of each op file: {kernel
    name: KernelLaunch}); the op's own launcher code computes the same arguments, so there is no second copy.

    kernel: what the launcher calls (the autotuner, or the JIT function).
    args(shape, dtype) → {argument name: example}: a torch dtype for a pointer, a Python scalar for the rest,
    constexprs included, except a config's meta-parameters. ``shape`` is a dict with batch, length, heads,
    head_dim, left, right, kernel_size, samples; ``dtype`` the input dtype's name ("bfloat16", "float16", ...).
    configs(dtype) → [triton.Config] the launcher may run on a GPU for inputs of that dtype.
    dtypes: the input dtypes it is launched with. expect: machine-code expectations the check enforces
    ("mma_in_half", "mma_in_fp32", "no_fp64", "no_local").
    """

    kernel: object
    args: Callable[[Dict[str, int], str], Dict[str, object]]
    configs: Callable[[str], list]
    dtypes: Tuple[str, ...] = ("bfloat16", "float16", "float32")
    expect: Tuple[str, ...] = ("no_local",)


def check_lengths(lengths, batch: int) -> None:
    """The shape and dtype checks every op makes of its optional (batch,) integer ``lengths``."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch:
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a (batch,) = ({batch},) integer tensor, got {shape}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")


VALIDATE_MODES = ("auto", "1", "0")


def validate_mode() -> str:
    """``W2VBERT_FAST_VALIDATE=auto|1|0``: whether value checks that need the host run."""
    return _environment_choice("W2VBERT_FAST_VALIDATE", VALIDATE_MODES)


def checks_values(*tensors: torch.Tensor) -> bool:
    """Whether host-side checks of tensors' values (a mask's 0/1 and right padding, lengths in range) run now.

    Reading a CUDA tensor's values on the host is a device sync (it stalls the launch queue and breaks CUDA-graph
    capture), and under torch.compile it is a data-dependent branch (a graph break, an error with
    ``fullgraph=True``). So: never while compiling or capturing a CUDA graph; otherwise ``W2VBERT_FAST_VALIDATE=1``
    checks on every device (a debug flag: one sync per check), ``0`` never, ``auto`` (the default) only when all
    tensors are on the CPU, where the check costs no sync. Unchecked values are made safe on the device instead
    (the kernels clamp lengths to [1, L]); shape and dtype checks never depend on this.
    """
    if torch.compiler.is_compiling():
        return False
    mode = validate_mode()
    if mode == "0":
        return False
    on_cpu = all(t.device.type == "cpu" for t in tensors if t is not None)
    if mode == "1":
        return on_cpu or not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
    return on_cpu


def values_checkable(lengths: torch.Tensor) -> bool:
    """Whether an op checks ``lengths``' values (see :func:`checks_values`). The kernels clamp lengths, so unchecked
    values stay in bounds."""
    return lengths.numel() > 0 and checks_values(lengths)
