"""Relative-key attention alone: ours against what a user has instead.

Two cases per length, ~24k tokens per batch on a GPU (bf16, 16 heads × 64, left 64 / right 8, as w2v-bert-2.0):

* ``rel_key_attention core``: q, k, v → (B, L, H·D). Ours; FlexAttention with a ``score_mod`` that reads the
  per-row Q·Eᵀ table (compiled, the best generic alternative); transformers' math (the (L, L, D) gather, the
  B×H×L×L bias) handed to SDPA as a mask; SDPA with no bias at all, the ceiling no relative-position kernel can
  beat. TFLOP/s counts 4·B·H·L²·D.
* ``self-attention module``: hidden states → output, projections included, transformers' own module in its eager
  and sdpa attention against ours with the same weights.
* ``rel_key_attention forward+backward``: one training step of the core (q, k, v, E → out, then dq, dk, dv, dE
  from a fixed output gradient). Ours; transformers' math (bias + SDPA, the gradient flowing through the B×H×L×L
  bias); SDPA forward+backward with no bias, the ceiling. TFLOP/s counts 14·B·H·L²·D (forward 4, backward 10:
  flash-attention-2's convention), at L = 1,500 (30 s of audio) on a GPU.

On a CPU the sizes are tiny and "ours" is the chunked CPU path (the ``auto`` backend): a smoke run, not a claim.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, ON_GPU

from w2vbert_fast import Wav2Vec2BertConfig
from w2vbert_fast.modeling import Wav2Vec2BertSelfAttention
from w2vbert_fast.ops import rel_key_attention

HEADS, HEAD_DIM, LEFT, RIGHT = (16, 64, 64, 8) if ON_GPU else (4, 16, 64, 8)
DTYPE = torch.bfloat16 if ON_GPU else torch.float32
SHAPES = (
    [(48, 500), (16, 1500), (8, 3000), (4, 6000), (1, 30000)] if ON_GPU else [(2, 64), (1, 200)]
)  # (batch, length)
ROTATIONS = 3  # distinct inputs per contender, so no call finds the previous one's data in the L2


def shape_id(shape):
    return f"B{shape[0]}-L{shape[1]}"


def attention_inputs(batch, length, seed):
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    fused = torch.randn(batch, length, 3, HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=generator)
    table = torch.randn(LEFT + RIGHT + 1, HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=generator)
    q, k, v = fused.unbind(2)
    return q, k, v, table


def transformers_bias_sdpa(q, k, v, table):
    """transformers' relative_key math: the (L, L, D) gather, the B×H×L×L bias, then SDPA with it as the mask."""
    length = q.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    positions = torch.arange(length, device=q.device)
    distance = (positions[None, :] - positions[:, None]).clamp(-LEFT, RIGHT) + LEFT
    bias = torch.einsum("bhld,lrd->bhlr", qh, table[distance]) * HEAD_DIM ** -0.5
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias)


def sdpa_without_bias(q, k, v, table):
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))


def flex_attention_contender():
    from torch.nn.attention.flex_attention import flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v, table):
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
        # the same per-row Q·Eᵀ table the kernel builds, (B, H, L, left + right + 1), read by the score_mod
        q_e = torch.einsum("bhld,rd->bhlr", qh, table).float() * HEAD_DIM ** -0.5

        def score_mod(score, b, h, q_idx, kv_idx):
            distance = (kv_idx - q_idx).clamp(-LEFT, RIGHT) + LEFT
            return score + q_e[b, h, q_idx, distance]

        return compiled(qh, kh, vh, score_mod=score_mod)

    return run


def ours(q, k, v, table):
    return rel_key_attention(q, k, v, table, LEFT, RIGHT, HEAD_DIM ** -0.5)


CORE_CONTENDERS = {
    "ours": (ours, {}),
    "transformers bias + sdpa": (transformers_bias_sdpa, {"role": "reference"}),
    "sdpa, no bias (ceiling)": (sdpa_without_bias, {"role": "ceiling"}),
    "flex_attention + Q·Eᵀ score_mod": (None, {}),
}


@pytest.mark.parametrize("contender", list(CORE_CONTENDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_rel_key_attention_core(measure, shape, contender):
    batch, length = shape
    fn, extra = CORE_CONTENDERS[contender]
    if contender.startswith("flex"):
        if not ON_GPU:
            pytest.skip("FlexAttention needs a GPU (its CPU path wants a C++ toolchain for inductor)")
        fn = flex_attention_contender()
    inputs = [attention_inputs(batch, length, seed) for seed in range(ROTATIONS)]
    with torch.no_grad():
        measure(
            fn, inputs, case=f"rel_key_attention core {shape_id(shape)}", contender=contender,
            flops=4 * batch * HEADS * length * length * HEAD_DIM, batch=batch, length=length, **extra,
        )


def module_config():
    return dict(hidden_size=HEADS * HEAD_DIM, num_attention_heads=HEADS, position_embeddings_type="relative_key",
                left_max_position_embeddings=LEFT, right_max_position_embeddings=RIGHT)


def transformers_module(attn_implementation):
    transformers = pytest.importorskip("transformers")
    from transformers.models.wav2vec2_bert import modeling_wav2vec2_bert as hf

    config = transformers.Wav2Vec2BertConfig(**module_config(), attn_implementation=attn_implementation)
    torch.manual_seed(0)
    return hf.Wav2Vec2BertSelfAttention(config).to(DEVICE, DTYPE).eval()


def our_module():
    torch.manual_seed(0)
    return Wav2Vec2BertSelfAttention(Wav2Vec2BertConfig(**module_config())).to(DEVICE, DTYPE).eval()


MODULE_CONTENDERS = {
    "transformers eager": ("eager", {}),
    "transformers sdpa": ("sdpa", {"role": "reference"}),
    "ours": (None, {}),
}


@pytest.mark.parametrize("contender", list(MODULE_CONTENDERS))
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_self_attention_module(measure, shape, contender):
    batch, length = shape
    implementation, extra = MODULE_CONTENDERS[contender]
    module = transformers_module(implementation) if implementation else our_module()
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    inputs = [
        (torch.randn(batch, length, HEADS * HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=generator),)
        for _ in range(ROTATIONS)
    ]
    with torch.no_grad():
        measure(
            lambda hidden: module(hidden)[0], inputs, case=f"self-attention module {shape_id(shape)}",
            contender=contender, flops=4 * batch * HEADS * length * length * HEAD_DIM, batch=batch, length=length,
            **extra,
        )


# ------------------------------------------------------------------------------------- forward + backward
TRAIN_SHAPES = [(8, 1500)] if ON_GPU else [(1, 64)]  # (batch, length)


def training_inputs(batch, length, seed):
    q, k, v, table = attention_inputs(batch, length, seed)
    generator = torch.Generator(device=DEVICE).manual_seed(seed + 100)
    grad_out = torch.randn(batch, length, HEADS * HEAD_DIM, device=DEVICE, dtype=DTYPE, generator=generator)
    return tuple(t.detach().requires_grad_(True) for t in (q, k, v, table)) + (grad_out,)


def backward_of(forward):
    def step(q, k, v, table, grad_out):
        out = forward(q, k, v, table)
        if out.dim() == 4:  # SDPA's (B, H, L, D)
            out = out.transpose(1, 2).reshape(grad_out.shape)
        return torch.autograd.grad(out, (q, k, v, table), grad_out, allow_unused=True)

    return step


TRAIN_CONTENDERS = {
    "ours": (backward_of(ours), {}),
    "transformers bias + sdpa": (backward_of(transformers_bias_sdpa), {"role": "reference"}),
    "sdpa, no bias (ceiling)": (backward_of(sdpa_without_bias), {"role": "ceiling"}),
}


@pytest.mark.parametrize("contender", list(TRAIN_CONTENDERS))
@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=shape_id)
def test_rel_key_attention_forward_backward(measure, shape, contender):
    batch, length = shape
    fn, extra = TRAIN_CONTENDERS[contender]
    inputs = [training_inputs(batch, length, seed) for seed in range(ROTATIONS)]
    measure(
        fn, inputs, case=f"rel_key_attention forward+backward {shape_id(shape)}", contender=contender,
        flops=14 * batch * HEADS * length * length * HEAD_DIM, batch=batch, length=length, **extra,
    )
