"""Per-call backend choice shared by every op: ``W2VBERT_FAST_BACKEND=auto|triton|torch``.

``auto`` runs the Triton kernels on CUDA tensors and the PyTorch reference on CPU tensors. ``triton`` forces the
kernels, on CPU tensors too, which only works under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton
is imported): that is how CI, which has no GPU, checks the kernels themselves. ``torch`` forces the reference.

``W2VBERT_FAST_VALIDATE=auto|1|0`` says when value checks that need the host run (see :func:`checks_values`).
"""

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def backend() -> str:
    """The backend asked for by the environment, read at every call so tests can switch it."""
    name = os.environ.get("W2VBERT_FAST_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"W2VBERT_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


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


def check_lengths(lengths, batch: int) -> None:
    """The shape and dtype checks every op makes of its optional (batch,) integer ``lengths``."""
    if not isinstance(lengths, torch.Tensor) or lengths.dim() != 1 or lengths.shape[0] != batch:
        shape = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a (batch,) = ({batch},) integer tensor, got {shape}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")


VALIDATE_MODES = ("auto", "1", "0")


def validate_mode() -> str:
    """``W2VBERT_FAST_VALIDATE=auto|1|0``, read at every call: whether value checks that need the host run."""
    name = os.environ.get("W2VBERT_FAST_VALIDATE", "auto").strip().lower() or "auto"
    if name not in VALIDATE_MODES:
        raise ValueError(f"W2VBERT_FAST_VALIDATE must be one of {VALIDATE_MODES}, got {name!r}")
    return name


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
