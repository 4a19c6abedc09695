"""Long audio: one utterance of 5, 20 and 60 minutes through the whole encoder in one pass.

GPU: the w2v-bert-2.0 architecture with seeded random weights, bf16, B = 1 (5 min = 14 999 frames, 60 min =
179 999). transformers builds a 1×H×L×L relative-position bias (and, eager, an L×L×64 gather of the distance
table): it is expected to run out of memory as L grows; the result is then recorded with ``oom`` and the
allocator's message (where it stopped), and the test passes. Ours never materialises an L×L tensor.

CPU: the tiny configuration on 5, 20 and 60 *seconds*, fp32 — a smoke run of the same code, not a claim.
"""

import pytest
import torch
from bench_encoder import build, encoder_flops, features, frames_for, last_hidden_state, speech_like_audio
from conftest import DTYPE, ON_GPU, matmul_tflops, sizes

DURATIONS = sizes([(5, "min"), (20, "min"), (60, "min")], [(5, "s"), (20, "s"), (60, "s")])
CONTENDERS = {"transformers eager": {}, "transformers sdpa": {"role": "reference"}, "ours": {}}


def duration_id(duration):
    return f"{duration[0]} {duration[1]}"


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("duration", DURATIONS, ids=duration_id)
def test_long_audio(measure, duration, contender):
    seconds = duration[0] * (60 if duration[1] == "min" else 1)
    model = build(contender)
    input_features, attention_mask = features([speech_like_audio(seconds, seed=7)])
    frames = input_features.shape[1]
    assert frames == frames_for(seconds)
    with torch.inference_mode():
        measure(
            last_hidden_state(model), [(input_features, None)], case=f"long audio {duration_id(duration)}",
            contender=contender, flops=encoder_flops(1, frames), peak_tflops=matmul_tflops(DTYPE),
            warmup=1, repeats=sizes(2, 1), rounds=1, audio_seconds=seconds, frames=frames,
            dtype=str(DTYPE).removeprefix("torch."), **CONTENDERS[contender],
        )
    del model
