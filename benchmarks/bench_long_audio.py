"""Long audio: one utterance through the encoder in one pass.

GPU: the w2v-bert-2.0 architecture with seeded random weights, bf16, B = 1, 5, 20 and 60 minutes (5 min = 14 999
frames, 60 min = 179 999). transformers builds a 1×H×L×L relative-position bias (and, eager, an L×L×64 gather of
the distance table): it is expected to run out of memory as L grows; the result is then recorded with ``oom`` and
the allocator's message (where it stopped), and the test passes. Ours never materialises an L×L tensor.

CPU, by default: the tiny configuration on 5, 20 and 60 *seconds*, fp32 — a smoke run of the same code, not a claim.

CPU claims (``W2VBERT_FAST_CPU_LONG_AUDIO=1``, about 25 minutes on 2 cores): the full-size architecture in fp32,
each case in a fresh process (``cpu_long_audio_case.py``) so its peak memory is that process's high-water RSS —

* ``CPU long audio, 2 layers, 30 s / 60 s / 120 s``: transformers sdpa (the reference) against ours (``optimize()``
  on the same transformers model: the ``auto`` backend's CPU path), side by side in one run;
* ``CPU long audio, 24 layers, 10 min``: ours alone, all 24 layers (transformers needs an L×L×64 gather of
  30 000² × 64 fp32 = 230 GB there);
* ``CPU short clip, 24 layers, 6 s / 20 s``: the whole model on the clip lengths most bulk jobs see, both
  contenders, where the Linear layers (the same on both) dominate.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from bench_encoder import build, encoder_flops, features, frames_for, last_hidden_state, speech_like_audio
from conftest import DTYPE, ON_GPU, environment, matmul_tflops, sizes

HERE = os.path.dirname(os.path.abspath(__file__))
DURATIONS = sizes([(5, "min"), (20, "min"), (60, "min")], [(5, "s"), (20, "s"), (60, "s")])
CONTENDERS = {"transformers eager": {}, "transformers sdpa": {"role": "reference"}, "ours": {}}
CPU_CLAIMS = not ON_GPU and os.environ.get("W2VBERT_FAST_CPU_LONG_AUDIO", "0") not in ("", "0")


def duration_id(duration):
    return f"{duration[0]} {duration[1]}"


@pytest.mark.skipif(CPU_CLAIMS, reason="W2VBERT_FAST_CPU_LONG_AUDIO=1 runs the full-size CPU cases instead")
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


# ------------------------------------------------------------------------------------------- CPU claims
# (layers, seconds, contender, repeats, threads): the short cases take the median of 3 or 5, the long ones are timed
# once; threads None is torch's default (every core), 1 measures the single-thread alternative
CPU_CASES = [
    (2, 30, "transformers sdpa", 3, None), (2, 30, "ours", 3, None), (2, 30, "ours", 3, 1),
    (2, 60, "transformers sdpa", 1, None), (2, 60, "ours", 1, None),
    (2, 120, "transformers sdpa", 1, None), (2, 120, "ours", 1, None),
    (24, 600, "ours", 1, None),
    (24, 6, "transformers sdpa", 5, None), (24, 6, "ours", 5, None),
    (24, 20, "transformers sdpa", 3, None), (24, 20, "ours", 3, None),
]


def cpu_case_id(case):
    layers, seconds, contender, _, threads = case
    return f"{layers}layers-{seconds}s-{contender.replace(' ', '-')}" + (f"-{threads}thread" if threads else "")


def run_case_process(layers, seconds, contender, repeats, threads):
    command = [sys.executable, os.path.join(HERE, "cpu_long_audio_case.py"), "--contender", contender,
               "--seconds", str(seconds), "--layers", str(layers), "--repeats", str(repeats)]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ, W2VBERT_FAST_BACKEND="auto")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not CPU_CLAIMS, reason="full-size CPU cases: set W2VBERT_FAST_CPU_LONG_AUDIO=1 (~25 min)")
@pytest.mark.parametrize("case", CPU_CASES, ids=cpu_case_id)
def test_cpu_long_audio(benchmark, case):
    layers, seconds, contender, repeats, threads = case
    info = benchmark.extra_info
    info.update(environment())  # before the run: the commit and tree state the child process imports
    result = run_case_process(layers, seconds, contender, repeats, threads)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the time is the child's, recorded below
    label = f"{seconds // 60} min" if seconds >= 60 and seconds % 60 == 0 and seconds > 120 else f"{seconds} s"
    flops = encoder_flops(1, result["frames"], dict(_architecture(), num_hidden_layers=layers))
    tflops, peak_tflops = flops / (result["median_ms"] * 1e-3) / 1e12, matmul_tflops(torch.float32)
    info.update(
        case=f"CPU {'short clip' if seconds < 30 else 'long audio'}, {layers} layers, {label}",
        contender=contender + (f", {threads} thread{'s' if threads > 1 else ''}" if threads else ""),
        median_ms=result["median_ms"], times_ms=result["times_ms"], peak_rss_bytes=result["peak_rss_bytes"],
        threads=result["threads"], load_average=result["load_average"], frames=result["frames"], layers=layers,
        audio_seconds=seconds, hours_audio_per_s=seconds / 3600 / (result["median_ms"] * 1e-3),
        flops=flops, tflops=tflops, peak_tflops=peak_tflops, mfu=tflops / peak_tflops, dtype="float32", claim=True,
        **CONTENDERS[contender],
    )


def _architecture():
    from bench_encoder import W2V_BERT_2_0

    return W2V_BERT_2_0
