"""Shared test set-up: Triton's interpreter on machines without a GPU, and the tolerances, in one place."""

import os
import sys

import torch

if not torch.cuda.is_available():
    # The interpreter must be chosen before triton is first imported; it lets CI run the real kernels on CPU.
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could enable its interpreter"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if HAS_CUDA:
    # fp32 comparisons at 1e-4 need fp32 arithmetic: cuDNN convolutions would otherwise run in TF32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False

# Absolute tolerance against transformers / the fp32 reference, for outputs computed in fp32.
FP32_ATOL = 1e-4
# Gradients (sums over up to L terms, of any magnitude) computed in fp32, by relative error norm against an fp64
# reference.
FP32_GRAD_RTOL = 1e-5
# Half precision is judged by relative error norm against an fp32 reference: ours may be at most
# HALF_ERROR_FACTOR times the error of the same computation done by PyTorch in that dtype, plus a floor.
HALF_ERROR_FACTOR = 2.0
HALF_ERROR_FLOOR = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# Features (log-mel, normalised) against transformers' SeamlessM4TFeatureExtractor.
FBANK_ATOL = 1e-3


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_half_precision_close(ours: torch.Tensor, torch_lowp: torch.Tensor, reference_fp32: torch.Tensor):
    """ours and torch_lowp computed in fp16/bf16; reference_fp32 the same computation in fp32 (or fp64)."""
    assert torch.isfinite(ours).all(), "non-finite values in the output"
    ours_err = relative_error(ours, reference_fp32)
    torch_err = relative_error(torch_lowp, reference_fp32)
    bound = HALF_ERROR_FACTOR * torch_err + HALF_ERROR_FLOOR[ours.dtype]
    assert ours_err <= bound, f"relative error {ours_err:.3e} > {bound:.3e} (PyTorch in {ours.dtype}: {torch_err:.3e})"


def assert_fp32_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = FP32_ATOL):
    assert torch.isfinite(actual).all(), "non-finite values in the output"
    diff = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert diff <= atol, f"max |diff| {diff:.3e} > {atol:.1e}"


@pytest.fixture
def backend(monkeypatch):
    """Set W2VBERT_FAST_BACKEND for one test: ``backend("triton")``."""

    def set_backend(name: str):
        monkeypatch.setenv("W2VBERT_FAST_BACKEND", name)

    return set_backend


requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
