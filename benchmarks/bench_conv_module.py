"""The conformer convolution module, and its fused middle against the byte floor.

GPU: bf16, C = 1024, K = 31, (B, T) = (8, 1500) and (1, 30000). CPU: tiny fp32 sizes, a smoke run where "ours" is
the PyTorch reference (the ``auto`` backend).

* ``conv module``: hidden states → output, both pointwise convs included. transformers' module (eager, the
  reference), torch.compile of that module, ours.
* ``conv middle``: (B, T, 2C) → (B, T, C), GLU → causal depthwise conv → LayerNorm → swish. Ours, the same steps in
  eager PyTorch, and ``y.copy_(x)`` moving the same number of bytes (the floor any kernel can reach: role
  ``ceiling``). GB/s counts the floor's bytes, 2C·T read + C·T written per sequence, for every contender;
  ``copy_fraction`` divides it by the copy bandwidth measured once per session on a large tensor
  (``conftest.copy_gbps``), and ``floor_ms`` is the floor's bytes at that bandwidth.
* ``conv middle training``: the same middle, forward + backward (gradients of x, the conv weight and the LayerNorm
  parameters, weights in fp32 as autocast leaves them). Ours (the kernels both ways), the reference under eager
  autograd, torch.compile of the reference (GPU only). The floor counts x read twice, y and dy once, dx written:
  8C·T elements a sequence.
"""

import pytest
import torch
from conftest import DEVICE, ON_GPU, copy_gbps

from w2vbert_fast import Wav2Vec2BertConfig
from w2vbert_fast.modeling import Wav2Vec2BertConvolutionModule
from w2vbert_fast.ops import glu_depthwise_conv, glu_depthwise_conv_reference

CHANNELS, KERNEL_SIZE = (1024, 31) if ON_GPU else (72, 31)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = [(8, 1500), (1, 30000)] if ON_GPU else [(2, 200)]
ROTATIONS = 3


def shape_id(shape):
    return f"B{shape[0]}-T{shape[1]}"


def module_config():
    return dict(hidden_size=CHANNELS, num_attention_heads=16 if CHANNELS % 16 == 0 else 8,
                conv_depthwise_kernel_size=KERNEL_SIZE)


def transformers_module():
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as hf

    torch.manual_seed(0)
    return hf.Wav2Vec2BertConvolutionModule(transformers.Wav2Vec2BertConfig(**module_config())).to(DEVICE, DTYPE).eval()


def random_inputs(shape, width, seed=0):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    return [(torch.randn(*shape, width, device=DEVICE, dtype=DTYPE, generator=generator),) for _ in range(ROTATIONS)]


def floor_bytes(batch, length):
    return 3 * CHANNELS * length * batch * torch.finfo(DTYPE).bits // 8


MODULE_CONTENDERS = ["transformers eager", "torch.compile(transformers)", "ours"]


@pytest.mark.parametrize("contender", MODULE_CONTENDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_module(measure, shape, contender):
    extra = {}
    if contender == "ours":
        torch.manual_seed(0)
        module = Wav2Vec2BertConvolutionModule(Wav2Vec2BertConfig(**module_config())).to(DEVICE, DTYPE).eval()
    else:
        module = transformers_module()
        if contender.startswith("torch.compile"):
            if not ON_GPU:
                pytest.skip("torch.compile is timed on a GPU only (inductor on CPU needs a C++ toolchain)")
            module = torch.compile(module)
        else:
            extra["role"] = "reference"
    with torch.no_grad():
        measure(module, random_inputs(shape, CHANNELS), case=f"conv module {shape_id(shape)}", contender=contender,
                **extra)


def middle_parameters(seed=1):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    weight = torch.randn(CHANNELS, 1, KERNEL_SIZE, device=DEVICE, generator=generator).to(DTYPE) / KERNEL_SIZE ** 0.5
    ln_weight = (1 + 0.2 * torch.randn(CHANNELS, device=DEVICE, generator=generator)).to(DTYPE)
    ln_bias = (0.2 * torch.randn(CHANNELS, device=DEVICE, generator=generator)).to(DTYPE)
    return weight, ln_weight, ln_bias


MIDDLE_CONTENDERS = ["ours", "eager PyTorch", "copy (bandwidth floor)"]


@pytest.mark.parametrize("contender", MIDDLE_CONTENDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_middle(measure, shape, contender):
    batch, length = shape
    weight, ln_weight, ln_bias = middle_parameters()
    extra = {}
    if contender == "ours":
        inputs = random_inputs(shape, 2 * CHANNELS)

        def fn(x):
            return glu_depthwise_conv(x, weight, ln_weight, ln_bias, 1e-5)
    elif contender == "eager PyTorch":
        inputs = random_inputs(shape, 2 * CHANNELS)
        extra["role"] = "reference"

        def fn(x):
            return glu_depthwise_conv_reference(x, weight, ln_weight, ln_bias, 1e-5)
    else:
        # reads 1.5·C·T and writes 1.5·C·T elements: the same 3·C·T as the fused kernel's floor
        half = 3 * CHANNELS * length * batch // 2
        inputs = [(torch.randn(half, device=DEVICE, dtype=DTYPE), torch.empty(half, device=DEVICE, dtype=DTYPE))
                  for _ in range(ROTATIONS)]
        extra["role"] = "ceiling"

        def fn(src, dst):
            return dst.copy_(src)
    bandwidth = copy_gbps()
    with torch.no_grad():
        measure(fn, inputs, case=f"conv middle {shape_id(shape)}", contender=contender,
                bytes_moved=floor_bytes(batch, length), peak_gbps=bandwidth,
                floor_ms=floor_bytes(batch, length) / (bandwidth * 1e9) * 1e3, **extra)


TRAINING_CONTENDERS = ["ours", "eager PyTorch", "torch.compile(eager PyTorch)"]


@pytest.mark.parametrize("contender", TRAINING_CONTENDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_conv_middle_training(measure, shape, contender):
    batch, length = shape
    # the parameters in fp32, x in the activations' dtype: what torch.autocast hands the op in fine-tuning
    weight, ln_weight, ln_bias = (t.float().requires_grad_(True) for t in middle_parameters())
    extra = {}
    if contender == "ours":
        forward = glu_depthwise_conv
    else:
        extra["role"] = "reference" if contender == "eager PyTorch" else None
        forward = glu_depthwise_conv_reference
        if contender.startswith("torch.compile"):
            if not ON_GPU:
                pytest.skip("torch.compile is timed on a GPU only (inductor on CPU needs a C++ toolchain)")
            forward = torch.compile(glu_depthwise_conv_reference)
    extra = {k: v for k, v in extra.items() if v is not None}
    generator = torch.Generator(device=DEVICE).manual_seed(2)
    inputs = [(torch.randn(batch, length, 2 * CHANNELS, device=DEVICE, dtype=DTYPE, generator=generator)
               .requires_grad_(True),
               torch.randn(batch, length, CHANNELS, device=DEVICE, dtype=DTYPE, generator=generator))
              for _ in range(ROTATIONS)]

    def step(x, dout):
        out = forward(x, weight, ln_weight, ln_bias, 1e-5)
        return torch.autograd.grad(out, (x, weight, ln_weight, ln_bias), dout)

    train_floor = 8 * CHANNELS * length * batch * torch.finfo(DTYPE).bits // 8
    bandwidth = copy_gbps()
    measure(step, inputs, case=f"conv middle training {shape_id(shape)}", contender=contender,
            bytes_moved=train_floor, peak_gbps=bandwidth, floor_ms=train_floor / (bandwidth * 1e9) * 1e3, **extra)
