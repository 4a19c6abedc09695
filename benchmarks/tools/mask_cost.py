"""What a general padding mask costs relative attention: ``ops.rel_key_attention`` at w2v-bert-2.0's head shape
(16 heads × 64, band 64 + 8), one batch of two sequences, three ways of saying which frames are real:

* ``lengths``: right padding as lengths alone (the build without a key mask);
* ``lengths+key_mask``: the same right padding given as lengths and a key mask (what the model passes for any mask);
* ``left-padding``: the same counts of real frames, left-padded (key mask, lengths = one past the last real frame).

Forward, and forward + backward, each timed as the median of many calls, the cases interleaved round by round so
that load on the machine falls on all of them alike; the load average is recorded with the figures.

    python benchmarks/tools/mask_cost.py [--device cpu|cuda] [--length 1000] [--out F]

On CUDA the calls are timed with CUDA events (inputs rotated across calls so the L2 does not flatter).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from w2vbert_fast import ops  # noqa: E402

HEADS, HEAD_DIM, LEFT, RIGHT = 16, 64, 64, 8


def cases(length, device, dtype):
    """{name: (lengths, key_mask)} for two sequences of ``length`` and 70 % of it real frames."""
    real = int(length * 0.7)
    lengths = torch.tensor([length, real], device=device, dtype=torch.int32)
    frames = torch.arange(length, device=device)
    right = frames[None, :] < lengths[:, None]
    left = torch.stack([torch.ones(length, dtype=torch.bool, device=device), frames >= length - real])
    return {
        "lengths": (lengths, None),
        "lengths+key_mask": (lengths, right),
        "left-padding": (torch.full((2,), length, device=device, dtype=torch.int32), left),
    }


def make_inputs(length, device, dtype, copies):
    generator = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(copies):
        q, k, v = (torch.randn(2, length, HEADS, HEAD_DIM, generator=generator).to(device, dtype).requires_grad_(True)
                   for _ in range(3))
        table = torch.randn(LEFT + RIGHT + 1, HEAD_DIM, generator=generator).to(device, dtype).requires_grad_(True)
        grad = torch.randn(2, length, HEADS * HEAD_DIM, generator=generator).to(device, dtype)
        sets.append((q, k, v, table, grad))
    return sets


def call(inputs, lengths, key_mask, backward):
    q, k, v, table, grad = inputs
    out = ops.rel_key_attention(q, k, v, table, LEFT, RIGHT, HEAD_DIM ** -0.5, lengths, key_mask=key_mask)
    if backward:
        torch.autograd.grad(out, (q, k, v, table), grad)
    return out


def time_once(device, fn):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(length, device, dtype, rounds, warmup):
    inputs = make_inputs(length, device, dtype, copies=4 if device.type == "cuda" else 1)
    masks = cases(length, device, dtype)
    results = {}
    for backward in (False, True):
        mode = "forward+backward" if backward else "forward"
        times = {name: [] for name in masks}
        for round_index in range(warmup + rounds):
            for name, (lengths, key_mask) in masks.items():
                x = inputs[round_index % len(inputs)]
                with torch.set_grad_enabled(backward):
                    seconds = time_once(device, lambda: call(x, lengths, key_mask, backward))
                if round_index >= warmup:
                    times[name].append(seconds)
        base = statistics.median(times["lengths"])
        results[mode] = {name: dict(median_ms=round(statistics.median(t) * 1e3, 3),
                                    min_ms=round(min(t) * 1e3, 3), ratio_to_lengths=round(statistics.median(t) / base, 3))
                         for name, t in times.items()}
    return results


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on a CPU, bfloat16 on CUDA")
    parser.add_argument("--length", type=int, default=1000, help="frames per sequence (50 per second of audio)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    load_before = os.getloadavg()
    results = measure(args.length, device, dtype, args.rounds, args.warmup)
    record = dict(
        what="ops.rel_key_attention: cost of a key mask (right padding as lengths, as lengths + mask, left padding)",
        shape=dict(batch=2, length=args.length, heads=HEADS, head_dim=HEAD_DIM, left=LEFT, right=RIGHT,
                   real_frames=[args.length, int(args.length * 0.7)]),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        dtype=str(dtype).removeprefix("torch."), torch=torch.__version__, threads=torch.get_num_threads(),
        commit=commit(), rounds=args.rounds, load_average_before=load_before, load_average_after=os.getloadavg(),
        results=results,
    )
    text = json.dumps(record, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
