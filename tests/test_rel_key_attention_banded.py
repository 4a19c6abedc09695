"""The band-decomposed path of relative-key attention (ops/rel_key_attention_banded.py: the CPU path, and the portable
GPU path): query-chunked, O(L) memory.

Checked against the literal transformers-style reference, forward (fp32 within 1e-5) and backward (fp64, where any
slip in the bucket bookkeeping shows at 1e-10), at lengths either side of a chunk boundary, with bands wider and
narrower than a chunk, ragged right padding and both modes of padded query rows. Then memory: a subprocess
measures the peak RSS a call adds, which must stay linear in L through ``ops.rel_key_attention`` on the ``auto``
backend, forward and backward.

The CUDA primitive (PyTorch's memory-efficient and FlashAttention-2 kernels) cannot run here: its branch of the same
algorithm runs on CPU tensors against emulations of those ops that enforce the contracts it relies on (layouts,
dtypes, 16-byte bias alignment, the lse padded to 32 rows, the backward's ``out`` rows H·K apart) and give NaN where
a kernel may (rows with every key masked). They check the plumbing, not the kernels: on a GPU the same tests run on
the real ops (``requires_cuda``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import HAS_CUDA, assert_half_precision_close, requires_cuda

from w2vbert_fast.ops import rel_key_attention_banded as banded
from w2vbert_fast.ops.rel_key_attention import rel_key_attention_reference
from w2vbert_fast.ops.rel_key_attention_banded import rel_key_attention_chunked, rel_key_attention_chunked_backward

CHUNK = 8
CASES = {  # id: (batch, length, heads, head_dim, left, right)
    "L7-one-partial-chunk": (2, 7, 2, 8, 3, 2),
    "L8-exactly-one-chunk": (2, 8, 2, 8, 3, 2),
    "L9-one-past-a-chunk": (2, 9, 2, 8, 3, 2),
    "L17-band-narrower-than-chunk": (2, 17, 3, 8, 2, 1),
    "L33-band-wider-than-chunk": (2, 33, 2, 8, 20, 10),
    "L1-single-frame": (1, 1, 2, 8, 4, 4),
    "L40-no-band-left0-right0": (2, 40, 2, 8, 0, 0),
    "L50-head-dim-12": (3, 50, 2, 12, 64, 8),
}


def make_inputs(case, dtype, seed=0):
    batch, length, heads, head_dim, left, right = CASES[case]
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, length, heads, head_dim, generator=generator, dtype=dtype) for _ in range(3))
    emb = torch.randn(left + right + 1, head_dim, generator=generator, dtype=dtype)
    return q, k, v, emb, left, right, head_dim ** -0.5


def ragged_lengths(batch, length, seed=1):
    lengths = torch.randint(1, length + 1, (batch,), generator=torch.Generator().manual_seed(seed))
    lengths[0] = length  # one row unpadded, the others ragged
    return lengths


def reference(q, k, v, emb, left, right, scale, lengths, zero_padded_queries):
    key_mask = None if lengths is None else torch.arange(q.shape[1])[None, :] < lengths[:, None]
    out = rel_key_attention_reference(q, k, v, emb, left, right, scale, key_mask)
    if key_mask is not None and zero_padded_queries:
        out = out.masked_fill(~key_mask[..., None], 0.0)
    return out


@pytest.mark.parametrize("padding", ["unpadded", "ragged-zero-padded-rows", "ragged-keep-padded-rows"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_forward_matches_reference_fp32(case, padding):
    q, k, v, emb, left, right, scale = make_inputs(case, torch.float32)
    lengths = None if padding == "unpadded" else ragged_lengths(q.shape[0], q.shape[1])
    zero_rows = padding != "ragged-keep-padded-rows"
    out, lse = rel_key_attention_chunked(q, k, v, emb, left, right, scale, lengths, zero_rows, chunk=CHUNK)
    expected = reference(q, k, v, emb, left, right, scale, lengths, zero_rows)
    assert out.shape == expected.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and torch.isfinite(lse).all()


@pytest.mark.parametrize("padding", ["unpadded", "ragged-zero-padded-rows", "ragged-keep-padded-rows"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_backward_matches_reference_autograd_fp64(case, padding):
    q, k, v, emb, left, right, scale = make_inputs(case, torch.float64)
    lengths = None if padding == "unpadded" else ragged_lengths(q.shape[0], q.shape[1])
    zero_rows = padding != "ragged-keep-padded-rows"
    leaves = [t.clone().requires_grad_() for t in (q, k, v, emb)]
    expected = reference(*leaves, left, right, scale, lengths, zero_rows)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    out, lse = rel_key_attention_chunked(q, k, v, emb, left, right, scale, lengths, zero_rows, chunk=CHUNK)
    grads = rel_key_attention_chunked_backward(grad_out, q, k, v, emb, out, lse, left, right, scale, lengths,
                                               zero_rows, chunk=CHUNK)
    for name, grad, want, leaf in zip(("dq", "dk", "dv", "d_distance_embedding"), grads, expected_grads, leaves):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        torch.testing.assert_close(grad, want, atol=1e-10, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_chunked_accepts_strided_views_of_a_projection():
    """q, k, v arrive as views of one (B, L, 3·H·D) projection in the model: no copy is asked of the caller."""
    batch, length, heads, head_dim, left, right = 2, 21, 2, 8, 5, 3
    packed = torch.randn(batch, length, 3, heads, head_dim)
    q, k, v = packed.unbind(2)
    assert not q.is_contiguous()
    emb = torch.randn(left + right + 1, head_dim)
    out, _ = rel_key_attention_chunked(q, k, v, emb, left, right, 0.3, chunk=CHUNK)
    torch.testing.assert_close(out, reference(q, k, v, emb, left, right, 0.3, None, True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_chunked_half_precision_inputs_give_half_outputs_within_half_error(dtype):
    q, k, v, emb, left, right, scale = make_inputs("L33-band-wider-than-chunk", torch.float32)
    lengths = ragged_lengths(q.shape[0], q.shape[1])
    low = [t.to(dtype) for t in (q, k, v, emb)]
    out, _ = rel_key_attention_chunked(*low, left, right, scale, lengths, True, chunk=CHUNK)
    assert out.dtype == dtype
    expected = reference(q, k, v, emb, left, right, scale, lengths, True)
    torch_low = reference(*low, left, right, scale, lengths, True)
    assert_half_precision_close(out, torch_low, expected)


@pytest.mark.parametrize("length", [384, 385, 1000])
def test_cpu_default_chunking_matches_reference_either_side_of_one_chunk(length):
    """The CPU primitive picks its own rows per step (one chunk up to 384 fp32 frames, 256-row chunks beyond)."""
    rows = banded.primitive_for("cpu", torch.float32).rows_per_chunk(length, torch.float32)
    assert rows == (length if length <= 384 else 256)
    generator = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(2, length, 2, 8, generator=generator) for _ in range(3))
    emb = torch.randn(73, 8, generator=generator)
    lengths = torch.tensor([length, length - 100])
    out, _ = rel_key_attention_chunked(q, k, v, emb, 64, 8, 8 ** -0.5, lengths, True)
    torch.testing.assert_close(out, reference(q, k, v, emb, 64, 8, 8 ** -0.5, lengths, True), atol=1e-5, rtol=0)


@pytest.mark.parametrize("native", [False, True], ids=["bf16-without-bf16-instructions", "bf16-instructions"])
def test_cpu_bf16_forward_computes_in_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch, native):
    monkeypatch.setattr(banded, "native_bf16", lambda: native)
    cpu = banded.primitive_for("cpu", torch.bfloat16)
    assert cpu.compute_dtype(torch.bfloat16) == (torch.bfloat16 if native else torch.float32)
    assert cpu.compute_dtype(torch.bfloat16, backward=True) == torch.float32  # P recomputed from the lse in fp32
    assert cpu.compute_dtype(torch.float16) == torch.float32
    assert ("bfloat16 forward / float32 backward math" in banded.describe_primitive("cpu", torch.bfloat16)) == native

    q, k, v, emb, left, right, scale = make_inputs("L33-band-wider-than-chunk", torch.float64)
    lengths = ragged_lengths(q.shape[0], q.shape[1])
    low = [t.to(torch.bfloat16) for t in (q, k, v, emb)]
    out, lse = rel_key_attention_chunked(*low, left, right, scale, lengths, True, chunk=CHUNK)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    exact_inputs = [t.double().requires_grad_() for t in low]
    expected = reference(*exact_inputs, left, right, scale, lengths, True)
    assert_half_precision_close(out, reference(*low, left, right, scale, lengths, True), expected.detach())
    # the fp32 backward from the bf16 forward's output and lse: gradients within bf16's error of the exact ones
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected.backward(grad_out)
    grads = rel_key_attention_chunked_backward(grad_out.to(torch.bfloat16), *low, out, lse, left, right, scale,
                                               lengths, True, chunk=CHUNK)
    for name, grad, tensor in zip(("dq", "dk", "dv", "d_distance_embedding"), grads, exact_inputs):
        assert grad.dtype == torch.bfloat16
        error = (grad.double() - tensor.grad).abs().max() / tensor.grad.abs().max()
        assert error < 3e-2, f"{name}: {error:.3g} of the largest value"


# ---------------------------------------------------------------------------------- the CUDA primitive's plumbing
def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _check_aligned(name, t):
    """The memory-efficient kernels' aligned variants: a unit last stride, 16-byte aligned pointer and strides (of
    every dim longer than 1; broadcast strides are 0)."""
    step = 16 // t.element_size()
    assert t.stride(-1) == 1, f"{name}: last stride {t.stride(-1)}"
    assert t.data_ptr() % 16 == 0, f"{name}: pointer not 16-byte aligned"
    assert all(s % step == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1), f"{name}: strides {t.stride()}"


def _lse_dtype(q):
    return torch.promote_types(q.dtype, torch.float32)


class EmulatedCudaOps:
    """CPU stand-ins for aten._efficient_attention_forward/_backward and _scaled_dot_product_flash_attention, with
    their calling conventions (read from PyTorch's attention.cu / attention_backward.cu / kernel_backward.h) as
    assertions; the math in fp64, results in the inputs' dtype, the lse in fp32 as the kernels give it (in fp64 for
    fp64 inputs, which only the emulation takes: so the plumbing is checked to 1e-10)."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _scores(q, k, bias, scale):
        """q, k (B, M, H, K) → fp64 scores (B, H, M, N) with the bias."""
        scores = torch.einsum("bmhk,bnhk->bhmn", q.double(), k.double()) * scale
        return scores if bias is None else scores + bias.double()

    @staticmethod
    def _check_inputs(q, k, v, bias):
        batch, rows, heads, _ = q.shape
        for name, t in (("query", q), ("key", k), ("value", v)):
            assert t.dim() == 4 and t.dtype == q.dtype, name
            _check_aligned(name, t)
        if bias is not None:
            assert bias.dtype == q.dtype, "invalid dtype for bias - should match query's dtype"
            assert tuple(bias.shape) == (batch, heads, rows, k.shape[1]), f"attn_bias: wrong shape {bias.shape}"
            _check_aligned("attn_bias", bias)

    def efficient_forward(self, q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                          custom_mask_type, compute_log_sumexp, scale):
        assert cu_seqlens_q is None and cu_seqlens_k is None and dropout_p == 0.0 and custom_mask_type == 0
        assert compute_log_sumexp
        self._check_inputs(q, k, v, bias)
        self.calls.append(("efficient_forward", bias is not None))
        scores = self._scores(q, k, bias, scale)
        lse = torch.logsumexp(scores, dim=-1)  # -inf where every key is masked; the output there is NaN
        out = torch.einsum("bhmn,bnhk->bmhk", torch.exp(scores - lse[..., None]), v.double())
        padded = torch.full((*lse.shape[:2], _round_up(lse.shape[-1], 32)), float("nan"), dtype=_lse_dtype(q))
        padded[..., :lse.shape[-1]] = lse
        return out.to(q.dtype).contiguous(), padded, torch.empty(()), torch.empty(()), q.shape[1], k.shape[1]

    def efficient_backward(self, grad_out, q, k, v, bias, out, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, logsumexp, dropout_p, philox_seed, philox_offset, custom_mask_type,
                           bias_requires_grad, scale):
        assert cu_seqlens_q is None and cu_seqlens_k is None and dropout_p == 0.0 and custom_mask_type == 0
        batch, rows, heads, head_dim = q.shape
        assert (max_seqlen_q, max_seqlen_k) == (rows, k.shape[1])
        self._check_inputs(q, k, v, bias)
        assert out.shape == q.shape and out.dtype == q.dtype and grad_out.dtype == q.dtype
        assert out.stride(1) == heads * head_dim and out.stride(-1) == 1, "out: rows must be H·K apart (o_strideM)"
        assert logsumexp.dtype == _lse_dtype(q) and tuple(logsumexp.shape) == (batch, heads, rows)
        assert logsumexp.stride(-1) == 1 and logsumexp.stride(1) >= _round_up(rows, 32), "lse rows not padded to 32"
        assert not bias_requires_grad or bias is not None
        self.calls.append(("efficient_backward", bias is not None, bias_requires_grad))
        scores = self._scores(q, k, bias, scale)
        probs = torch.exp(scores - logsumexp.double()[..., None])
        d_out = grad_out.double()
        delta = (d_out * out.double()).sum(-1).transpose(1, 2)  # (B, H, M), as the kernel computes it
        d_scores = probs * (torch.einsum("bmhk,bnhk->bhmn", d_out, v.double()) - delta[..., None])
        dq = torch.einsum("bhmn,bnhk->bmhk", d_scores, k.double()) * scale
        dk = torch.einsum("bhmn,bmhk->bnhk", d_scores, q.double()) * scale
        dv = torch.einsum("bhmn,bmhk->bnhk", probs, d_out)
        d_bias = None
        if bias_requires_grad:  # allocated with its last dim padded to 16, as the kernel's
            d_bias = torch.empty(*bias.shape[:-1], _round_up(bias.shape[-1], 16), dtype=q.dtype)[..., :bias.shape[-1]]
            d_bias.copy_(d_scores)
        return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype), d_bias

    def flash_forward(self, q, k, v, dropout_p, is_causal, return_debug_mask, scale):
        """(B, H, M, K) inputs, no bias, half precision, head dim a multiple of 8 up to 256."""
        assert dropout_p == 0.0 and not is_causal and not return_debug_mask
        assert q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256
        assert all(t.stride(-1) == 1 for t in (q, k, v))
        self.calls.append(("flash_forward",))
        out, lse = self.efficient_forward(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, None, None,
                                          None, None, 0.0, 0, True, scale)[:2]
        self.calls.pop()
        return out.transpose(1, 2), lse[..., :q.shape[2]].contiguous(), None, None, 0, 0, None, None, None


def emulated_cuda(capability, dtype):
    ops = EmulatedCudaOps()
    return banded.CudaSdpa(capability, dtype, ops=ops), ops


def masked_case(case, seed=2):
    """A left-padded row, a row with holes (the first key among them) and a ragged right-padded row, with lengths one
    past each row's last real frame, as the model passes them."""
    batch, length = CASES[case][:2]
    frames = torch.arange(length)
    rows = [frames >= length // 3, (frames % 3 != 0), frames < max(1, length // 2)]
    key_mask = torch.stack([rows[i % 3] | (frames == length - 1 if i % 3 == 1 else False) for i in range(batch)])
    lengths = (key_mask * torch.arange(1, length + 1)).amax(dim=1)
    return key_mask, lengths


@pytest.mark.parametrize("masks", ["unpadded", "lengths", "key-mask", "key-mask-keep-padded-rows"])
@pytest.mark.parametrize("case", ["L9-one-past-a-chunk", "L33-band-wider-than-chunk", "L50-head-dim-12",
                                  "L1-single-frame", "L40-no-band-left0-right0"])
def test_cuda_primitive_forward_and_backward_match_the_reference_fp64(case, masks):
    """The algorithm over the CUDA primitive (memory-efficient kernels; no flash in fp64): the head dim zero-padded to
    8 (12 → 16), every bias aligned, lse padded, dS of the band from the kernel's backward."""
    primitive, ops = emulated_cuda((7, 5), torch.float64)
    q, k, v, emb, left, right, scale = make_inputs(case, torch.float64)
    key_mask, lengths = masked_case(case) if masks.startswith("key-mask") else (None, None)
    if masks == "lengths":
        lengths = ragged_lengths(q.shape[0], q.shape[1])
    zero_rows = masks != "key-mask-keep-padded-rows"
    real = key_mask if key_mask is not None else (None if lengths is None else
                                                  torch.arange(q.shape[1])[None, :] < lengths[:, None])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, emb)]
    expected = rel_key_attention_reference(*leaves, left, right, scale, real)
    if lengths is not None and zero_rows:
        expected = expected.masked_fill((torch.arange(q.shape[1])[None, :] >= lengths[:, None])[..., None], 0.0)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    out, lse = rel_key_attention_chunked(q, k, v, emb, left, right, scale, lengths, zero_rows, key_mask,
                                         chunk=CHUNK, primitive=primitive)
    torch.testing.assert_close(out, expected.detach(), atol=1e-10, rtol=0)
    assert lse.dtype == torch.float64 and torch.isfinite(lse).all()
    grads = rel_key_attention_chunked_backward(grad_out, q, k, v, emb, out, lse, left, right, scale, lengths,
                                               zero_rows, key_mask, chunk=CHUNK, primitive=primitive)
    for name, grad, want, leaf in zip(("dq", "dk", "dv", "d_distance_embedding"), grads, expected_grads, leaves):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype, name
        torch.testing.assert_close(grad, want, atol=1e-10, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
    # the band's backward asked the kernel for dS; the outer parts never
    band_calls = [c for c in ops.calls if c[0] == "efficient_backward" and c[2]]
    assert band_calls and all(c[1] for c in band_calls)


@pytest.mark.parametrize("capability, flash", [((7, 5), False), ((8, 6), True), ((9, 0), True), ((10, 0), False)],
                         ids=["sm_75", "sm_86", "sm_90", "sm_100"])
@pytest.mark.parametrize("masks", ["unpadded", "key-mask"])
def test_cuda_primitive_half_precision_takes_flash_for_the_unbiased_parts_where_it_exists(capability, flash, masks):
    """fp16: FlashAttention-2 forward for the outer parts on sm_80 … sm_90 when nothing is masked (they carry no
    bias then), the memory-efficient kernel everywhere else; within half-precision error of the fp32 reference."""
    dtype = torch.float16
    primitive, ops = emulated_cuda(capability, dtype)
    case = "L50-head-dim-12"
    q, k, v, emb, left, right, scale = make_inputs(case, torch.float32)
    key_mask, lengths = masked_case(case) if masks == "key-mask" else (None, None)
    real = key_mask
    low = [t.to(dtype) for t in (q, k, v, emb)]
    out, _ = rel_key_attention_chunked(*low, left, right, scale, lengths, True, key_mask, chunk=CHUNK,
                                       primitive=primitive)
    assert out.dtype == dtype
    expected = rel_key_attention_reference(q, k, v, emb, left, right, scale, real)
    torch_low = rel_key_attention_reference(*low, left, right, scale, real)
    if lengths is not None:
        past = (torch.arange(q.shape[1])[None, :] >= lengths[:, None])[..., None]
        expected, torch_low = expected.masked_fill(past, 0), torch_low.masked_fill(past, 0)
    assert_half_precision_close(out, torch_low, expected)
    flash_calls = [c for c in ops.calls if c[0] == "flash_forward"]
    biased = [c for c in ops.calls if c[0] == "efficient_forward" and c[1]]
    assert bool(flash_calls) == (flash and masks == "unpadded")
    assert biased  # the band always runs with its bias on the memory-efficient kernel


def test_primitive_for_picks_by_device_and_capability(monkeypatch):
    assert isinstance(banded.primitive_for("cpu", torch.bfloat16), banded.CpuFlash)
    monkeypatch.setattr(banded, "native_bf16", lambda: False)
    assert banded.primitive_for("cpu", torch.bfloat16).compute_dtype(torch.bfloat16) == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    t4 = banded.primitive_for("cuda:0", torch.float16)
    assert isinstance(t4, banded.CudaSdpa) and not t4.flash and t4.compute_dtype(torch.float16) == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert banded.primitive_for("cuda:0", torch.bfloat16).flash
    assert not banded.primitive_for("cuda:0", torch.float32).flash
    with pytest.raises(ValueError, match="CPU and CUDA tensors, got a tensor on meta"):
        banded.primitive_for("meta", torch.float32)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("masks", ["unpadded", "key-mask"])
def test_cuda_primitive_on_the_gpu_matches_the_reference(dtype, masks):
    """The real CUDA ops (only where a GPU is lent): forward and gradients within the dtype's error."""
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no bf16 before sm_80 (the dispatch table refuses it there)")
    case = "L50-head-dim-12"
    q, k, v, emb, left, right, scale = (t.cuda() if isinstance(t, torch.Tensor) else t
                                        for t in make_inputs(case, torch.float32))
    key_mask, lengths = (t.cuda() for t in masked_case(case)) if masks == "key-mask" else (None, None)
    low = [t.to(dtype).requires_grad_() for t in (q, k, v, emb)]
    grad_out = torch.randn(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], device="cuda")
    out, lse = rel_key_attention_chunked(*[t.detach() for t in low], left, right, scale, lengths, True, key_mask,
                                         chunk=CHUNK)
    grads = rel_key_attention_chunked_backward(grad_out.to(dtype), *[t.detach() for t in low], out, lse, left, right,
                                               scale, lengths, True, key_mask, chunk=CHUNK)
    leaves = [t.double().detach().requires_grad_() for t in low]
    expected = rel_key_attention_reference(*leaves, left, right, scale, key_mask)
    if lengths is not None:
        expected = expected.masked_fill((torch.arange(q.shape[1], device="cuda")[None, :] >= lengths[:, None])[..., None], 0)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    from conftest import relative_error

    assert relative_error(out, expected) <= tolerance
    for grad, want in zip(grads, expected_grads):
        assert relative_error(grad, want) <= tolerance


# ---------------------------------------------------------------------------------------------------- memory
_PEAK_SCRIPT = r"""
import json, sys, torch
import w2vbert_fast

length, train = int(sys.argv[1]), sys.argv[2] == "train"
torch.manual_seed(0)
heads, head_dim, left, right = 2, 16, 64, 8
q, k, v = (torch.randn(1, length, heads, head_dim, requires_grad=train) for _ in range(3))
emb = torch.randn(left + right + 1, head_dim, requires_grad=train)
lengths = torch.tensor([length - 3], dtype=torch.int32)

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def call():
    out = w2vbert_fast.ops.rel_key_attention(q, k, v, emb, left, right, head_dim ** -0.5, lengths)
    if train:
        out.square().sum().backward()

call()  # warm-up: thread pools and library state are not the call's memory
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark (VmHWM) to the current RSS
base = rss("VmRSS:")
with torch.inference_mode(not train):
    call()
print(json.dumps({"extra": rss("VmHWM:") - base}))
"""


def peak_extra_bytes(length, mode):
    env = dict(os.environ, W2VBERT_FAST_BACKEND="auto", OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(length), mode], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["extra"]


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_auto_backend_on_cpu_memory_grows_linearly_in_length(mode):
    """Doubling L must not quadruple the memory a call adds; at L = 8192 one fp32 L×L score matrix per head would
    be 512 MiB (and transformers' L×L×D gather 8 GiB): the whole call must stay far below a single one."""
    short, long = 4096, 8192
    extra_short, extra_long = peak_extra_bytes(short, mode), peak_extra_bytes(long, mode)
    one_score_matrix = 2 * long * long * 4  # heads × L × L fp32
    assert extra_long < one_score_matrix / 4, f"{mode}: {extra_long / 2**20:.0f} MiB added at L={long}"
    assert extra_long <= 2.5 * extra_short + (16 << 20), (
        f"{mode}: {extra_short / 2**20:.1f} MiB at L={short} but {extra_long / 2**20:.1f} MiB at L={long}")
