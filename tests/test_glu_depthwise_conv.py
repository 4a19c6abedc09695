"""The fused GLU → causal depthwise conv → LayerNorm → swish kernel against its PyTorch reference and against
transformers' Wav2Vec2BertConvolutionModule end to end.

On a machine without a GPU the kernel runs under Triton's interpreter (tests/conftest.py), fp32 and fp16;
bf16 is checked on the GPU only.
"""

import importlib

import pytest
import torch
from conftest import FP32_ATOL, HAS_CUDA, assert_fp32_close, assert_half_precision_close, requires_cuda
from model_helpers import randomize_

from w2vbert_fast import Wav2Vec2BertConfig
from w2vbert_fast.modeling import Padding, Wav2Vec2BertConvolutionModule
from w2vbert_fast.ops import glu_depthwise_conv, glu_depthwise_conv_reference
from w2vbert_fast.ops.glu_depthwise_conv import _launch

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


def reference_fp32(x, weight, ln_weight, ln_bias, lengths=None):
    return glu_depthwise_conv_reference(x.float(), weight.float(), ln_weight.float(), ln_bias.float(), EPS, lengths)


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
    _launch(x, weight, ln_weight, ln_bias, EPS, lengths, out=out, config=config)
    assert torch.isfinite(out).all()
    assert_fp32_close(out, reference_fp32(x, weight, ln_weight, ln_bias, lengths))


GPU_CONFIGS = kernel_module._autotune_configs(interpreted=False)


@pytest.mark.parametrize("config", GPU_CONFIGS, ids=lambda c: "T{BLOCK_T}-C{BLOCK_C}".format(**c.kwargs))
def test_every_gpu_autotune_config_is_correct(config):
    """What the autotuner may pick on a GPU, run here under the interpreter: a wrong tiling fails in CI, not later."""
    x, weight, ln_weight, ln_bias = make_inputs(2, 37, 136, 31, seed=6)
    lengths = torch.tensor([37, 9], device=DEVICE, dtype=torch.int32)
    out = torch.full((2, 37, 136), float("nan"), device=DEVICE)
    _launch(x, weight, ln_weight, ln_bias, EPS, lengths, out=out,
            config=(config.kwargs["BLOCK_T"], config.kwargs["BLOCK_C"], config.num_warps, 2))
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


def test_gradients_fall_back_to_the_reference(backend):
    backend("triton")
    x, weight, ln_weight, ln_bias = make_inputs(1, 12, 48, 3)
    x.requires_grad_(True)
    glu_depthwise_conv(x, weight, ln_weight, ln_bias, EPS).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_op_is_registered_with_torch_library():
    x, weight, ln_weight, ln_bias = make_inputs(2, 9, 48, 3)
    lengths = torch.tensor([9, 4], device=DEVICE, dtype=torch.int32)
    # schema, fake tensor, autograd registration and aot dispatch (dynamic shapes): what torch.compile relies on
    torch.library.opcheck(torch.ops.w2vbert_fast.glu_depthwise_conv.default,
                          (x, weight, ln_weight, ln_bias, EPS, lengths))


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
    ],
    ids=["rank", "odd-last-dim", "integer-x", "even-kernel", "weight-channels", "ln-shape", "lengths-shape",
         "float-lengths", "negative-length"],
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
