"""``python -m w2vbert_fast check``: what to paste into a bug report.

The versions (w2vbert_fast, python, torch, triton, CUDA, cuDNN), the device and its arch, the path ``auto`` (or the
backend ``W2VBERT_FAST_BACKEND`` asks for) takes for each op in each dtype and why (``ops.describe``), then each op
run once on this device through that path against its literal reference computed in fp64 on the same device:
forward, and for attention and the conv module their gradients too. Small shapes with ragged padding: seconds on a
CPU. Exit status 0 when every run is within its tolerance, 1 otherwise (a dtype the device lacks, refused by the
dispatch table as intended, is listed and not counted).

Tolerances, as the tests': fp32 outputs within 1e-4 (gradients within 1e-5 relative error norm, or 1e-4 absolute);
fp16/bf16 within twice PyTorch's own error in that dtype plus a floor (2e-3 fp16, 1.6e-2 bf16), by relative error
norm against the fp64 reference; features within 1e-3 of the reference extractor's.
"""

import importlib.metadata
import os
import platform
import sys

import torch

FP32_ATOL = 1e-4
FP32_GRAD_RTOL = 1e-5
HALF_ERROR_FACTOR = 2.0
HALF_ERROR_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FBANK_ATOL = 1e-3


def add_parser(commands):
    p = commands.add_parser("check", help="versions, device, the path each op takes and why, each op against its "
                                          "reference (for bug reports)",
                            description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--device", help="cuda, cuda:1, cpu … (default: cuda when available, else cpu)")
    p.set_defaults(threads=None)
    return p


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def versions_line():
    cuda = torch.version.cuda or "none (a CPU build of torch)"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return (f"w2vbert_fast {_version('w2vbert_fast')} · python {platform.python_version()} · torch {torch.__version__}"
            f" · triton {_version('triton')} · CUDA {cuda}" + (f" · cuDNN {cudnn}" if cudnn else ""))


def device_line(device):
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{device}: {props.name}, compute capability {props.major}.{props.minor}, "
                f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    return f"{device}: {platform.machine() or 'unknown machine'}, {os.cpu_count()} CPUs, torch threads " \
           f"{torch.get_num_threads()}"


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _judge(ours, lowp, expected, dtype, grad=False):
    """(text, passed) for one tensor against the fp64 reference (``lowp``: the reference computed in ``dtype``)."""
    if not torch.isfinite(ours).all():
        return "non-finite values", False
    if dtype == torch.float32 or dtype == torch.float64:
        diff = (ours.double() - expected.double()).abs().max().item() if ours.numel() else 0.0
        if grad:
            err = relative_error(ours, expected)
            return (f"rel {err:.1e} / max {diff:.1e} (≤ {FP32_GRAD_RTOL:.0e} / {FP32_ATOL:.0e})",
                    err <= FP32_GRAD_RTOL or diff <= FP32_ATOL)
        return f"max {diff:.1e} (≤ {FP32_ATOL:.0e})", diff <= FP32_ATOL
    err, torch_err = relative_error(ours, expected), relative_error(lowp, expected)
    bound = HALF_ERROR_FACTOR * torch_err + HALF_ERROR_FLOOR[dtype]
    return f"rel {err:.1e} (≤ {bound:.1e}; PyTorch in {_name(dtype)}: {torch_err:.1e})", err <= bound


def _name(dtype):
    return str(dtype).replace("torch.", "")


def _lengths_mask(lengths, length, device):
    return torch.arange(length, device=device)[None, :] < lengths[:, None]


def _forward_and_gradients(op, reference, leaves, grad_out, device, dtype, grad_names):
    """[(what, text, passed)] of ``op`` on ``device`` in ``dtype`` (forward, then the gradient of each of ``leaves``,
    named ``grad_names``), judged against ``reference`` in fp64 and, for half precision, in ``dtype`` too."""
    def run(fn, cast):
        tensors = [t.to(device, cast).requires_grad_() for t in leaves]
        out = fn(tensors)
        return out, torch.autograd.grad(out, tensors, grad_out.to(cast))

    ours = run(op, dtype)
    expected = run(reference, torch.float64)
    lowp = run(reference, dtype) if dtype not in (torch.float32, torch.float64) else expected
    results = [("forward", *_judge(ours[0], lowp[0], expected[0], dtype))]
    for name, a, b, c in zip(grad_names, ours[1], lowp[1], expected[1]):
        results.append((name, *_judge(a, b, c, dtype, grad=True)))
    return results


def run_attention(device, dtype):
    """[(what, text, passed)]: forward and dq/dk/dv/dE of a ragged batch, against the fp64 reference."""
    from ..ops import rel_key_attention, rel_key_attention_reference

    generator = torch.Generator().manual_seed(0)
    batch, length, heads, head_dim, left, right = 2, 100, 4, 64, 64, 8
    leaves = [torch.randn(batch, length, heads, head_dim, generator=generator) for _ in range(3)]
    leaves.append(torch.randn(left + right + 1, head_dim, generator=generator))
    grad_out = torch.randn(batch, length, heads * head_dim, generator=generator).to(device)
    lengths = torch.tensor([length, 61], device=device)
    mask = _lengths_mask(lengths, length, device)
    scale = head_dim ** -0.5

    def reference(tensors):
        out = rel_key_attention_reference(*tensors, left, right, scale, mask)
        return out.masked_fill(~mask[..., None], 0)

    return _forward_and_gradients(lambda t: rel_key_attention(*t, left, right, scale, lengths), reference, leaves,
                                  grad_out, device, dtype, ("dq", "dk", "dv", "d_embedding"))


def run_conv(device, dtype):
    from ..ops import glu_depthwise_conv, glu_depthwise_conv_reference

    generator = torch.Generator().manual_seed(1)
    batch, length, channels, kernel = 2, 100, 64, 31
    leaves = [torch.randn(batch, length, 2 * channels, generator=generator),
              torch.randn(channels, 1, kernel, generator=generator) / kernel ** 0.5,
              1 + 0.1 * torch.randn(channels, generator=generator), 0.1 * torch.randn(channels, generator=generator)]
    grad_out = torch.randn(batch, length, channels, generator=generator).to(device)
    lengths = torch.tensor([length, 61], device=device)

    return _forward_and_gradients(lambda t: glu_depthwise_conv(*t, 1e-5, lengths),
                                  lambda t: glu_depthwise_conv_reference(*t, 1e-5, lengths), leaves, grad_out, device,
                                  dtype, ("dx", "d_conv_weight", "d_ln_weight", "d_ln_bias"))


def run_fbank(device, dtype):
    """Two clips (1.0 s and 0.6 s: right padding), a tone over noise, against the reference extractor's steps."""
    from ..ops import log_mel_fbank, log_mel_fbank_reference

    generator = torch.Generator().manual_seed(2)
    t = torch.arange(16000) / 16000
    waves = 0.3 * torch.sin(2 * torch.pi * 440 * t) + 0.01 * torch.randn(16000, generator=generator)
    waves = torch.stack([waves, waves.roll(1234)])
    waves[1, 9600:] = 0
    lengths = torch.tensor([16000, 9600], device=device)
    waves = waves.to(device, dtype)
    ours = log_mel_fbank(waves, lengths)
    expected = log_mel_fbank_reference(waves.float(), lengths)
    diff = (ours.double() - expected.double()).abs().max().item()
    return [("features", f"max {diff:.1e} (≤ {FBANK_ATOL:.0e})", bool(torch.isfinite(ours).all()) and diff <= FBANK_ATOL)]


OPS = {"rel_key_attention": run_attention, "glu_depthwise_conv": run_conv, "log_mel_fbank": run_fbank}


def dtypes_for(device):
    """fp32 everywhere; on a GPU fp16 and bf16 (the table refuses bf16 where the device lacks it, and says so); on a
    CPU bf16 (the README's CPU half precision)."""
    return (torch.float32, torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32, torch.bfloat16)


def run_checks(device, out=None):
    """Print each op's runs on ``device`` (to ``out``, default stdout); returns (runs, failures)."""
    from ..ops import _backend

    out = out or sys.stdout
    runs = failed = 0
    for op, run in OPS.items():
        for dtype in (torch.float32,) if op == "log_mel_fbank" else dtypes_for(device):
            label = f"  {op:18} {_name(dtype):8}"
            try:
                _backend.check_device_dtype(op, device, dtype)
            except ValueError as error:  # a dtype this device lacks: refused, as documented
                print(f"{label} refused (as intended): {error}", file=out)
                continue
            runs += 1
            path = "?"
            try:
                path = _backend.choose(op, device, dtype).path
                results = run(device, dtype)
            except Exception as error:  # a crash is a result: the report must still be printed whole
                failed += 1
                print(f"{label} {path:9} FAIL: {type(error).__name__}: {str(error).splitlines()[0][:300]}", file=out)
                continue
            ok = all(passed for _, _, passed in results)
            failed += not ok
            detail = "; ".join(f"{what} {text}" + ("" if passed else " ✗") for what, text, passed in results)
            print(f"{label} {path:9} {'PASS' if ok else 'FAIL'}: {detail}", file=out)
    return runs, failed


def check(args) -> int:
    from ..ops import describe
    from .common import resolve_device_dtype

    device, _ = resolve_device_dtype(args.device, None)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    print("w2vbert_fast check")
    print(f"  {versions_line()}")
    print(f"  {device_line(device)}")
    print(describe(device))
    print("each op through that path against its fp64 reference on this device:")
    runs, failed = run_checks(device)
    print(f"{runs - failed} of {runs} runs passed" + (f", {failed} FAILED" if failed else ""))
    if device.type == "cuda":
        print("(GPU speed is not checked here: `python -m w2vbert_fast bench` times the paths)")
    return 1 if failed else 0
