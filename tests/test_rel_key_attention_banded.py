"""The band-decomposed path of relative-key attention (ops/rel_key_attention_banded.py, the CPU path): query-chunked,
O(L) memory.

Checked against the literal transformers-style reference, forward (fp32 within 1e-5) and backward (fp64, where any
slip in the bucket bookkeeping shows at 1e-10), at lengths either side of a chunk boundary, with bands wider and
narrower than a chunk, ragged right padding and both modes of padded query rows. Then memory: a subprocess
measures the peak RSS a call adds, which must stay linear in L through ``ops.rel_key_attention`` on the ``auto``
backend, forward and backward.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

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
    from conftest import assert_half_precision_close

    q, k, v, emb, left, right, scale = make_inputs("L33-band-wider-than-chunk", torch.float32)
    lengths = ragged_lengths(q.shape[0], q.shape[1])
    low = [t.to(dtype) for t in (q, k, v, emb)]
    out, _ = rel_key_attention_chunked(*low, left, right, scale, lengths, True, chunk=CHUNK)
    assert out.dtype == dtype
    expected = reference(q, k, v, emb, left, right, scale, lengths, True)
    torch_low = reference(*low, left, right, scale, lengths, True)
    assert_half_precision_close(out, torch_low, expected)


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
