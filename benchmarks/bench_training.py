"""Fine-tuning: one training step (forward + backward) of the encoder, ours against transformers.

GPU: the w2v-bert-2.0 architecture (see ``bench_encoder``), seeded random weights, fp32 parameters under bf16
autocast (mixed precision, as transformers' Trainer runs ``bf16=True``), the dropout settings of transformers'
w2v-bert CTC fine-tuning recipe (attention, hidden, feature-projection dropout, layerdrop and SpecAugment off).
CPU: the tiny configuration in fp32 without autocast — a smoke run, not a claim.

* ``training step B8 x 30 s``: forward + backward of ``Wav2Vec2BertModel`` on 8 clips × 30 s, the loss the mean
  square of the last hidden state (the head of a real task adds the same small cost to every contender); the
  gradients are dropped before each step (``zero_grad(set_to_none=True)``), so their memory counts in the peak.
  transformers sdpa (the reference), ours (``optimize()`` on the same model), and both with transformers'
  gradient checkpointing on. TFLOP/s and MFU count 3 × the forward's model FLOPs (backward = 2 × forward; the
  recompute of checkpointing and of the attention backward is not counted).
* ``longest training clip in 80 GB`` (GPU only; transformers sdpa and ours, without checkpointing): the longest
  single clip (B = 1) one training step fits in, with the allocator capped at 80·10⁹ bytes
  (``torch.cuda.set_per_process_memory_fraction``; an "80 GB" card holds a little more, some of which the CUDA
  context takes), found by doubling from 30 s then bisecting to 5 %, each search capped at ``SEARCH_SECONDS`` of
  wall time and at 60 minutes of audio. The row's ms is the step at that length (so no row is the reference:
  times at different lengths have no ratio); ``longest_clip_s`` and every probe are recorded.
"""

import gc
import time

import pytest
import torch
from bench_encoder import (ARCHITECTURE, BATCH, CLIP_SECONDS, ROTATIONS, encoder_flops, features, frames_for,
                           seeded_state_dict, speech_like_audio)
from conftest import DEVICE, ON_GPU, environment, matmul_tflops, sizes, synchronize

import w2vbert_fast

# transformers' w2v-bert-2.0 CTC fine-tuning recipe turns these off (random layer skipping and SpecAugment would
# also make two contenders' steps differ in work)
FINE_TUNING = dict(attention_dropout=0.0, hidden_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
                   mask_time_prob=0.0)
AUTOCAST = sizes(torch.bfloat16, None)  # None: fp32, no autocast (the CPU smoke run)
CONTENDERS = {
    "transformers sdpa": {"role": "reference"},
    "ours": {},
    "transformers sdpa + checkpointing": {},
    "ours + checkpointing": {},
}
MEMORY_CAP_BYTES = 80 * 10**9
SEARCH_CONTENDERS = ["transformers sdpa", "ours"]  # the comparison; checkpointing would only lengthen both
SEARCH_SECONDS = 60  # per contender (a doubling from 30 s to 60 min is 8 probes, then up to 5 bisection steps)
LONGEST_AUDIO_S = 3600.0


def training_model(contender: str):
    """transformers' Wav2Vec2BertModel (sdpa) in training mode, fp32 parameters, the shared seeded weights;
    ``optimize()``d for ours; transformers' gradient checkpointing switched on for ``+ checkpointing``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2BertConfig(**ARCHITECTURE, **FINE_TUNING, attn_implementation="sdpa")
    with torch.device(DEVICE):
        model = transformers.Wav2Vec2BertModel(config)
    # masked_spec_embed exists only with SpecAugment on (mask_time_prob > 0)
    weights = {name: t for name, t in seeded_state_dict().items() if name != "masked_spec_embed"}
    model.load_state_dict(weights, strict=True)
    model = model.float().train()
    if contender.endswith("+ checkpointing"):
        # transformers 5.2x renamed the switch and warns on the old name; older releases have only the old one
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    if contender.startswith("ours"):
        w2vbert_fast.optimize(model)
    return model


def training_step(model):
    """One forward + backward under autocast (on a GPU); returns the loss."""

    def step(input_features, attention_mask):
        model.zero_grad(set_to_none=True)
        with torch.autocast(DEVICE.type, dtype=AUTOCAST or torch.float32, enabled=AUTOCAST is not None):
            hidden = model(input_features, attention_mask=attention_mask).last_hidden_state
        loss = hidden.float().square().mean()
        loss.backward()
        return loss

    return step


def fp32_features(waveforms):
    input_features, attention_mask = features(waveforms)
    return input_features.float(), attention_mask  # autocast casts for each op, as in a Trainer


@pytest.mark.parametrize("contender", list(CONTENDERS))
def test_training_step(measure, contender):
    model = training_model(contender)
    inputs = [fp32_features([speech_like_audio(CLIP_SECONDS, seed=BATCH * r + b) for b in range(BATCH)])
              for r in range(ROTATIONS)]
    frames = inputs[0][0].shape[1]
    assert frames == frames_for(CLIP_SECONDS)
    step, losses = training_step(model), []

    def step_keeping_the_loss(*args):
        losses[:] = [step(*args).detach()]

    measure(
        step_keeping_the_loss, inputs, case=f"training step B{BATCH} x {CLIP_SECONDS:g} s", contender=contender,
        flops=3 * encoder_flops(BATCH, frames), peak_tflops=matmul_tflops(torch.bfloat16 if ON_GPU else torch.float32),
        warmup=sizes(3, 1), repeats=sizes(10, 3), audio_seconds=BATCH * CLIP_SECONDS, batch=BATCH, frames=frames,
        dtype="bf16 autocast, fp32 parameters" if AUTOCAST else "float32", **CONTENDERS[contender],
    )
    assert all(torch.isfinite(loss) for loss in losses), "the training step's loss is not finite"  # [] after an OOM
    del model


# ------------------------------------------------------------------------------------- longest clip in 80 GB
def _fits(step, seconds):
    """(fits, ms) of one training step on one clip of ``seconds`` (random features: memory does not depend on
    the values)."""
    frames = frames_for(seconds)
    try:
        input_features = torch.randn(1, frames, ARCHITECTURE["feature_projection_input_dim"], device=DEVICE)
        synchronize()
        start = time.perf_counter()
        step(input_features, None)
        synchronize()
        return True, (time.perf_counter() - start) * 1e3
    except torch.cuda.OutOfMemoryError:
        return False, None
    finally:
        input_features = None
        torch.cuda.empty_cache()


def longest_clip(step):
    """Doubling from 30 s, then bisection to 5 %, within SEARCH_SECONDS: (longest fitting seconds or None, its
    ms, probes, whether the time cap cut the search short)."""
    deadline = time.monotonic() + SEARCH_SECONDS
    probes = []

    def probe(seconds):
        fits, ms = _fits(step, seconds)
        probes.append({"seconds": round(seconds, 1), "frames": frames_for(seconds), "fits": fits, "ms": ms})
        return fits, ms

    low, low_ms, high = None, None, None
    seconds = 30.0
    while high is None and seconds <= LONGEST_AUDIO_S:
        fits, ms = probe(seconds)
        if fits:
            low, low_ms = seconds, ms
            seconds *= 2
        else:
            high = seconds
        if time.monotonic() > deadline:
            return low, low_ms, probes, True
    if low is None:
        return None, None, probes, False
    if high is None:  # fits up to the cap on audio length
        high = LONGEST_AUDIO_S
        if low < high:
            fits, ms = probe(high)
            if fits:
                return high, ms, probes, False
    while high / low > 1.05:
        if time.monotonic() > deadline:
            return low, low_ms, probes, True
        middle = (low * high) ** 0.5
        fits, ms = probe(middle)
        if fits:
            low, low_ms = middle, ms
        else:
            high = middle
    return low, low_ms, probes, False


@pytest.mark.skipif(not ON_GPU, reason="a memory search needs a GPU's allocator (80 GB); on a CPU it would only "
                                       "measure this machine's swap")
@pytest.mark.parametrize("contender", SEARCH_CONTENDERS)
def test_longest_training_clip_in_80_gb(benchmark, contender):
    model = training_model(contender)
    step = training_step(model)
    seeded_state_dict.cache_clear()  # its bf16 copy of the weights would count against the 80 GB
    gc.collect()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, MEMORY_CAP_BYTES / total))
    try:
        seconds, ms, probes, capped = longest_clip(step)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the probes are timed above, recorded below
    info = benchmark.extra_info
    info.update(environment())
    info.update(
        case="longest training clip in 80 GB (B = 1)", contender=contender, longest_clip_s=seconds,
        frames=None if seconds is None else frames_for(seconds), median_ms=ms, probes=probes, search_capped=capped,
        memory_cap_bytes=MEMORY_CAP_BYTES, dtype="bf16 autocast, fp32 parameters",
    )  # no "reference" role: the rows' times are at different lengths, a ratio of them would mean nothing
    if seconds is None:
        info.update(oom=True, error="a 30 s clip does not fit")
    del model
