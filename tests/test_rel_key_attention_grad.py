"""Gradients of relative-key attention through its kernels (and the CPU path) against the literal reference.

On a machine without a GPU the Triton kernels run under the interpreter (tests/conftest.py), in fp32 and fp16;
the oracle is the reference (``W2VBERT_FAST_BACKEND=torch``, plain autograd through the L×L bias) in fp64.
"""

import importlib

import pytest
import torch
from conftest import FP32_ATOL, FP32_GRAD_RTOL, HAS_CUDA, assert_half_precision_close, relative_error

from w2vbert_fast.ops import rel_key_attention

kernel_module = importlib.import_module("w2vbert_fast.ops.rel_key_attention")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_inputs(batch, length, heads, head_dim, left, right, dtype=torch.float32, seed=0):
    """q, k, v as strided views of one fused projection output (B, L, 3, H, D), leaves of the graph."""
    generator = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, length, 3, heads, head_dim, generator=generator).to(DEVICE, dtype)
    fused.requires_grad_(True)
    q, k, v = fused.unbind(2)
    # large enough that the position bias moves the softmax: a dropped or misplaced bias gradient shows
    table = (2 * torch.randn(left + right + 1, head_dim, generator=generator)).to(DEVICE, dtype).requires_grad_(True)
    grad_out = torch.randn(batch, length, heads * head_dim, generator=generator).to(DEVICE, dtype)
    return fused, q, k, v, table, grad_out


def gradients(name, backend, fused, q, k, v, table, grad_out, left, right, lengths=None, zero_padded_queries=True):
    """(out, d_fused, d_table) with W2VBERT_FAST_BACKEND=name; d_fused holds dq, dk, dv side by side."""
    backend(name)
    out = rel_key_attention(q, k, v, table, left, right, q.shape[-1] ** -0.5, lengths, zero_padded_queries)
    d_fused, d_table = torch.autograd.grad(out, (fused, table), grad_out)
    return out, d_fused, d_table


def reference_gradients(backend, fused, table, grad_out, left, right, lengths=None, zero_padded_queries=True):
    fused64 = fused.detach().double().requires_grad_(True)
    table64 = table.detach().double().requires_grad_(True)
    q, k, v = fused64.unbind(2)
    return gradients("torch", backend, fused64, q, k, v, table64, grad_out.double(), left, right, lengths,
                     zero_padded_queries)


def assert_grads_close(ours, expected, rtol=FP32_GRAD_RTOL):
    """Relative error norm, or FP32_ATOL elementwise where the exact gradient is ~0 (one key: dq = dE = 0)."""
    for name, a, b in zip(("out", "dq/dk/dv", "d_distance_embedding"), ours, expected):
        assert torch.isfinite(a).all(), f"non-finite values in {name}"
        err = relative_error(a, b)
        diff = (a.double() - b.double()).abs().max().item()
        assert err <= rtol or diff <= FP32_ATOL, f"{name}: relative error {err:.2e} > {rtol:.0e}, max |diff| {diff:.1e}"


def check_against_reference(backend, name, batch, length, heads, head_dim, left, right, lengths=None,
                            zero_padded_queries=True, seed=0):
    fused, q, k, v, table, grad_out = make_inputs(batch, length, heads, head_dim, left, right, seed=seed)
    if lengths is not None:
        lengths = torch.tensor(lengths, device=DEVICE)
    ours = gradients(name, backend, fused, q, k, v, table, grad_out, left, right, lengths, zero_padded_queries)
    expected = reference_gradients(backend, fused, table, grad_out, left, right, lengths, zero_padded_queries)
    assert_grads_close(ours, expected)


# Windows wider than the interpreter's 32×16 blocks (w2v-bert-2.0's), narrower, and the degenerate one bucket.
WINDOWS = [(64, 8), (3, 5), (0, 0)]
WINDOW_IDS = ["left64-right8", "left3-right5", "left0-right0"]


@pytest.mark.parametrize("left,right", WINDOWS, ids=WINDOW_IDS)
@pytest.mark.parametrize("length", [1, 7, 129])
def test_kernel_gradients_match_the_reference_for_any_length_and_window(backend, length, left, right):
    check_against_reference(backend, "triton", 2, length, 2, 16, left, right)


@pytest.mark.parametrize("zero_padded_queries", [True, False], ids=["zero-padded-rows", "computed-padded-rows"])
@pytest.mark.parametrize("left,right", WINDOWS, ids=WINDOW_IDS)
def test_kernel_gradients_of_a_padded_batch(backend, left, right, zero_padded_queries):
    """Padded keys get no gradient and pass none on; with zero_padded_queries the padded rows' output is the
    constant 0, so their incoming gradient (random here) must reach nothing."""
    check_against_reference(backend, "triton", 4, 129, 1, 16, left, right, lengths=[129, 50, 1, 97],
                            zero_padded_queries=zero_padded_queries, seed=1)


@pytest.mark.parametrize("heads,head_dim", [(3, 24), (1, 80)], ids=["3x24", "1x80"])
def test_kernel_gradients_for_head_sizes_that_are_not_powers_of_two(backend, heads, head_dim):
    check_against_reference(backend, "triton", 2, 45, heads, head_dim, 6, 3, lengths=[45, 20])


@pytest.mark.parametrize("zero_padded_queries", [True, False], ids=["zero-padded-rows", "computed-padded-rows"])
def test_cpu_path_gradients_match_the_reference(backend, zero_padded_queries):
    """``auto`` on CPU tensors runs the chunked PyTorch path through the same autograd op."""
    if HAS_CUDA:
        pytest.skip("auto runs the Triton kernels on CUDA tensors; the CPU path is checked on CPU machines")
    check_against_reference(backend, "auto", 3, 129, 2, 16, 64, 8, lengths=[129, 40, 1],
                            zero_padded_queries=zero_padded_queries)


def test_heads_major_views_get_their_gradients(backend):
    """Any strides: q stored heads-major, a layout no projection produces, still read in place."""
    fused, q, k, v, table, grad_out = make_inputs(2, 40, 2, 16, 3, 5)
    base = q.detach().permute(0, 2, 1, 3).contiguous().requires_grad_(True)
    q_hm = base.permute(0, 2, 1, 3)
    expected = reference_gradients(backend, fused, table, grad_out, 3, 5)[1][:, :, 0]
    backend("triton")
    out = rel_key_attention(q_hm, k, v, table, 3, 5, 0.25)
    (d_base,) = torch.autograd.grad(out, (base,), grad_out)
    assert relative_error(d_base.permute(0, 2, 1, 3), expected) <= FP32_GRAD_RTOL


# ------------------------------------------------------------------------------ every tuned config, every write
def poisoned_grads(q):
    """dq (fp32 partial), dk, dv buffers full of NaN: an element the kernels never write fails the test."""
    shape = q.shape
    return (torch.full(shape, float("nan"), device=DEVICE), torch.full(shape, float("nan"), device=DEVICE,
                                                                        dtype=q.dtype),
            torch.full(shape, float("nan"), device=DEVICE, dtype=q.dtype))


def kernel_backward(q, k, v, table, grad_out, left, right, lengths, zero_padded_queries, **configs):
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        out, lse = kernel_module._launch(q, k, v, table, left, right, scale, lengths, zero_padded_queries)
        dq, dk, dv, d_table = kernel_module._launch_backward(
            grad_out, q, k, v, table, out, lse, left, right, scale, lengths, zero_padded_queries,
            grads=poisoned_grads(q), **configs)
    return out, torch.stack((dq, dk, dv), dim=2), d_table


def tuned_configs(keyword, tables):
    """Every triton.Config of ``tables``, ids BLOCK_M-BLOCK_N-warps-stages-maxnreg."""
    def ids(c):
        return "-".join(map(str, (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)))

    return [pytest.param({keyword: c}, id=f"{keyword.split('_')[0]}-{precision}-{ids(c)}")
            for precision, table in tables.items() if "+" not in precision for c in table]


@pytest.mark.parametrize("zero_padded_queries", [True, False], ids=["zero-padded-rows", "computed-padded-rows"])
@pytest.mark.parametrize(
    "configs",
    tuned_configs("dkdv_config", kernel_module.DKDV_CONFIGS) + tuned_configs("dq_config", kernel_module.DQ_CONFIGS))
def test_every_tuned_backward_config_writes_every_gradient(backend, configs, zero_padded_queries):
    """The GPU autotuner may pick any of these; each runs once under the interpreter on a ragged batch whose
    length is no multiple of any block, gradients poisoned with NaN before the kernels write them."""
    fused, q, k, v, table, grad_out = make_inputs(2, 200, 1, 16, 64, 8, seed=4)
    lengths = torch.tensor([200, 71], device=DEVICE, dtype=torch.int32)
    ours = kernel_backward(q.detach(), k.detach(), v.detach(), table.detach(), grad_out, 64, 8, lengths,
                           zero_padded_queries, **configs)
    expected = reference_gradients(backend, fused, table, grad_out, 64, 8, lengths, zero_padded_queries)
    assert_grads_close(ours, expected)


# --------------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("length", [7, 130])
def test_fp16_gradients_within_twice_pytorch_fp16_error(backend, length):
    fused, q, k, v, table, grad_out = make_inputs(2, length, 2, 32, 64, 8, dtype=torch.float16, seed=2)
    lengths = torch.tensor([length, max(1, length // 3)], device=DEVICE)
    ours = gradients("triton", backend, fused, q, k, v, table, grad_out, 64, 8, lengths)
    torch_fp16 = gradients("torch", backend, fused, q, k, v, table, grad_out, 64, 8, lengths)
    expected = reference_gradients(backend, fused, table, grad_out, 64, 8, lengths)
    for a, b, c in zip(ours, torch_fp16, expected):
        assert a.dtype == torch.float16
        assert_half_precision_close(a, b, c)


def test_autocast_gives_each_gradient_in_its_input_dtype(backend):
    """Under autocast q/k/v come from the Linear layers in fp16 while the embedding stays an fp32 parameter:
    the op casts it like the reference does and returns its gradient in fp32."""
    if HAS_CUDA:
        pytest.skip("the CPU autocast variant runs on CPU machines; on a GPU the bf16 test below covers it")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 33, 32, generator=generator)
    projection = torch.nn.Linear(32, 96)
    table = torch.nn.Parameter(2 * torch.randn(12, 16, generator=generator))
    lengths = torch.tensor([33, 20])

    def run(name):
        backend(name)
        projection.zero_grad()
        table.grad = None
        with torch.autocast("cpu", dtype=torch.float16):
            q, k, v = projection(x).view(2, 33, 3, 2, 16).unbind(2)
            assert q.dtype == torch.float16
            out = rel_key_attention(q, k, v, table, 8, 3, 0.25, lengths)
        out.float().square().sum().backward()
        return out, projection.weight.grad.clone(), table.grad.clone()

    ours, torch_fp16 = run("triton"), run("torch")
    assert ours[2].dtype == torch.float32 and ours[1].dtype == torch.float32
    projection.zero_grad()
    table.grad = None
    with torch.no_grad():
        projection.double()
        table.data = table.data.double()
    x = x.double()
    backend("torch")
    q, k, v = projection(x).view(2, 33, 3, 2, 16).unbind(2)
    rel_key_attention(q, k, v, table, 8, 3, 0.25, lengths).square().sum().backward()
    expected = (None, projection.weight.grad, table.grad)
    for a, b, c in list(zip(ours, torch_fp16, expected))[1:]:
        # ours and PyTorch both ran in fp16 then accumulated into fp32 gradients: compare their errors
        assert relative_error(a, c) <= 2 * relative_error(b, c) + 2e-3


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: under the interpreter bf16 tl.dot is wrong")
@pytest.mark.parametrize("length", [65, 1500])
def test_bf16_on_gpu_gradients_within_twice_pytorch_bf16_error(backend, length):
    fused, q, k, v, table, grad_out = make_inputs(2, length, 16, 64, 64, 8, dtype=torch.bfloat16, seed=3)
    lengths = torch.tensor([length, max(1, length // 2)], device=DEVICE)
    ours = gradients("triton", backend, fused, q, k, v, table, grad_out, 64, 8, lengths)
    torch_bf16 = gradients("torch", backend, fused, q, k, v, table, grad_out, 64, 8, lengths)
    expected = reference_gradients(backend, fused, table, grad_out, 64, 8, lengths)
    for a, b, c in zip(ours, torch_bf16, expected):
        assert_half_precision_close(a, b, c)


# --------------------------------------------------------------------------------------- memory, autograd plumbing
def saved_numels(fn):
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@pytest.mark.parametrize("name", ["triton", "auto"])
def test_nothing_of_size_length_squared_is_saved_for_backward(backend, name):
    length = 150  # one head of size 8, so q, k, v each hold 1,200 elements and L² = 22,500
    fused, q, k, v, table, grad_out = make_inputs(1, length, 1, 8, 64, 8)
    lengths = torch.tensor([120], device=DEVICE)

    def forward(name):
        backend(name)
        return lambda: rel_key_attention(q, k, v, table, 64, 8, 0.35, lengths)

    ours = saved_numels(forward(name))
    assert ours and max(ours) < length * length, ours
    # the check can fail: the reference keeps the L×L probabilities (and the L×L×D gather)
    assert max(saved_numels(forward("torch"))) >= length * length


def test_backward_runs_the_implementation_that_ran_the_forward(backend, monkeypatch):
    """The backend is read per call; a switch between forward and backward must not pair the kernel's forward
    with another path's backward (their saved lse could differ in meaning)."""
    calls = []
    real = kernel_module._launch_backward
    monkeypatch.setattr(kernel_module, "_launch_backward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    fused, q, k, v, table, grad_out = make_inputs(1, 20, 2, 16, 3, 5)
    backend("triton")
    out = rel_key_attention(q, k, v, table, 3, 5, 0.25)
    backend("torch")
    out.backward(grad_out)
    assert calls == [1]
    assert torch.isfinite(fused.grad).all()


def test_the_backward_op_is_registered_with_torch_library():
    fused, q, k, v, table, grad_out = make_inputs(2, 19, 2, 16, 3, 5)
    q, k, v, table = (t.detach() for t in (q, k, v, table))
    lengths = torch.tensor([19, 8], device=DEVICE, dtype=torch.int32)
    torch.library.opcheck(torch.ops.w2vbert_fast.rel_key_attention.default,
                          (q, k, v, table.requires_grad_(True), 3, 5, 0.25, lengths, True, "triton"),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    out, lse = kernel_module._launch(q, k, v, table.detach(), 3, 5, 0.25, lengths, True)
    torch.library.opcheck(torch.ops.w2vbert_fast.rel_key_attention_backward.default,
                          (grad_out, q, k, v, table.detach(), out, lse, 3, 5, 0.25, lengths, True, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_forward_and_backward_in_one_graph(backend):
    fused, q, k, v, table, grad_out = make_inputs(2, 30, 2, 16, 3, 5)
    lengths = torch.tensor([30, 12], device=DEVICE)
    expected = reference_gradients(backend, fused, table, grad_out, 3, 5, lengths)
    backend("triton")

    def step(fused, table, lengths, grad_out):
        q, k, v = fused.unbind(2)
        out = rel_key_attention(q, k, v, table, 3, 5, 0.25, lengths)
        return (out * grad_out).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(fused, table, lengths, grad_out)
    d_fused, d_table = torch.autograd.grad(loss, (fused, table))
    for a, b in zip((d_fused, d_table), expected[1:]):
        assert relative_error(a, b) <= FP32_GRAD_RTOL


@pytest.mark.parametrize("name", ["triton", "auto"])
def test_an_enclosing_autocast_region_changes_nothing_inside_the_op(backend, name):
    """Forward and backward run inside an autocast region (hand-written loops often call backward there): the op
    computes its bias table and gradients in fp32 as it does outside one, bit for bit."""
    if HAS_CUDA:
        pytest.skip("CPU autocast on CPU tensors; the GPU variant is the bf16 test above")
    fused, q, k, v, table, grad_out = make_inputs(2, 40, 2, 16, 3, 5, dtype=torch.float16)
    table = table.detach().float().requires_grad_(True)
    lengths = torch.tensor([40, 17])
    plain = gradients(name, backend, fused, q, k, v, table, grad_out, 3, 5, lengths)
    with torch.autocast("cpu", dtype=torch.float16):
        inside = gradients(name, backend, fused, q, k, v, table, grad_out, 3, 5, lengths)
    for a, b in zip(inside, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)
