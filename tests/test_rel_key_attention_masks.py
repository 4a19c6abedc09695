"""Relative-key attention with a key mask (``key_mask``): left padding and holes, on every backend.

A key is attended iff it lies before ``lengths`` (when given) and ``key_mask`` marks it (when given); with
``zero_padded_queries`` only the query rows at or past ``lengths`` are zeroed: masked rows before it are computed as
transformers computes them (its heads read them under left padding). Checked against
the literal reference with the combined mask: forward in fp32, gradients of q, k, v and the distance embedding
against fp64, on ``triton`` (the kernels, under the interpreter on CPU), ``auto`` (the banded path on CPU) and
``torch``. The interpreter's blocks are 32 query rows × 16 keys, so the patterns below mask whole key blocks, whole
query blocks, the first key of a sequence and many single frames.
"""

import importlib

import pytest
import torch
from conftest import FP32_ATOL, FP32_GRAD_RTOL, HAS_CUDA, assert_fp32_close, relative_error

from w2vbert_fast.ops import rel_key_attention, rel_key_attention_reference
from w2vbert_fast.ops.rel_key_attention_banded import rel_key_attention_chunked, rel_key_attention_chunked_backward

kernel_module = importlib.import_module("w2vbert_fast.ops.rel_key_attention")

DEVICE = "cuda" if HAS_CUDA else "cpu"
LENGTH = 90


def _pattern(name, length=LENGTH):
    """(B, L) bool masks, True = real; every pattern mixes in an all-real row."""
    frames = torch.arange(length)
    full = torch.ones(length, dtype=torch.bool)
    rows = {
        # left padding: real frames from an offset to the end (one offset past a whole query block)
        "left-padding": [full, frames >= 13, frames >= 40],
        # holes: the first key, every third frame, and a run of 48 frames wider than a key block (16) that covers a
        # whole query block (32-63) too
        "holes": [full, frames != 0, frames % 3 != 1, (frames < 16) | (frames >= 64)],
        # left and right padding at once, and a single real frame in the middle
        "left-and-right": [(frames >= 20) & (frames < 70), full, frames == 45],
    }[name]
    return torch.stack(rows)


PATTERNS = ["left-padding", "holes", "left-and-right"]


def last_real_plus_one(mask):
    """lengths as the model passes them with a key mask: one past each row's last real frame."""
    frames = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * frames).amax(dim=1)


def make_inputs(batch, length, heads, head_dim, left, right, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, length, 3, heads, head_dim, generator=generator).to(DEVICE, dtype)
    table = (2 * torch.randn(left + right + 1, head_dim, generator=generator)).to(DEVICE, dtype)
    grad_out = torch.randn(batch, length, heads * head_dim, generator=generator).to(DEVICE, dtype)
    return fused, table, grad_out


def poison_masked_frames(fused, real):
    """Large finite garbage in the keys and values of frames that are not real: any leak shows."""
    fused = fused.clone()
    fused[:, :, 1:][~real] = 1e4
    return fused


def past_the_end(lengths, length):
    """(B, L) bool: the rows at or past each sequence's length, the ones zero_padded_queries zeroes."""
    return torch.arange(length, device=lengths.device)[None, :] >= lengths[:, None]


def expected_output(q, k, v, table, left, right, scale, real, zero_padded_queries, lengths):
    out = rel_key_attention_reference(q, k, v, table, left, right, scale, real)
    if zero_padded_queries and lengths is not None:
        out = out.masked_fill(past_the_end(lengths, q.shape[1])[..., None], 0)
    return out


def run(backend, name, fused, table, grad_out, left, right, lengths, key_mask, zero_padded_queries):
    """(out, d_fused, d_table) on backend ``name``."""
    backend(name)
    fused = fused.detach().requires_grad_(True)
    table = table.detach().requires_grad_(True)
    q, k, v = fused.unbind(2)
    out = rel_key_attention(q, k, v, table, left, right, q.shape[-1] ** -0.5, lengths, zero_padded_queries,
                            key_mask=key_mask)
    return (out.detach(), *torch.autograd.grad(out, (fused, table), grad_out))


def assert_grads_close(ours, expected):
    for name, a, b in zip(("out", "dq/dk/dv", "d_distance_embedding"), ours, expected):
        assert torch.isfinite(a).all(), f"non-finite values in {name}"
        err = relative_error(a, b)
        diff = (a.double() - b.double()).abs().max().item()
        assert err <= FP32_GRAD_RTOL or diff <= FP32_ATOL, f"{name}: relative error {err:.2e}, max |diff| {diff:.1e}"


# ------------------------------------------------------------------------------------- every backend, vs the oracle
@pytest.mark.parametrize("zero_padded_queries", [True, False], ids=["zero-padded-rows", "computed-padded-rows"])
@pytest.mark.parametrize("with_lengths", [True, False], ids=["with-lengths", "mask-only"])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("name", ["triton", "auto", "torch"])
def test_masked_forward_and_gradients_match_the_reference(backend, name, pattern, with_lengths, zero_padded_queries):
    left, right = 20, 6
    real = _pattern(pattern).to(DEVICE)
    fused, table, grad_out = make_inputs(real.shape[0], LENGTH, 1, 16, left, right, seed=1)
    fused = poison_masked_frames(fused, real)
    lengths = last_real_plus_one(real) if with_lengths else None
    ours = run(backend, name, fused, table, grad_out, left, right, lengths, real, zero_padded_queries)

    fused64, table64 = fused.double().requires_grad_(True), table.double().requires_grad_(True)
    expected = expected_output(*fused64.unbind(2), table64, left, right, 16 ** -0.5, real, zero_padded_queries,
                               lengths)
    expected_grads = torch.autograd.grad(expected, (fused64, table64), grad_out.double())
    assert_fp32_close(ours[0], expected)
    masked_before_the_end = ~real if lengths is None else ~real & ~past_the_end(lengths, LENGTH)
    # masked rows before the end are computed (attending to the real keys), not zeroed
    assert (ours[0][masked_before_the_end].abs().amax(dim=-1) > 0).all()
    assert_grads_close(ours, (expected, *expected_grads))
    # masked keys and values take no gradient; with zero_padded_queries, the rows past the end neither
    d_q, d_k, d_v = ours[1].unbind(2)
    assert (d_k[~real] == 0).all() and (d_v[~real] == 0).all()
    if zero_padded_queries and lengths is not None:
        past = past_the_end(lengths, LENGTH)
        assert (ours[0][past] == 0).all() and (d_q[past] == 0).all()


@pytest.mark.parametrize("name", ["triton", "auto"])
def test_a_key_mask_agrees_with_lengths_when_it_is_right_padding(backend, name):
    """The same padding given as lengths (the fast form) or as a mask gives the same result (every row computed:
    zeroing is by lengths only)."""
    lengths = torch.tensor([70, 33, 1], device=DEVICE)
    real = torch.arange(70, device=DEVICE)[None, :] < lengths[:, None]
    fused, table, grad_out = make_inputs(3, 70, 2, 16, 64, 8, seed=2)
    by_lengths = run(backend, name, fused, table, grad_out, 64, 8, lengths, None, False)
    by_mask = run(backend, name, fused, table, grad_out, 64, 8, None, real.to(torch.int64), False)
    for a, b in zip(by_lengths, by_mask):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["triton", "auto", "torch"])
@pytest.mark.parametrize("zero_padded_queries", [True, False], ids=["zero-padded-rows", "computed-padded-rows"])
def test_a_sequence_with_no_real_frame_stays_finite(backend, name, zero_padded_queries):
    """The caller's error, unchecked by the op: the other sequences are right and nothing is NaN or Inf."""
    real = torch.ones(2, 50, dtype=torch.bool, device=DEVICE)
    real[1] = False
    fused, table, grad_out = make_inputs(2, 50, 2, 16, 3, 5, seed=3)
    out, d_fused, d_table = run(backend, name, fused, table, grad_out, 3, 5, None, real, zero_padded_queries)
    assert torch.isfinite(out).all() and torch.isfinite(d_fused).all() and torch.isfinite(d_table).all()
    q, k, v = fused.unbind(2)
    assert_fp32_close(out[0], rel_key_attention_reference(q, k, v, table, 3, 5, 0.25)[0])


# ------------------------------------------------------------------------------- the kernels write every element
@pytest.mark.parametrize("zero_padded_queries", [True, False], ids=["zero-padded-rows", "computed-padded-rows"])
def test_the_masked_kernels_write_every_output_and_gradient(backend, zero_padded_queries):
    """Outputs and gradients are poisoned with NaN before the kernels run: an unwritten element fails. lse is +inf
    (never NaN) where a row takes no gradient."""
    left, right = 20, 6
    real = _pattern("holes").to(DEVICE)
    fused, table, grad_out = make_inputs(real.shape[0], LENGTH, 2, 24, left, right, seed=4)
    q, k, v = fused.unbind(2)
    lengths = last_real_plus_one(real).to(torch.int32)
    scale = 24 ** -0.5
    out = torch.full((real.shape[0], LENGTH, 48), float("nan"), device=DEVICE)
    lse = torch.full((real.shape[0], 2, LENGTH), float("nan"), device=DEVICE)
    kernel_module._launch(q, k, v, table, left, right, scale, lengths, zero_padded_queries, out=out, lse=lse,
                          key_mask=real)
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert_fp32_close(out, expected_output(q, k, v, table, left, right, scale, real, zero_padded_queries, lengths))
    grads = tuple(torch.full(q.shape, float("nan"), device=DEVICE) for _ in range(3))
    dq, dk, dv, d_table = kernel_module._launch_backward(grad_out, q, k, v, table, out, lse, left, right, scale,
                                                         lengths, zero_padded_queries, grads=grads, key_mask=real)
    ours = (out, torch.stack((dq, dk, dv), dim=2), d_table)
    backend("torch")
    expected = run(backend, "torch", fused.double(), table.double(), grad_out.double(), left, right, lengths, real,
                   zero_padded_queries)
    assert_grads_close(ours, expected)


# ----------------------------------------------------------------------------- the banded path's chunk bookkeeping
@pytest.mark.parametrize("zero_padded_queries", [True, False], ids=["zero-padded-rows", "computed-padded-rows"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_banded_path_with_small_chunks_matches_the_reference_fp64(pattern, zero_padded_queries):
    """Chunks of 8 rows and a band of 3 + 2: many parts hold no real key for some row (their lse must weigh
    nothing), forward and backward to 1e-10."""
    left, right, chunk = 3, 2, 8
    real = _pattern(pattern)
    generator = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(real.shape[0], LENGTH, 2, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    emb = torch.randn(left + right + 1, 8, generator=generator, dtype=torch.float64)
    lengths = last_real_plus_one(real)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, emb)]
    expected = expected_output(*leaves, left, right, 0.3, real, zero_padded_queries, lengths)
    grad_out = torch.randn(expected.shape, generator=generator, dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out)

    out, lse = rel_key_attention_chunked(q, k, v, emb, left, right, 0.3, lengths, zero_padded_queries, real,
                                         chunk=chunk)
    torch.testing.assert_close(out, expected.detach(), atol=1e-10, rtol=0)
    assert torch.isfinite(lse).all()
    grads = rel_key_attention_chunked_backward(grad_out, q, k, v, emb, out, lse, left, right, 0.3, lengths,
                                               zero_padded_queries, real, chunk=chunk)
    for name, grad, want in zip(("dq", "dk", "dv", "d_distance_embedding"), grads, expected_grads):
        torch.testing.assert_close(grad, want, atol=1e-10, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------ the op, compiled
def test_the_op_with_a_key_mask_is_registered_with_torch_library():
    real = _pattern("holes").to(DEVICE)
    fused, table, grad_out = make_inputs(real.shape[0], LENGTH, 2, 16, 3, 5)
    q, k, v = fused.unbind(2)
    lengths = last_real_plus_one(real).to(torch.int32)
    torch.library.opcheck(torch.ops.w2vbert_fast.rel_key_attention.default,
                          (q, k, v, table.requires_grad_(True), 3, 5, 0.25, lengths, True, "triton", real),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = kernel_module._launch(q, k, v, table.detach(), 3, 5, 0.25, lengths, True, key_mask=real)
    torch.library.opcheck(torch.ops.w2vbert_fast.rel_key_attention_backward.default,
                          (grad_out, q, k, v, table.detach(), out, lse, 3, 5, 0.25, lengths, True, "triton", real),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", ["triton", "auto"])
def test_torch_compile_fullgraph_with_a_key_mask_forward_and_backward(backend, name):
    left, right = 3, 5
    real = _pattern("left-padding").to(DEVICE)
    fused, table, grad_out = make_inputs(real.shape[0], LENGTH, 2, 16, left, right, seed=6)
    lengths = last_real_plus_one(real)
    expected = run(backend, "torch", fused.double(), table.double(), grad_out.double(), left, right, lengths, real,
                   True)
    backend(name)
    fused, table = fused.requires_grad_(True), table.requires_grad_(True)

    def step(fused, table, lengths, key_mask, grad_out):
        q, k, v = fused.unbind(2)
        out = rel_key_attention(q, k, v, table, left, right, 0.25, lengths, key_mask=key_mask)
        return out, (out * grad_out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out, loss = compiled(fused, table, lengths, real, grad_out)
    assert_grads_close((out.detach(), *torch.autograd.grad(loss, (fused, table))), expected)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "key_mask,message",
    [
        (torch.ones(2, 10, dtype=torch.bool), r"key_mask must be a \(batch, length\) = \(2, 11\)"),
        (torch.ones(2, 11, 1, dtype=torch.bool), r"key_mask must be a \(batch, length\)"),
        ([[1] * 11] * 2, r"key_mask must be a \(batch, length\).*got list"),
        (torch.ones(2, 11), "key_mask must be a bool or 0/1 integer tensor, got torch.float32"),
        (torch.full((2, 11), 2), "key_mask must hold only 0 and 1"),
        (torch.ones(2, 11, dtype=torch.bool, device="meta"), "must be on one device"),
    ],
    ids=["short", "rank-3", "a-list", "float", "value-2", "another-device"],
)
def test_bad_key_masks_are_value_errors_naming_the_argument(backend, key_mask, message):
    backend("auto")
    fused, table, _ = make_inputs(2, 11, 2, 16, 3, 5)
    q, k, v = (t.cpu() for t in fused.unbind(2))
    with pytest.raises(ValueError, match=message):
        rel_key_attention(q, k, v, table.cpu(), 3, 5, 0.25, key_mask=key_mask)


def test_an_integer_key_mask_of_zeros_and_ones_is_read_as_bool(backend):
    backend("auto")
    real = _pattern("holes")
    fused, table, _ = make_inputs(real.shape[0], LENGTH, 1, 16, 3, 5)
    q, k, v = (t.cpu() for t in fused.unbind(2))
    as_int = rel_key_attention(q, k, v, table.cpu(), 3, 5, 0.25, key_mask=real.to(torch.uint8))
    torch.testing.assert_close(as_int, rel_key_attention(q, k, v, table.cpu(), 3, 5, 0.25, key_mask=real))
