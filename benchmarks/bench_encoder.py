"""End to end: the whole w2v-bert-2.0 encoder, ours against what a user runs instead.

GPU: the w2v-bert-2.0 architecture (24 layers, hidden 1024, 16 heads, FFN 4096, relative_key 64/8, conv k=31),
random weights seeded with ``torch.manual_seed(0)`` (no download), bf16, B = 8 clips × 30 s of speech-like audio
(1499 frames each). CPU: a tiny configuration (2 layers, hidden 64) on 2 × 2 s in fp32 — a smoke run where "ours"
is the PyTorch reference (the ``auto`` backend), not a claim.

* ``encoder``: input features → last hidden state. transformers eager, transformers sdpa (the reference),
  torch.compile of the transformers model, ours, ours under torch.compile (``fullgraph=True``: the masked
  forward has no graph break), ours replayed from a CUDA graph captured for the batch's shape (the compiled and
  graphed ones on a GPU only).
  Each result records ms, hours of audio per second, TFLOP/s and MFU (model FLOPs, see :func:`encoder_flops`, over
  the time, over the measured bf16 matmul rate of the same GPU) and peak memory.
* ``waveform to hidden state``: the same with feature extraction in the timed call: transformers'
  SeamlessM4TFeatureExtractor (numpy, CPU) + transformers sdpa (the reference) against FbankExtractor on the
  device + ours.

Every contender gets the same state_dict, the same inputs, rotated between calls.
"""

import functools
import math

import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPE, ON_GPU, matmul_tflops, sizes

import w2vbert_fast

# the w2v-bert-2.0 architecture (facebook/w2v-bert-2.0 config.json); a tiny one on a CPU
W2V_BERT_2_0 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                    feature_projection_input_dim=160, hidden_act="swish", position_embeddings_type="relative_key",
                    left_max_position_embeddings=64, right_max_position_embeddings=8,
                    conv_depthwise_kernel_size=31, add_adapter=False, layer_norm_eps=1e-5)
TINY = dict(W2V_BERT_2_0, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
ARCHITECTURE = sizes(W2V_BERT_2_0, TINY)
BATCH, CLIP_SECONDS = sizes((8, 30.0), (2, 2.0))
SAMPLE_RATE = 16000
ROTATIONS = 2  # distinct batches per contender


# ------------------------------------------------------------------------------------------ shared set-up
@functools.lru_cache(maxsize=None)
def speech_clip() -> np.ndarray:
    from w2vbert_fast.extract.audio import bundled_clip_path, read_audio

    return read_audio(bundled_clip_path())[0]


def speech_like_audio(seconds: float, seed: int) -> np.ndarray:
    """``seconds`` of the bundled speech clip tiled from a random offset, random gain, a little noise: real
    spectra (not zeros, not white noise) that differ between calls."""
    rng = np.random.default_rng(seed)
    clip = speech_clip()
    samples = int(round(seconds * SAMPLE_RATE))
    tiled = np.tile(clip, samples // len(clip) + 2)
    start = int(rng.integers(0, len(clip)))
    audio = tiled[start:start + samples] * rng.uniform(0.5, 1.0) + rng.normal(0, 1e-3, samples)
    return audio.astype(np.float32)


def features(waveforms):
    """Stacked log-mel features (B, F, 160) and the attention mask, on DEVICE."""
    from w2vbert_fast import FbankExtractor

    batch = FbankExtractor()(waveforms, sampling_rate=SAMPLE_RATE, device=DEVICE)
    return batch["input_features"].to(DTYPE), batch["attention_mask"]


def frames_for(seconds: float) -> int:
    """Encoder frames for a clip of ``seconds``: 25 ms / 10 ms fbank frames, stacked in pairs."""
    return ((int(round(seconds * SAMPLE_RATE)) - 400) // 160 + 1) // 2


def encoder_flops(batch: int, frames: int, config: dict = None) -> int:
    """Model FLOPs of one forward (multiply-add = 2): the feature projection, per layer the two half-step FFNs,
    the q/k/v/out projections, attention 4·B·H·L²·D (Q·Kᵀ and P·V), the conv module's two pointwise convs and
    its depthwise conv. LayerNorms, softmax, activations and the relative-key table (2·B·H·L·D·(left+right+1),
    < 0.1 %) are not counted."""
    c = config or ARCHITECTURE
    tokens = batch * frames
    d, i, k = c["hidden_size"], c["intermediate_size"], c["conv_depthwise_kernel_size"]
    heads, head_dim = c["num_attention_heads"], d // c["num_attention_heads"]
    per_layer = (
        2 * 2 * tokens * d * i * 2  # ffn1 + ffn2, two linears each
        + 4 * 2 * tokens * d * d  # linear_q, linear_k, linear_v, linear_out
        + 4 * batch * heads * frames * frames * head_dim  # attention
        + 2 * tokens * d * 2 * d + 2 * tokens * d * k + 2 * tokens * d * d  # conv module
    )
    return 2 * tokens * c["feature_projection_input_dim"] * d + c["num_hidden_layers"] * per_layer


@functools.lru_cache(maxsize=None)
def seeded_state_dict():
    """The random weights every contender shares (built once per session, on DEVICE, in DTYPE)."""
    config = w2vbert_fast.Wav2Vec2BertConfig(**ARCHITECTURE)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = w2vbert_fast.Wav2Vec2BertModel(config)
    return {name: t.to(DTYPE) for name, t in model.state_dict().items()}


def our_model():
    model = w2vbert_fast.Wav2Vec2BertModel(w2vbert_fast.Wav2Vec2BertConfig(**ARCHITECTURE)).to(DEVICE, DTYPE)
    model.load_state_dict(seeded_state_dict(), strict=True)
    return model.eval()


def transformers_model(attn_implementation: str):
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2BertConfig(**ARCHITECTURE, attn_implementation=attn_implementation)
    with torch.device(DEVICE):
        model = transformers.Wav2Vec2BertModel(config)
    model.load_state_dict(seeded_state_dict(), strict=True)
    return model.to(DTYPE).eval()


def build(contender: str):
    """The module a contender times: ``transformers eager|sdpa``, ``torch.compile(transformers sdpa)``, ``ours``,
    ``torch.compile(ours)``."""
    compiled = contender.startswith("torch.compile")
    if compiled and not ON_GPU:
        pytest.skip("torch.compile is timed on a GPU only (inductor on CPU needs a C++ toolchain; a CPU time says "
                    "nothing here)")
    if "transformers" in contender:
        model = transformers_model("eager" if "eager" in contender else "sdpa")
        return torch.compile(model) if compiled else model
    model = our_model()
    return torch.compile(model, fullgraph=True, dynamic=False) if compiled else model


def last_hidden_state(model):
    return lambda input_features, attention_mask: model(input_features, attention_mask=attention_mask).last_hidden_state


def cuda_graphed(model):
    """``model``'s masked forward captured into a CUDA graph on the first call (inside the measured warm-up, so
    the graph's memory pool counts in the peak); each call copies its inputs into the captured buffers and replays
    (no Python, no launch overhead). The mask is an input like any other: its values are read on the device only,
    so one graph serves every mask of the shape."""
    state = {}

    def capture(input_features, attention_mask):
        static_features, static_mask = input_features.clone(), attention_mask.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the capture: the autotuners pick their configs here
            for _ in range(2):
                model(static_features, attention_mask=static_mask)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_features, attention_mask=static_mask).last_hidden_state
        state.update(graph=graph, features=static_features, mask=static_mask, out=static_out)

    def run(input_features, attention_mask):
        if not state:
            capture(input_features, attention_mask)
        state["features"].copy_(input_features)
        state["mask"].copy_(attention_mask)
        state["graph"].replay()
        return state["out"]

    return run


ROLES = {"transformers sdpa": "reference"}
CONTENDERS = ["transformers eager", "transformers sdpa", "torch.compile(transformers sdpa)", "ours",
              "torch.compile(ours)", "ours + CUDA graph"]
CASE = f"encoder B{BATCH} x {CLIP_SECONDS:g} s"


@pytest.mark.parametrize("contender", CONTENDERS)
def test_encoder(measure, contender):
    graphed = contender.endswith("CUDA graph")
    if graphed and not ON_GPU:
        pytest.skip("CUDA graphs need a CUDA GPU (no GPU on this machine)")
    model = build("ours" if graphed else contender)
    inputs = [features([speech_like_audio(CLIP_SECONDS, seed=BATCH * r + b) for b in range(BATCH)])
              for r in range(ROTATIONS)]
    frames = inputs[0][0].shape[1]
    assert frames == frames_for(CLIP_SECONDS)
    with torch.inference_mode():
        fn = cuda_graphed(model) if graphed else last_hidden_state(model)
        measure(
            fn, inputs, case=CASE, contender=contender,
            flops=encoder_flops(BATCH, frames), peak_tflops=matmul_tflops(DTYPE),
            warmup=sizes(5, 1), repeats=sizes(20, 4), audio_seconds=BATCH * CLIP_SECONDS, batch=BATCH,
            frames=frames, dtype=str(DTYPE).removeprefix("torch."), **({"role": ROLES[contender]} if contender in ROLES else {}),
        )


# ------------------------------------------------------------------------------ with feature extraction
def transformers_pipeline():
    transformers = pytest.importorskip("transformers")
    extractor = transformers.SeamlessM4TFeatureExtractor()
    model = transformers_model("sdpa")

    def run(waveforms):
        batch = extractor(waveforms, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        return model(batch["input_features"].to(DEVICE, DTYPE),
                     attention_mask=batch["attention_mask"].to(DEVICE)).last_hidden_state

    return run


def our_pipeline():
    model = our_model()

    def run(waveforms):
        input_features, attention_mask = features(waveforms)
        return model(input_features, attention_mask=attention_mask).last_hidden_state

    return run


PIPELINES = {"transformers features (numpy) + sdpa": (transformers_pipeline, {"role": "reference"}),
             "ours (features on the device)": (our_pipeline, {})}


@pytest.mark.parametrize("contender", list(PIPELINES))
def test_waveform_to_hidden_state(measure, contender):
    make, extra = PIPELINES[contender]
    run = make()
    # ragged lengths (the last clip of each batch 20 % shorter): padding is part of the job
    inputs = [([speech_like_audio(CLIP_SECONDS * (0.8 if b == BATCH - 1 else 1.0), seed=100 + BATCH * r + b)
                for b in range(BATCH)],) for r in range(ROTATIONS)]
    with torch.inference_mode():
        measure(
            run, inputs, case=f"waveform to hidden state B{BATCH} x {CLIP_SECONDS:g} s", contender=contender,
            flops=encoder_flops(BATCH, frames_for(CLIP_SECONDS)), peak_tflops=matmul_tflops(DTYPE),
            warmup=sizes(3, 1), repeats=sizes(10, 3), audio_seconds=sum(len(w) for w in inputs[0][0]) / SAMPLE_RATE,
            batch=BATCH, **extra,
        )


def test_flop_count_matches_hand_count():
    """Not a benchmark: the FLOP formula on a case counted by hand (1 layer, hidden 2, 1 head, FFN 3, k 1)."""
    config = dict(hidden_size=2, num_hidden_layers=1, num_attention_heads=1, intermediate_size=3,
                  feature_projection_input_dim=5, conv_depthwise_kernel_size=1)
    tokens, frames = 4, 4  # B = 1
    hand = 2 * tokens * 5 * 2 + (2 * 2 * (2 * tokens * 2 * 3) + 4 * 2 * tokens * 4 + 4 * frames ** 2 * 2
                                 + 2 * tokens * 2 * 4 + 2 * tokens * 2 + 2 * tokens * 4)
    assert encoder_flops(1, frames, config) == hand
    assert math.isclose(frames_for(30.0), 1499)
