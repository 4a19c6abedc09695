"""One CPU long-audio case in a fresh process: build, warm up, time one clip, report time and peak RSS as JSON.

    python benchmarks/cpu_long_audio_case.py --contender ours --seconds 120 --layers 2 --threads 2

Run by ``bench_long_audio.py`` on a CPU, one subprocess per case, so that each case's peak memory is the high-water
RSS (VmHWM) of a process that ran only that case: the weights, the interpreter and libraries, and the forward's
own peak. The w2v-bert-2.0 architecture (hidden 1024, 16 heads, FFN 4096, relative_key 64/8, conv k=31) with
``--layers`` layers and seeded random weights, fp32, one clip of speech-like audio, no padding.

Contenders: ``transformers sdpa`` (transformers' Wav2Vec2BertModel with attn_implementation="sdpa", what a user
runs) and ``ours`` (that same model after ``w2vbert_fast.optimize``: the ``auto`` backend's CPU path).
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONTENDERS = ("transformers sdpa", "ours")


def peak_rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def build(contender, layers):
    import torch
    import transformers

    from bench_encoder import W2V_BERT_2_0

    import w2vbert_fast

    config = transformers.Wav2Vec2BertConfig(**dict(W2V_BERT_2_0, num_hidden_layers=layers),
                                             attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Wav2Vec2BertModel(config).eval()
    return w2vbert_fast.optimize(model) if contender == "ours" else model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--seconds", type=float, required=True, help="audio length of the timed clip")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls (the median is reported)")
    args = parser.parse_args(argv)

    sys.path.insert(0, HERE)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_encoder import features, speech_like_audio

    model = build(args.contender, args.layers)
    clip, _ = features([speech_like_audio(args.seconds, seed=7)])
    warm, _ = features([speech_like_audio(2.0, seed=8)])
    times = []
    with torch.inference_mode():
        model(warm)  # one-time costs (allocator, thread pool, library dispatch) stay out of the timed call
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model(clip).last_hidden_state
            times.append(time.perf_counter() - start)
    if not torch.isfinite(out).all():
        raise SystemExit("non-finite hidden states")
    times.sort()
    print(json.dumps({
        "contender": args.contender, "seconds": args.seconds, "layers": args.layers, "frames": clip.shape[1],
        "threads": torch.get_num_threads(), "median_ms": 1e3 * times[len(times) // 2], "times_ms": [1e3 * t for t in times],
        "peak_rss_bytes": peak_rss_bytes(), "load_average": os.getloadavg(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
