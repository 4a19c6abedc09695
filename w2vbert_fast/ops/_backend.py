"""What every op shares: the per-call backend choice and its dispatch table, the validation policy, the input checks
and the launch metadata the compile check reads.

``W2VBERT_FAST_BACKEND=auto|triton|portable|torch``, read at every call; every op asks :func:`dispatch` which code
runs (TRITON, FAST or REFERENCE):

- ``auto`` (the default): on CUDA tensors, per (GPU arch, input dtype, op), the table below — the Triton kernels where
  the compile check shows them clean, the op's portable PyTorch path elsewhere; on CPU tensors the fast PyTorch path.
- ``portable``: the portable path everywhere (on a GPU: attention band-decomposed over PyTorch's own CUDA attention
  kernels, the conv module as PyTorch ops; on a CPU the same as ``auto``).
- ``triton``: the kernels, whatever the table says, on CPU tensors too, which only works under Triton's interpreter
  (``TRITON_INTERPRET=1`` set before triton is imported): that is how CI, which has no GPU, checks the kernels.
- ``torch``: the literal references (the tests' oracle).

:func:`describe` says what ``auto`` does on a device, op by op and dtype by dtype, and why.

``W2VBERT_FAST_VALIDATE=auto|1|0`` says when value checks that need the host run (see :func:`checks_values`).
"""

import dataclasses
import os
from typing import Callable, Dict, Tuple

import torch

BACKENDS = ("auto", "triton", "portable", "torch")


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


# What dispatch() returns: which code computes an op for this call.
TRITON = "triton"  # the Triton kernels (on a GPU, or under the interpreter)
FAST = "fast"  # the op's fast PyTorch path: the CPU product path, and on a GPU the portable path
REFERENCE = "reference"  # the literal transformers-style reference (``W2VBERT_FAST_BACKEND=torch``)
# The input dtypes the kernels are compiled and checked for on a GPU (benchmarks/tools/compile_check.py).
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Per op, the input dtypes its kernels (and its portable GPU path) take on a GPU; others run the reference there.
# The fbank's launcher casts any float samples to fp32.
OP_DTYPES = {
    "rel_key_attention": KERNEL_DTYPES,
    "glu_depthwise_conv": KERNEL_DTYPES,
    "log_mel_fbank": KERNEL_DTYPES + (torch.float64,),
}

# ------------------------------------------------------------------------------------------ the dispatch table
# What ``auto`` runs on a CUDA GPU: per op, the archs and input dtypes on which the Triton kernels run; every other
# (arch, dtype) runs the op's portable path (FAST). An entry is here only where benchmarks/tools/compile_check.py,
# on triton 3.6 and 3.9, finds every config the launcher may run for that dtype clean on that arch: tensor-core MMA
# on every dot that asks for it, no spill, at least 12 warps resident per SM (the check fails if an entry here is not;
# benchmarks/RESULTS.md lists the archs routed elsewhere). An arch not listed at all — older than sm_75, or newer than
# sm_90 (Blackwell: not compiled yet) — runs the portable path. No GPU has timed either path yet (issue 20 item 5):
# the sm_80/sm_90 entries are the kernels by construction, not by a measurement.
ARCHS = {(7, 5): "sm_75", (8, 0): "sm_80", (8, 6): "sm_86", (8, 9): "sm_89", (9, 0): "sm_90"}
_ALL = ("float16", "bfloat16", "float32")
TRITON_TABLE = {
    "rel_key_attention": {"sm_80": _ALL, "sm_86": ("float16", "bfloat16"), "sm_89": ("float16", "bfloat16"),
                          "sm_90": _ALL},
    "glu_depthwise_conv": {"sm_75": ("float16", "float32"), "sm_80": _ALL, "sm_86": ("float16",),
                           "sm_89": ("float16",), "sm_90": _ALL},
    "log_mel_fbank": {arch: _ALL + ("float64",) for arch in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90")},
}
# Why an arch of ARCHS runs an op's portable path (for the dtypes its TRITON_TABLE entry leaves out).
_SM86_ATTENTION = ("in fp32, with 100 KB of shared memory per SM, the forward's 16x64 8-warp tile (52 KB) leaves 8 "
                   "warps resident per SM (triton 3.6 and 3.9)")
PORTABLE_WHY = {
    ("rel_key_attention", "sm_75"): "Triton compiles every attention dot without tensor-core MMA on sm_75 "
                                    "(FMA units, 245-255 registers, spills)",
    ("rel_key_attention", "sm_86"): _SM86_ATTENTION,
    ("rel_key_attention", "sm_89"): _SM86_ATTENTION,
    ("glu_depthwise_conv", "sm_86"): "a bf16 backward and an fp32 forward config spill 8 B a thread on sm_86",
    ("glu_depthwise_conv", "sm_89"): "a bf16 backward and an fp32 forward config spill 4-8 B a thread on sm_89",
}
# Ops that compute in their input dtype on a GPU, so a device without that dtype cannot run them at all.
_DTYPE_BOUND_OPS = ("rel_key_attention", "glu_depthwise_conv")
# The oldest arch with each dtype's tensor-core arithmetic (bf16: Ampere).
DTYPE_MIN_CAPABILITY = {torch.bfloat16: (8, 0)}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What an op runs for one call (``path``: TRITON, FAST or REFERENCE) and why, in words."""

    path: str
    why: str


def arch_name(capability) -> str:
    return ARCHS.get(tuple(capability), f"sm_{capability[0]}{capability[1]}")


@torch.compiler.assume_constant_result
def device_capability(device: torch.device) -> tuple:
    """(major, minor) of a CUDA device (a property: no sync; a constant under torch.compile)."""
    return tuple(torch.cuda.get_device_capability(device))


def device_of(*tensors) -> torch.device:
    """The device an op's call runs on: its first tensor's (the ops check that all share one)."""
    return next(t.device for t in tensors if t is not None)


def _device_name(device) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except (RuntimeError, AssertionError, AttributeError):  # a patched capability with no device behind it
        return "this GPU"


def check_device_dtype(op: str, device: torch.device, dtype: torch.dtype) -> None:
    """A ValueError naming the dtype when the GPU lacks it (bf16 before Ampere) and ``op`` computes in it."""
    need = DTYPE_MIN_CAPABILITY.get(dtype)
    if device.type != "cuda" or op not in _DTYPE_BOUND_OPS or need is None:
        return
    capability = device_capability(device)
    if capability < need:
        name = str(dtype).replace("torch.", "")
        raise ValueError(
            f"{name} inputs need a GPU of compute capability {need[0]}.{need[1]} or newer; {_device_name(device)} is "
            f"{arch_name(capability)}, which has no {name} arithmetic: run the model in torch.float16 instead "
            f"(dtype=torch.float16 in from_pretrained, model.half(), or torch.autocast('cuda', dtype=torch.float16))")


def _portable(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """The portable path of ``op``, in words."""
    if op == "rel_key_attention":
        from .rel_key_attention_banded import describe_primitive

        return f"band-decomposed attention over {describe_primitive(device, dtype)}"
    if device.type == "cpu":
        return "the fast PyTorch path"
    return {"glu_depthwise_conv": "PyTorch ops as transformers (GLU, cuDNN depthwise conv1d, LayerNorm, SiLU)",
            "log_mel_fbank": "the CPU fbank (numpy framing, fp64 pocketfft), copied back to the device"}[op]


def choose(op: str, device, dtype: torch.dtype, name: str = None, explain: bool = True) -> Choice:
    """What ``op`` runs on ``device`` for inputs of ``dtype`` under backend ``name`` (default: the environment's),
    and why (``explain=False``: the path only, no words built: what every op call asks). Reads only the device's type
    and compute capability: no host sync. Raises a ValueError for a dtype the GPU lacks (:func:`check_device_dtype`)
    on ``auto`` and ``portable``, and for ``triton`` on CPU tensors without the interpreter."""
    name = name or backend()
    device = torch.device(device)
    done = lambda path, why: Choice(path, why() if explain else "")  # noqa: E731
    if op not in OP_DTYPES:
        raise ValueError(f"op must be one of {sorted(OP_DTYPES)}, got {op!r}")
    if name == "torch":
        return done(REFERENCE, lambda: "W2VBERT_FAST_BACKEND=torch: the literal reference")
    interpreted = triton_interpreter_enabled()
    if device.type != "cuda":
        if name != "triton":
            return done(FAST, lambda: f"{device.type} tensors: {_portable(op, device, dtype)}")
        if not interpreted:
            raise RuntimeError(
                "W2VBERT_FAST_BACKEND=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or use W2VBERT_FAST_BACKEND=auto|portable|torch")
        return done(TRITON, lambda: "W2VBERT_FAST_BACKEND=triton: the kernels under Triton's interpreter")
    if name != "triton":
        check_device_dtype(op, device, dtype)
    dtype_name = str(dtype).replace("torch.", "")
    if dtype not in OP_DTYPES[op] and not interpreted:
        return done(REFERENCE, lambda: f"{dtype_name} on a GPU: the reference (no kernel or fused attention is built "
                                       "for it)")
    if name == "triton":
        return done(TRITON, lambda: "W2VBERT_FAST_BACKEND=triton: the Triton kernels")
    if name == "portable":
        return done(FAST, lambda: f"W2VBERT_FAST_BACKEND=portable: {_portable(op, device, dtype)}")
    capability = device_capability(device)
    arch = arch_name(capability)
    if dtype_name in TRITON_TABLE[op].get(arch, ()):
        return done(TRITON, lambda: f"{arch} {dtype_name}: the Triton kernels (compile check clean; speed unmeasured)")

    def portable_why():
        if capability not in ARCHS:
            why = f"{arch} is not in the dispatch table (compiled and checked: {', '.join(ARCHS.values())})"
        else:
            why = PORTABLE_WHY.get((op, arch), f"no checked Triton config for {dtype_name} on {arch}")
        return f"{arch} {dtype_name}: {why}: the portable path, {_portable(op, device, dtype)}"

    return done(FAST, portable_why)


def dispatch(*tensors: torch.Tensor, op: str) -> str:
    """The one dispatch rule of every op: TRITON, FAST or REFERENCE for a call of ``op`` (a key of OP_DTYPES) on
    ``tensors`` (:func:`choose` on their device and the first tensor's dtype). No host sync."""
    dtype = next(t.dtype for t in tensors if t is not None)
    return choose(op, device_of(*tensors), dtype, explain=False).path


def describe(device=None) -> str:
    """What ``auto`` (or the backend the environment asks for) runs on ``device`` (default: the current CUDA device,
    else the CPU), op by op and dtype by dtype, and why: one line each."""
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        capability = device_capability(device)
        head = f"{_device_name(device)} ({arch_name(capability)}, compute capability {capability[0]}.{capability[1]})"
    else:
        head = str(device)
    lines = [f"W2VBERT_FAST_BACKEND={backend()} on {head}:"]
    for op in OP_DTYPES:
        for dtype in KERNEL_DTYPES:
            try:
                choice = choose(op, device, dtype)
                text = f"{choice.path:9} {choice.why}"
            except (ValueError, RuntimeError) as error:
                text = f"{'error':9} {error}"
            lines.append(f"  {op:18} {str(dtype).replace('torch.', ''):8}  {text}")
    return "\n".join(lines)


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
