"""Per-call backend choice shared by every op: ``W2VBERT_FAST_BACKEND=auto|triton|torch``.

``auto`` runs the Triton kernels on CUDA tensors and the PyTorch reference on CPU tensors. ``triton`` forces the
kernels, on CPU tensors too, which only works under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton
is imported): that is how CI, which has no GPU, checks the kernels themselves. ``torch`` forces the reference.
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
