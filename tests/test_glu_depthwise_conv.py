"""The fused GLU → causal depthwise conv → LayerNorm → swish kernels (forward and backward) against their PyTorch
reference and against transformers' Wav2Vec2BertConvolutionModule end to end.

On a machine without a GPU the kernels run under Triton's interpreter (tests/conftest.py), fp32 and fp16;
bf16 is checked on the GPU only (the interpreter emulates bf16 through fp32 numpy arrays, so a CPU bf16 run would
check the emulation, not the kernel's rounding).
"""

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import FP32_ATOL, HAS_CUDA, assert_fp32_close, assert_half_precision_close, requires_cuda
from model_helpers import randomize_

from w2vbert_fast import Wav2Vec2BertConfig
from w2vbert_fast.modeling import Padding, Wav2Vec2BertConvolutionModule
from w2vbert_fast.ops import glu_depthwise_conv, glu_depthwise_conv_reference
from w2vbert_fast.ops.glu_depthwise_conv import _launch, _launch_backward

kernel_module = importlib.import_module("w2vbert_fast.ops.glu_depthwise_conv")
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-5


def make_inputs(batch, length, channels, kernel_size, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, 2 * channels, generator=generator)
    weight = torch.randn(channels, 1, kernel_size, generator=generator) / kernel_size ** 0.5
    ln_weight = 1 + 0.2 * torch.randn(channels, generator=generator)
    ln_bias = 0.2 * torch.randn(channels, generator=generator)
    return tuple(t.to(DEVICE, dtype) for t in (x, weight, ln_weight, ln_bias))


def reference_fp32(x, weight, ln_weight, ln_bias, lengths=None, frame_mask=None):
    return glu_depthwise_conv_reference(x.float(), weight.float(), ln_weight.float(), ln_bias.float(), EPS, lengths,
                                        frame_mask)


def ragged_lengths(batch, length):
    """The full length, then shorter ones down to a single frame."""
    return torch.tensor([length, max(1, length // 2 - 1), 1][:batch], device=DEVICE)


@pytest.mark.parametrize("kernel_size", [3, 7, 31])
@pytest.mark.parametrize("length", [1, 5, 31, 32, 100])
def test_kernel_matches_reference_fp32_for_any_length_and_kernel_size(backend, length, kernel_size):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(3, length, 48, kernel_size)
    lengths = ragged_lengths(3, length)
    out = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, lengths)
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


@pytest.mark.parametrize("channels,length", [(48, 33), (72, 40), (1024, 20)])
def test_channel_counts_that_are_not_powers_of_two_and_the_real_one(backend, channels, length):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, length, channels, 31, seed=1)
    lengths = ragged_lengths(2, length)
    out = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, lengths)
    assert out.shape == (2, length, channels)
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


def test_without_lengths_every_position_is_real(backend):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, 37, 48, 7)
    out = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS)
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias))


def test_padded_positions_are_zero_input_not_garbage(backend):
    """Whatever sits in x past a sequence's length must not reach the real rows (nor make anything non-finite)."""
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, 40, 48, 31)
    lengths = torch.tensor([40, 13], device=DEVICE)
    poisoned = x.clone()
    poisoned[1, 13:] = float("nan")
    out = glu_depthwise_conv(poisoned, weight, ln_weight, ln_bias, EPS, lengths)
    assert torch.isfinite(out).all()
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


def test_output_is_causal(backend):
    """Changing input t changes no output before t."""
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(1, 30, 48, 7)
    changed = x.clone()
    changed[0, 17] += 5.0
    a = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS)
    b = glu_depthwise_conv(changed, weight, ln_weight, ln_bias, EPS)
    assert torch.equal(a[0, :17], b[0, :17])
    assert not torch.equal(a[0, 17:24], b[0, 17:24])


@pytest.mark.parametrize("config", [(8, 32, 4, 1), (8, 32, 4, 5), (16, 64, 4, 2), (32, 128, 8, 3), (16, 16, 4, 4)],
                         ids=["one-program", "five-programs", "tile16-chunk64", "tile32-one-chunk", "chunk16"])
def test_every_output_element_is_written_whatever_the_tiling(config):
    """The output is poisoned with NaN first; persistent programs must cover every tile and every channel chunk,
    ragged last ones included. config: (BLOCK_T, BLOCK_C, num_warps, programs)."""
    x, weight, ln_weight, ln_bias = make_inputs(3, 45, 72, 31, seed=2)
    lengths = torch.tensor([45, 20, 1], device=DEVICE, dtype=torch.int32)
    out = torch.full((3, 45, 72), float("nan"), device=DEVICE)
    block_t, block_c, num_warps, programs = config
    _launch(x, weight, ln_weight, ln_bias, EPS, lengths, out=out, programs=programs,
            config=triton.Config({"BLOCK_T": block_t, "BLOCK_C": block_c}, num_warps=num_warps, num_stages=1))
    assert torch.isfinite(out).all()
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


GPU_CONFIGS = kernel_module.FORWARD_CONFIGS


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: "T{BLOCK_T}-C{BLOCK_C}".format(**c.kwargs))
def test_every_gpu_autotune_config_is_correct(config):
    """What the autotuner may pick on a GPU, run here under the interpreter: a wrong tiling fails in CI, not later."""
    x, weight, ln_weight, ln_bias = make_inputs(2, 37, 136, 31, seed=6)
    lengths = torch.tensor([37, 9], device=DEVICE, dtype=torch.int32)
    out = torch.full((2, 37, 136), float("nan"), device=DEVICE)
    _launch(x, weight, ln_weight, ln_bias, EPS, lengths, out=out, config=config, programs=2)
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


@pytest.mark.parametrize("length,kernel_size", [(5, 3), (32, 31), (100, 31)])
def test_fp16_error_within_twice_pytorch_fp16_error(backend, length, kernel_size):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, length, 72, kernel_size, dtype=torch.float16, seed=3)
    lengths = ragged_lengths(2, length)
    ours = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, lengths)
    assert ours.dtype == torch.float16
    torch_fp16 = glu_depthwise_conv_reference(x, weight, ln_weight, ln_bias, EPS, lengths)
    assert_half_precision_close(ours, torch_fp16, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


@requires_cuda
@pytest.mark.parametrize("length", [1, 100, 1500])
def test_bf16_on_gpu_error_within_twice_pytorch_bf16_error(backend, length):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, length, 1024, 31, dtype=torch.bfloat16, seed=4)
    lengths = ragged_lengths(2, length)
    ours = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, lengths)
    torch_bf16 = glu_depthwise_conv_reference(x, weight, ln_weight, ln_bias, EPS, lengths)
    assert_half_precision_close(ours, torch_bf16, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


def test_strided_input_view_is_read_in_place(backend):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, 21, 48, 7)
    wide = torch.cat([x, torch.randn_like(x)], dim=-1)
    view = wide[..., : x.shape[-1]]  # row stride 4C, not 2C
    out = glu_depthwise_conv(view, weight, ln_weight, ln_bias, EPS)
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias))


def test_the_op_is_registered_with_torch_library():
    x, weight, ln_weight, ln_bias = make_inputs(2, 9, 48, 3)
    lengths = torch.tensor([9, 4], device=DEVICE, dtype=torch.int32)
    # schema, fake tensor, autograd registration and aot dispatch (dynamic shapes): what torch.compile relies on
    torch.library.opcheck(torch.ops.w2vbert_fast.glu_depthwise_conv.default,
                          (x, weight, ln_weight, ln_bias, EPS, lengths, None))


def test_torch_compile_traces_through_the_kernel_without_graph_breaks(backend):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, 14, 48, 5)
    lengths = torch.tensor([14, 6], device=DEVICE)
    compiled = torch.compile(lambda *a: glu_depthwise_conv(*a, EPS, lengths) + 1, backend="aot_eager", fullgraph=True)
    assert_fp32_close(compiled(x, weight, ln_weight, ln_bias), reference_fp32(x, weight, ln_weight, ln_bias, lengths) + 1)


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "x": a["x"][0]}, "x must have shape"),
        (lambda a: {**a, "x": a["x"][..., :-1]}, "x must have shape"),
        (lambda a: {**a, "x": a["x"].long()}, "x must be a floating-point"),
        (lambda a: {**a, "conv_weight": a["conv_weight"][..., :-1]}, "conv_weight must have shape"),
        (lambda a: {**a, "conv_weight": a["conv_weight"][:-1]}, "conv_weight must have shape"),
        (lambda a: {**a, "ln_bias": a["ln_bias"][:-1]}, "ln_bias must have shape"),
        (lambda a: {**a, "lengths": torch.tensor([3])}, "lengths must be a"),
        (lambda a: {**a, "lengths": torch.tensor([3.0, 2.0])}, "lengths must be an integer tensor"),
        (lambda a: {**a, "lengths": torch.tensor([3, -1])}, "lengths must be non-negative"),
        (lambda a: {**a, "frame_mask": torch.ones(2, 7, dtype=torch.bool)}, r"frame_mask must be a \(batch, time\)"),
        (lambda a: {**a, "frame_mask": torch.ones(8, dtype=torch.bool)}, r"frame_mask must be a \(batch, time\)"),
        (lambda a: {**a, "frame_mask": [[1] * 8] * 2}, r"frame_mask must be a \(batch, time\)"),
        (lambda a: {**a, "frame_mask": torch.ones(2, 8)}, "frame_mask must be a bool or 0/1 integer tensor"),
        (lambda a: {**a, "frame_mask": torch.full((2, 8), 2)}, "frame_mask must hold only 0 and 1"),
        (lambda a: {**a, "frame_mask": torch.ones(2, 8, dtype=torch.bool, device="meta")}, "must be on one device"),
    ],
    ids=["rank", "odd-last-dim", "integer-x", "even-kernel", "weight-channels", "ln-shape", "lengths-shape",
         "float-lengths", "negative-length", "mask-shape", "mask-rank", "mask-not-a-tensor", "float-mask",
         "mask-values", "mask-device"],
)
def test_bad_inputs_are_value_errors_naming_the_argument(backend, change, message):
    backend("triton")
    # on the CPU: that is where lengths' values are checked (on a GPU the check would sync every layer)
    x, weight, ln_weight, ln_bias = (t.cpu() for t in make_inputs(2, 8, 48, 5))
    args = dict(x=x, conv_weight=weight, ln_weight=ln_weight, ln_bias=ln_bias, eps=EPS, lengths=torch.tensor([8, 3]))
    with pytest.raises(ValueError, match=message):
        glu_depthwise_conv(**change(args))


# ------------------------------------------------------------------------------- the module, vs transformers
@pytest.mark.parametrize("channels,kernel_size,lengths", [(48, 3, [5, 5]), (72, 7, [31, 12, 1]), (1024, 31, [32, 17])],
                         ids=["C48-K3", "C72-K7-ragged", "C1024-K31-ragged"])
def test_convolution_module_matches_transformers_end_to_end(backend, monkeypatch, channels, kernel_size, lengths):
    backend("triton")
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as hf_modeling

    calls = []
    real = kernel_module._glu_depthwise_conv_op
    monkeypatch.setattr(kernel_module, "_glu_depthwise_conv_op", lambda *a: calls.append(1) or real(*a))
    hf_config = transformers.Wav2Vec2BertConfig(hidden_size=channels, num_attention_heads=4,
                                                conv_depthwise_kernel_size=kernel_size)
    torch.manual_seed(0)
    hf = randomize_(hf_modeling.Wav2Vec2BertConvolutionModule(hf_config)).eval()
    ours = Wav2Vec2BertConvolutionModule(Wav2Vec2BertConfig.from_dict(hf_config.to_dict())).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    ours.to(DEVICE)  # transformers, the oracle, stays on the CPU
    length = max(lengths)
    hidden = torch.randn(len(lengths), length, channels, generator=torch.Generator().manual_seed(5))
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        expected = hf(hidden, attention_mask=mask)
        padding = Padding.from_attention_mask(mask.long().to(DEVICE), length, len(lengths))
        out = ours(hidden.to(DEVICE), padding).cpu()
    assert calls, "the kernel did not run"
    for i, n in enumerate(lengths):
        assert (out[i, :n] - expected[i, :n]).abs().max().item() <= FP32_ATOL


# --------------------------------------------------------------------------------------------- gradients
PARAMETERS = ("x", "conv_weight", "ln_weight", "ln_bias")


def reference_gradients(inputs, dout, lengths=None, dtype=torch.float32, frame_mask=None):
    """Gradients of (x, conv_weight, ln_weight, ln_bias) through the reference computed in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs]
    out = glu_depthwise_conv_reference(*leaves, EPS, lengths, frame_mask)
    return torch.autograd.grad(out, leaves, dout.to(dtype))


def our_gradients(inputs, dout, lengths=None, frame_mask=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = glu_depthwise_conv(*leaves, EPS, lengths, frame_mask)
    return torch.autograd.grad(out, leaves, dout)


def assert_gradient_close(name, actual, expected):
    """fp32 gradients: 1e-4 (FP32_ATOL) relative to the gradient's largest element; dweight sums over T and
    B, so its elements reach tens where the forward's outputs stay near one."""
    assert actual.dtype == expected.dtype, f"d{name}: dtype {actual.dtype}, expected {expected.dtype}"
    scale = max(1.0, expected.abs().max().item())
    try:
        assert_fp32_close(actual, expected, atol=FP32_ATOL * scale)
    except AssertionError as error:
        raise AssertionError(f"d{name}: {error}") from None


def make_dout(batch, length, channels, dtype=torch.float32, seed=7):
    return torch.randn(batch, length, channels, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize("length", [1, 7, 33, 129])
def test_gradients_through_the_kernels_match_the_reference_fp32(backend, monkeypatch, length):
    """Ragged batch (full, about half), C = 40 (not a power of two, not a multiple of the chunk), K = 31
    (T = 33 is just past the kernel's reach, 129 spans several splits of the GLU backward)."""
    backend("triton")
    calls = []
    real = kernel_module._launch_backward
    monkeypatch.setattr(kernel_module, "_launch_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(2, length, 40, 31, seed=8)
    lengths = ragged_lengths(2, length)
    dout = make_dout(2, length, 40)
    ours = our_gradients(inputs, dout, lengths)
    assert calls, "the backward kernels did not run"
    for name, actual, expected in zip(PARAMETERS, ours, reference_gradients(inputs, dout, lengths)):
        assert_gradient_close(name, actual, expected)


def test_gradients_without_lengths_and_with_a_short_kernel(backend):
    backend("triton")
    inputs = make_inputs(2, 20, 24, 3, seed=9)
    dout = make_dout(2, 20, 24)
    for name, actual, expected in zip(PARAMETERS, our_gradients(inputs, dout), reference_gradients(inputs, dout)):
        assert_gradient_close(name, actual, expected)


def test_no_gradient_reaches_padded_input_rows_and_they_do_not_poison_the_rest(backend):
    """Rows at or past a sequence's length are zero input: their dx is exactly 0, NaN there changes nothing."""
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, 24, 24, 31, seed=10)
    lengths = torch.tensor([24, 9], device=DEVICE)
    poisoned = x.clone()
    poisoned[1, 9:] = float("nan")
    dout = make_dout(2, 24, 24)
    ours = our_gradients((poisoned, weight, ln_weight, ln_bias), dout, lengths)
    assert torch.equal(ours[0][1, 9:], torch.zeros_like(ours[0][1, 9:]))
    for name, actual, expected in zip(PARAMETERS, ours, reference_gradients((x, weight, ln_weight, ln_bias), dout,
                                                                              lengths)):
        assert_gradient_close(name, actual, expected)


def nan_buffers(batch, length, channels):
    dx = torch.full((batch, length, 2 * channels), float("nan"), device=DEVICE)
    dconv = torch.full((batch, length, channels), float("nan"), device=DEVICE)
    return dx, dconv


def run_backward(inputs, dout, lengths, frame_mask=None, **configs):
    """The backward launcher straight, on NaN-filled dx and dconv buffers, with forced configs."""
    x, weight, ln_weight, ln_bias = inputs
    _, mean, rstd = _launch(x, weight, ln_weight, ln_bias, EPS, lengths, frame_mask)
    dx, dconv = nan_buffers(x.shape[0], x.shape[1], x.shape[2] // 2)
    return _launch_backward(dout, x, weight, ln_weight, ln_bias, lengths, frame_mask, mean, rstd, dx=dx, dconv=dconv,
                            **configs)


NORM_CONFIGS = kernel_module.NORM_BACKWARD_CONFIGS
GLU_CONFIGS = kernel_module.GLU_BACKWARD_CONFIGS


def config_id(config):
    return "T{BLOCK_T}-C{BLOCK_C}-w".format(**config.kwargs) + str(config.num_warps)


@pytest.mark.parametrize("config", NORM_CONFIGS, ids=config_id)
def test_every_gpu_config_of_the_layernorm_backward_is_correct(config):
    """What the autotuner may pick on a GPU, under the interpreter; dconv and dx start as NaN."""
    inputs = make_inputs(2, 21, 136, 31, seed=11)
    lengths = torch.tensor([21, 6], device=DEVICE, dtype=torch.int32)
    dout = make_dout(2, 21, 136)
    ours = run_backward(inputs, dout, lengths, norm_config=config, norm_programs=2)
    for name, actual, expected in zip(PARAMETERS, ours, reference_gradients(inputs, dout, lengths)):
        assert_gradient_close(name, actual, expected)


@pytest.mark.parametrize("config", GLU_CONFIGS, ids=config_id)
def test_every_gpu_config_of_the_glu_conv_backward_is_correct(config):
    """Each config with 2 time splits of its BLOCK_T (ragged last) and a ragged last channel chunk."""
    block_t = config.kwargs["BLOCK_T"]
    length = block_t + 5
    inputs = make_inputs(2, length, 136, 31, seed=12)
    lengths = torch.tensor([length, block_t - 3], device=DEVICE, dtype=torch.int32)
    dout = make_dout(2, length, 136)
    # target programs: 2 sequences × 2 chunks (of the widest config, 128) × 3 splits, capped at 2 by the length
    ours = run_backward(inputs, dout, lengths, glu_config=config, glu_programs=12)
    for name, actual, expected in zip(PARAMETERS, ours, reference_gradients(inputs, dout, lengths)):
        assert_gradient_close(name, actual, expected)


@pytest.mark.parametrize("programs", [1, 5], ids=["one-program", "five-programs"])
def test_every_gradient_element_is_written_whatever_the_split(programs):
    """One persistent program walking every tile, or several; one GLU-backward split or several."""
    inputs = make_inputs(3, 29, 40, 31, seed=13)
    lengths = torch.tensor([29, 12, 1], device=DEVICE, dtype=torch.int32)
    dout = make_dout(3, 29, 40)
    tiling = triton.Config({"BLOCK_T": 8, "BLOCK_C": 32}, num_warps=4, num_stages=1)
    ours = run_backward(inputs, dout, lengths, norm_config=tiling, norm_programs=programs, glu_config=tiling,
                        glu_programs=programs * 3 * 2)
    for name, actual, expected in zip(PARAMETERS, ours, reference_gradients(inputs, dout, lengths)):
        assert_gradient_close(name, actual, expected)


def test_fp16_gradients_within_twice_pytorch_fp16_error(backend):
    backend("triton")
    inputs = make_inputs(2, 24, 40, 31, dtype=torch.float16, seed=14)
    lengths = ragged_lengths(2, 24)
    dout = make_dout(2, 24, 40, dtype=torch.float16)
    ours = our_gradients(inputs, dout, lengths)
    torch_fp16 = reference_gradients(inputs, dout, lengths, dtype=torch.float16)
    fp32 = reference_gradients(inputs, dout, lengths)
    for name, a, t, e in zip(PARAMETERS, ours, torch_fp16, fp32):
        assert a.dtype == torch.float16, name
        assert_half_precision_close(a, t, e)


@requires_cuda
@pytest.mark.parametrize("length", [7, 1500])
def test_bf16_gradients_on_gpu_within_twice_pytorch_bf16_error(backend, length):
    """GPU only: the interpreter emulates bf16 through fp32 numpy arrays, so a CPU run would not see bf16 rounding.
    The model's sizes (C = 1024, K = 31), autocast's mix: x and dout in bf16, the parameters in fp32."""
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, length, 1024, 31, seed=20)
    inputs = (x.bfloat16(), weight, ln_weight, ln_bias)
    lengths = ragged_lengths(2, length)
    dout = make_dout(2, length, 1024, dtype=torch.bfloat16)
    ours = our_gradients(inputs, dout, lengths)
    torch_bf16 = reference_gradients(inputs, dout, lengths, dtype=torch.bfloat16)
    fp32 = reference_gradients(inputs, dout, lengths)
    for name, a, t, e in zip(PARAMETERS, ours, torch_bf16, fp32):
        assert a.dtype == inputs[PARAMETERS.index(name)].dtype, name
        assert_half_precision_close(a.bfloat16(), t, e)


def test_half_input_with_fp32_weights_gives_each_gradient_in_its_input_dtype(backend):
    """What autocast hands the op: x in fp16 (from the Linear), the conv and LayerNorm parameters in fp32."""
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(2, 30, 40, 31, seed=15)
    lengths = ragged_lengths(2, 30)
    dout = make_dout(2, 30, 40, dtype=torch.float16)
    ours = our_gradients((x.half(), weight, ln_weight, ln_bias), dout, lengths)
    assert [g.dtype for g in ours] == [torch.float16, torch.float32, torch.float32, torch.float32]
    fp32 = reference_gradients((x.half(), weight, ln_weight, ln_bias), dout, lengths)
    torch_mixed = reference_gradients((x.half(), weight, ln_weight, ln_bias), dout, lengths, dtype=torch.float16)
    for name, a, t, e in zip(PARAMETERS, ours, torch_mixed, fp32):
        assert_half_precision_close(a.half(), t, e)


def test_the_convolution_module_trains_under_autocast(backend):
    """torch.autocast around the whole module: the Linear gives half precision, the op takes it with fp32 weights,
    every parameter gets a finite gradient in fp32."""
    backend("triton")
    config = Wav2Vec2BertConfig.from_dict(dict(hidden_size=24, num_attention_heads=4, conv_depthwise_kernel_size=7))
    torch.manual_seed(0)
    module = Wav2Vec2BertConvolutionModule(config).to(DEVICE).train()
    module.dropout.p = 0.0
    hidden = torch.randn(2, 11, 24, device=DEVICE)
    calls = []
    real = kernel_module._launch_backward
    try:
        kernel_module._launch_backward = lambda *a, **k: calls.append(a[1].dtype) or real(*a, **k)
        with torch.autocast(DEVICE, dtype=torch.float16 if HAS_CUDA else torch.bfloat16):
            out = module(hidden)
        out.float().square().mean().backward()
    finally:
        kernel_module._launch_backward = real
    assert calls and calls[0] != torch.float32, "the op did not see a half-precision input"
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


def test_nothing_larger_than_the_input_is_saved_for_backward(backend):
    """x (B·T·2C) and two floats a row: no (B, T, C) intermediate of the GLU, conv or LayerNorm is kept."""
    backend("triton")
    inputs = [t.requires_grad_(True) for t in make_inputs(2, 19, 24, 31, seed=16)]
    lengths = ragged_lengths(2, 19)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = glu_depthwise_conv(*inputs, EPS, lengths)
    out.sum().backward()
    x = inputs[0]
    assert saved and max(saved) <= x.numel()
    # x itself, then at most (C, 1, K) + 2C + B + 2·B·T
    assert sum(saved) <= x.numel() + inputs[1].numel() + 2 * 24 + 2 + 2 * 2 * 19


@pytest.mark.parametrize("name", ["torch", "auto", "triton"])
def test_empty_time_axis_gives_an_empty_result_on_every_backend(backend, name):
    backend(name)
    x, weight, ln_weight, ln_bias = make_inputs(2, 0, 24, 31)
    x.requires_grad_(True)
    out = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, torch.tensor([0, 0], device=DEVICE))
    assert out.shape == (2, 0, 24) and out.dtype == x.dtype
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_the_backward_op_is_registered_with_torch_library():
    inputs = make_inputs(2, 9, 24, 3, seed=17)
    lengths = torch.tensor([9, 4], device=DEVICE, dtype=torch.int32)
    _, mean, rstd = _launch(*inputs, EPS, lengths)
    torch.library.opcheck(torch.ops.w2vbert_fast.glu_depthwise_conv_backward.default,
                          (make_dout(2, 9, 24), *inputs, lengths, None, mean, rstd))


def test_torch_compile_traces_forward_and_backward_through_the_kernels(backend, monkeypatch):
    """One graph forward (fullgraph), and AOT autograd's backward graph runs the backward op."""
    backend("triton")
    calls = []
    real = kernel_module._launch_backward
    monkeypatch.setattr(kernel_module, "_launch_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(2, 14, 24, 5, seed=18)
    lengths = torch.tensor([14, 6], device=DEVICE)
    dout = make_dout(2, 14, 24)
    compiled = torch.compile(lambda *a: glu_depthwise_conv(*a, EPS, lengths) * dout, backend="aot_eager",
                             fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    compiled(*leaves).sum().backward()
    assert calls, "the backward kernels did not run"
    for name, leaf, expected in zip(PARAMETERS, leaves, reference_gradients(inputs, dout, lengths)):
        assert_gradient_close(name, leaf.grad, expected)


@pytest.mark.parametrize("name", ["torch", "auto"])
def test_pytorch_paths_give_the_reference_gradients(backend, name):
    """``torch`` everywhere and ``auto`` on CPU tensors: the reference with plain autograd (the GPU's ``auto`` is
    the kernels, checked above)."""
    backend(name)
    inputs = [t.cpu() for t in make_inputs(2, 12, 24, 7, seed=19)]
    dout = make_dout(2, 12, 24).cpu()
    lengths = torch.tensor([12, 5])
    for pname, actual, expected in zip(PARAMETERS, our_gradients(inputs, dout, lengths),
                                       reference_gradients(inputs, dout, lengths)):
        assert torch.equal(actual, expected), pname


# ------------------------------------------------------------------------ frame masks: left padding, holes
# transformers' conv module zeroes every masked frame (masked_fill before pointwise_conv1, which has no bias), at any
# position; frame_mask carries that. Every form comes with an all-real row (row 3) in the same batch.
MASK_FORMS = ["left", "holes", "mixed"]


def frame_mask_of(form, length):
    """(4, length) bool masks, True at real frames."""
    mask = torch.ones(4, length, dtype=torch.bool)
    if form == "left":
        mask[0, :6] = False
        mask[1, : length - 1] = False  # one real frame, the last
        mask[2, :1] = False
    elif form == "holes":
        mask[0, 3:8] = False  # a hole, then real frames again
        mask[1, ::4] = False  # many one-frame holes, frame 0 among them
        mask[2, 0] = False  # a hole at frame 0 alone, and right padding
        mask[2, length - 4:] = False
    elif form == "mixed":
        mask[0, :4] = False  # left padding and a hole
        mask[0, 10:12] = False
        mask[1, length - 5:] = False  # plain right padding
        mask[2] = False  # no real frame at all
    return mask.to(DEVICE)


def last_real_lengths(mask):
    """One past each row's last real frame (what the model passes as lengths with its frame mask), on the device."""
    return (mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax(1)


LENGTHS_WITH_MASK = {
    "no-lengths": lambda mask: None,
    "last-real": last_real_lengths,
    # lengths cutting real frames off: a frame is zero input if either says so
    "shorter": lambda mask: (last_real_lengths(mask) - 3).clamp_min(0),
}


def poisoned_at(x, zero_input):
    """x with NaN wherever the input is zero input: a kernel that reads it there fails."""
    return x.masked_fill(zero_input[..., None], float("nan"))


def zero_input_frames(mask, lengths):
    zero = ~mask
    if lengths is not None:
        zero |= torch.arange(mask.shape[1], device=mask.device)[None, :] >= lengths[:, None]
    return zero


@pytest.mark.parametrize("lengths_of", LENGTHS_WITH_MASK.values(), ids=LENGTHS_WITH_MASK.keys())
@pytest.mark.parametrize("form", MASK_FORMS)
def test_kernels_make_masked_frames_zero_input_at_any_position(backend, form, lengths_of):
    """Every output row (masked ones too: the conv of their neighbours) against the reference; NaN at every
    zero-input frame of x must not reach any output. C = 40 is not a multiple of the interpreter's chunk."""
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(4, 37, 40, 31, seed=21)
    mask = frame_mask_of(form, 37)
    lengths = lengths_of(mask)
    out = glu_depthwise_conv(poisoned_at(x, zero_input_frames(mask, lengths)), weight, ln_weight, ln_bias, EPS,
                             lengths, mask)
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths, mask))


def test_the_frame_mask_changes_exactly_the_frames_it_masks(backend):
    """A hole is not right padding: frames after it stay real. Against the reference with the same x zeroed by hand
    (so the reference's own masking is checked too), and against the unmasked call, which must differ."""
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(4, 25, 24, 5, seed=22)
    mask = frame_mask_of("holes", 25)
    out = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, None, mask)
    zeroed = x.masked_fill(~mask[..., None], 0.0)
    assert_fp32_close(out, reference_fp32(zeroed, weight, ln_weight, ln_bias))
    unmasked = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS)
    assert torch.equal(out[3], unmasked[3])  # the all-real row
    assert (out[0, 3:12] - unmasked[0, 3:12]).abs().amax() > 1e-3  # the hole and the K - 1 frames after it
    assert torch.equal(out[0, :3], unmasked[0, :3]) and torch.equal(out[0, 12:], unmasked[0, 12:])


@pytest.mark.parametrize("name", ["triton", "auto", "torch"])
def test_an_integer_mask_reads_as_its_bool(backend, name):
    """transformers' attention_mask is 0/1 int64: the same result as the bool mask on every backend."""
    backend(name)
    x, weight, ln_weight, ln_bias = make_inputs(4, 19, 24, 5, seed=23)
    mask = frame_mask_of("holes", 19)
    as_bool = glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, None, mask)
    for integer_mask in (mask.long(), mask.to(torch.uint8), mask.int()):
        assert torch.equal(glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, None, integer_mask), as_bool)


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: "T{BLOCK_T}-C{BLOCK_C}".format(**c.kwargs))
def test_every_gpu_forward_config_with_a_frame_mask_writes_every_element(config):
    """NaN-filled output, the holes mask's first two rows with lengths (one past the last real frame), 2 persistent
    programs."""
    x, weight, ln_weight, ln_bias = make_inputs(2, 37, 136, 31, seed=24)
    mask = frame_mask_of("holes", 37)[:2]
    lengths = last_real_lengths(mask).to(torch.int32)
    out = torch.full((2, 37, 136), float("nan"), device=DEVICE)
    _launch(poisoned_at(x, zero_input_frames(mask, lengths)), weight, ln_weight, ln_bias, EPS, lengths, mask,
            out=out, config=config, programs=2)
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths, mask))


@pytest.mark.parametrize("lengths_of", LENGTHS_WITH_MASK.values(), ids=LENGTHS_WITH_MASK.keys())
@pytest.mark.parametrize("form", MASK_FORMS)
def test_gradients_with_a_frame_mask_match_the_reference(backend, monkeypatch, form, lengths_of):
    """Through the kernels: dx exactly 0 at every zero-input frame (a constant in transformers), NaN in x there
    changes no gradient; dconv_weight, dln_weight, dln_bias as the reference's."""
    backend("triton")
    calls = []
    real = kernel_module._launch_backward
    monkeypatch.setattr(kernel_module, "_launch_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, weight, ln_weight, ln_bias = make_inputs(4, 29, 40, 31, seed=25)
    mask = frame_mask_of(form, 29)
    lengths = lengths_of(mask)
    zero_input = zero_input_frames(mask, lengths)
    dout = make_dout(4, 29, 40)
    ours = our_gradients((poisoned_at(x, zero_input), weight, ln_weight, ln_bias), dout, lengths, mask)
    assert calls, "the backward kernels did not run"
    assert torch.equal(ours[0][zero_input], torch.zeros_like(ours[0][zero_input]))
    expected = reference_gradients((x, weight, ln_weight, ln_bias), dout, lengths, frame_mask=mask)
    for name, actual, wanted in zip(PARAMETERS, ours, expected):
        assert_gradient_close(name, actual, wanted)


@pytest.mark.parametrize("config", NORM_CONFIGS, ids=config_id)
def test_every_gpu_config_of_the_layernorm_backward_with_a_frame_mask(config):
    """dx and dconv start as NaN; the holes mask's first two rows, without lengths."""
    inputs = make_inputs(2, 21, 136, 31, seed=26)
    mask = frame_mask_of("holes", 21)[:2]
    dout = make_dout(2, 21, 136)
    ours = run_backward(inputs, dout, None, mask, norm_config=config, norm_programs=2)
    for name, actual, expected in zip(PARAMETERS, ours, reference_gradients(inputs, dout, frame_mask=mask)):
        assert_gradient_close(name, actual, expected)


@pytest.mark.parametrize("config", GLU_CONFIGS, ids=config_id)
def test_every_gpu_config_of_the_glu_conv_backward_with_a_frame_mask(config):
    """Two time splits of the config's BLOCK_T, a ragged last channel chunk, the left-padded mask's first two rows
    with lengths."""
    length = config.kwargs["BLOCK_T"] + 5
    inputs = make_inputs(2, length, 136, 31, seed=27)
    mask = frame_mask_of("left", length)[:2]
    lengths = last_real_lengths(mask).to(torch.int32)
    dout = make_dout(2, length, 136)
    # target programs: as the right-padding test above (2 sequences × 2 chunks × 3 splits, capped at 2 splits)
    ours = run_backward(inputs, dout, lengths, mask, glu_config=config, glu_programs=12)
    for name, actual, expected in zip(PARAMETERS, ours, reference_gradients(inputs, dout, lengths, frame_mask=mask)):
        assert_gradient_close(name, actual, expected)


def conv_module_through_the_op(module, hidden, lengths, frame_mask):
    """transformers' convolution module with its middle through our op, on the module's own parameters. The
    LayerNorm output is not masked here: the op has to zero the masked frames itself."""
    x = F.linear(module.layer_norm(hidden), module.pointwise_conv1.weight[:, :, 0])
    norm = module.depthwise_layer_norm
    y = glu_depthwise_conv(x, module.depthwise_conv.weight, norm.weight, norm.bias, norm.eps, lengths, frame_mask)
    return F.linear(y, module.pointwise_conv2.weight[:, :, 0])


@pytest.mark.parametrize("with_lengths", [False, True], ids=["mask", "mask-and-lengths"])
@pytest.mark.parametrize("form", MASK_FORMS)
@pytest.mark.parametrize("name", ["triton", "auto", "torch"])
def test_convolution_module_matches_transformers_with_any_mask(backend, name, form, with_lengths):
    """Forward at every frame (masked ones too: transformers computes them the same way) and the gradients of the
    input and of every parameter, against transformers' Wav2Vec2BertConvolutionModule fed the same mask."""
    backend(name)
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as hf_modeling

    hf_config = transformers.Wav2Vec2BertConfig(hidden_size=48, num_attention_heads=4, conv_depthwise_kernel_size=7)
    torch.manual_seed(0)
    hf = randomize_(hf_modeling.Wav2Vec2BertConvolutionModule(hf_config)).eval()
    ours = copy.deepcopy(hf).to(DEVICE)
    mask = frame_mask_of(form, 23)
    lengths = last_real_lengths(mask) if with_lengths else None
    hidden = torch.randn(4, 23, 48, generator=torch.Generator().manual_seed(6))
    dout = torch.randn(4, 23, 48, generator=torch.Generator().manual_seed(7))

    hidden_hf = hidden.clone().requires_grad_(True)
    expected = hf(hidden_hf, attention_mask=mask.long().cpu())
    expected_grads = torch.autograd.grad(expected, [hidden_hf, *hf.parameters()], dout)
    hidden_ours = hidden.to(DEVICE).requires_grad_(True)
    out = conv_module_through_the_op(ours, hidden_ours, lengths, mask)
    grads = torch.autograd.grad(out, [hidden_ours, *ours.parameters()], dout.to(DEVICE))

    assert_fp32_close(out.detach().cpu(), expected.detach())
    names = ["hidden_states"] + [n for n, _ in hf.named_parameters()]
    for pname, actual, wanted in zip(names, grads, expected_grads):
        assert_gradient_close(pname, actual.cpu(), wanted)


def test_torch_compile_traces_a_frame_mask_in_one_graph_forward_and_backward(backend, monkeypatch):
    """fullgraph=True with the mask and lengths computed from it inside the graph (no host sync anywhere), and
    AOT autograd's backward graph runs the backward kernels."""
    backend("triton")
    calls = []
    real = kernel_module._launch_backward
    monkeypatch.setattr(kernel_module, "_launch_backward", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = make_inputs(4, 14, 24, 5, seed=28)
    mask = frame_mask_of("holes", 14).long()  # as transformers' attention_mask
    dout = make_dout(4, 14, 24)

    def step(x, weight, ln_weight, ln_bias, attention_mask):
        lengths = last_real_lengths(attention_mask.bool())
        return glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS, lengths, attention_mask) * dout

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = compiled(*leaves, mask)
    out.sum().backward()
    assert calls, "the backward kernels did not run"
    bool_mask = mask.bool()
    assert_fp32_close(out.detach(), reference_fp32(*inputs, frame_mask=bool_mask) * dout)
    for name, leaf, expected in zip(PARAMETERS, leaves, reference_gradients(inputs, dout, frame_mask=bool_mask)):
        assert_gradient_close(name, leaf.grad, expected)


def test_the_ops_are_registered_with_a_frame_mask():
    """Schema, fake, autograd and aot dispatch of both ops with a frame mask (and lengths) given."""
    inputs = make_inputs(4, 9, 24, 3, seed=29)
    mask = frame_mask_of("mixed", 9)
    lengths = last_real_lengths(mask).to(torch.int32)
    torch.library.opcheck(torch.ops.w2vbert_fast.glu_depthwise_conv.default, (*inputs, EPS, lengths, mask))
    _, mean, rstd = _launch(*inputs, EPS, lengths, mask)
    torch.library.opcheck(torch.ops.w2vbert_fast.glu_depthwise_conv_backward.default,
                          (make_dout(4, 9, 24), *inputs, lengths, mask, mean, rstd))


@pytest.mark.parametrize("name", ["torch", "auto"])
def test_pytorch_paths_with_a_frame_mask_give_the_reference(backend, name):
    """``torch`` and ``auto`` on CPU tensors: the reference itself, forward and gradients, bit for bit."""
    backend(name)
    inputs = [t.cpu() for t in make_inputs(4, 12, 24, 7, seed=30)]
    mask = frame_mask_of("holes", 12).cpu()
    dout = make_dout(4, 12, 24).cpu()
    for pname, actual, expected in zip(PARAMETERS, our_gradients(inputs, dout, None, mask),
                                       reference_gradients(inputs, dout, frame_mask=mask)):
        assert torch.equal(actual, expected), pname
