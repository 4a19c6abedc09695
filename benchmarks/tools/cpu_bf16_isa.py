"""bf16 against fp32 on a CPU, with the CPU's newer matrix instructions switched off one level at a time: what a
user whose CPU lacks AMX, or AVX512-BF16 too, gets from ``--dtype bfloat16``.

    python benchmarks/tools/cpu_bf16_isa.py [--json benchmarks/results/cpu-bf16-isa-<commit>.json]

One fresh process per instruction-set cap, each told by oneDNN's own switch, ``ONEDNN_MAX_CPU_ISA`` (the library
PyTorch runs bf16 and fp32 matmuls through on x86):

* ``default``: everything the CPU has (here AMX tiles: oneDNN's ``avx512_core_amx`` kernels);
* ``AVX512_CORE_BF16``: AVX-512 with the bf16 dot-product instructions, no AMX (Cooper Lake, Zen 4);
* ``AVX512_CORE_VNNI``: AVX-512 without bf16 instructions (Skylake-SP … Ice Lake): bf16 converted to fp32 in-kernel;
* ``AVX2``: oneDNN's AVX2 kernels, with ``ATEN_CPU_CAPABILITY=avx2`` for PyTorch's own vectorised ops and
  ``MKL_ENABLE_INSTRUCTIONS=AVX2`` for MKL's fp32 GEMM.

fp32 Linear layers run MKL's sgemm, which only the AVX2 cap restricts (the other caps are CPUs with AVX-512, which
MKL uses); bf16 ones run oneDNN. Each process records the oneDNN implementation its bf16 Linear ran
(``ONEDNN_VERBOSE`` on one Linear), so a cap that did not take shows; none recorded means oneDNN declined the bf16
matmul and PyTorch's own GEMM ran it.

Workload: the w2v-bert-2.0 layer sizes, 2 layers (seeded random weights), one 6 s clip of the bundled speech;
ours and transformers sdpa, fp32 and bf16, in alternating rounds; the error of each bf16 output against
transformers fp32 (max |difference| / max |value|).
"""

import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPS = {"default": {}, "AVX512_CORE_BF16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
        "AVX512_CORE_VNNI": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
        "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}

# Runs in a fresh process: argv = [package root, options as JSON]; prints oneDNN's verbose lines, then one JSON line.
RUNNER = r'''
import json, sys, time
root, options = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, root)
import numpy as np
import torch
import transformers
import w2vbert_fast
from w2vbert_fast.extract.audio import bundled_clip_path, read_audio

def implementation(dtype):
    """The oneDNN primitive line of one Linear in ``dtype`` (printed by oneDNN to stdout; the parent reads it)."""
    layer = torch.nn.Linear(1024, 1024).to(dtype)
    x = torch.randn(300, 1024, dtype=dtype)
    print(f"@@ {dtype}", flush=True)
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        layer(x)
    print("@@ end", flush=True)

for dtype in (torch.bfloat16, torch.float32):
    implementation(dtype)
sizes = dict(hidden_size=1024, num_hidden_layers=options["layers"], num_attention_heads=16, intermediate_size=4096,
             feature_projection_input_dim=160, hidden_act="swish", position_embeddings_type="relative_key",
             left_max_position_embeddings=64, right_max_position_embeddings=8, conv_depthwise_kernel_size=31,
             add_adapter=False)
torch.manual_seed(0)
reference = transformers.Wav2Vec2BertModel(transformers.Wav2Vec2BertConfig(**sizes, attn_implementation="sdpa")).eval()
ours = w2vbert_fast.Wav2Vec2BertModel(w2vbert_fast.Wav2Vec2BertConfig(**sizes)).eval()
ours.load_state_dict(reference.state_dict(), strict=True)
models = {"transformers sdpa": reference, "ours": ours}
bf16 = {name: type(m)(m.config).eval() for name, m in models.items()}
for name, model in bf16.items():
    model.load_state_dict(models[name].state_dict())
    model.to(torch.bfloat16)
speech = np.asarray(read_audio(bundled_clip_path())[0], dtype=np.float32)
samples = int(16000 * options["seconds"])
clip = np.tile(speech, samples // len(speech) + 1)[:samples]
features = w2vbert_fast.FbankExtractor()([clip], sampling_rate=16000)["input_features"]
contenders = {}
for name in models:
    contenders[f"{name}, fp32"] = (models[name], features)
    contenders[f"{name}, bf16"] = (bf16[name], features.to(torch.bfloat16))
times = {name: [] for name in contenders}
with torch.inference_mode():
    expected = reference(features).last_hidden_state.float()
    errors = {name: ((m(x).last_hidden_state.float() - expected).abs().max() / expected.abs().max()).item()
              for name, (m, x) in contenders.items()}  # also the warm-up call
    names = list(contenders)
    for round_ in range(options["rounds"]):
        for name in (names if round_ % 2 == 0 else names[::-1]):
            model, x = contenders[name]
            start = time.perf_counter()
            model(x)
            times[name].append((time.perf_counter() - start) * 1e3)
median = lambda v: sorted(v)[len(v) // 2]
print(json.dumps({name: dict(median_ms=round(median(ts), 1), min_ms=round(min(ts), 1), times_ms=[round(t, 1) for t in ts],
                             error_vs_transformers_fp32=float(f"{errors[name]:.3g}")) for name, ts in times.items()}))
'''


def implementations(stdout):
    """{dtype: the oneDNN primitive lines between the runner's markers} (``exec`` lines only)."""
    found, current = {}, None
    for line in stdout.splitlines():
        if line.startswith("@@ "):
            current = None if line == "@@ end" else line[3:].replace("torch.", "")
            continue
        fields = line.split(",")
        if current and line.startswith("onednn_verbose") and len(fields) > 6 and fields[3] == "exec":
            found.setdefault(current, []).append(",".join(fields[4:7]))  # engine, primitive, implementation
    return {dtype: sorted(set(lines)) for dtype, lines in found.items()}


def run_cap(cap, options):
    env = dict(os.environ, PYTHONPATH=ROOT, W2VBERT_FAST_BACKEND="auto", **CAPS[cap])
    done = subprocess.run([sys.executable, "-c", RUNNER, ROOT, json.dumps(options)], capture_output=True, text=True,
                          env=env, timeout=3600, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"cap {cap}: exit {done.returncode}\n{done.stderr[-3000:]}")
    results = json.loads(done.stdout.strip().splitlines()[-1])
    speed_up = {name: round(results[f"{name}, fp32"]["median_ms"] / results[f"{name}, bf16"]["median_ms"], 2)
                for name in ("ours", "transformers sdpa")}  # fp32 time over bf16 time
    return dict(env=CAPS[cap], onednn=implementations(done.stdout), results=results, speed_up_bf16=speed_up)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--caps", default=",".join(CAPS), help=f"comma-separated, of {', '.join(CAPS)}")
    parser.add_argument("--json", help="where to write (default: print)")
    args = parser.parse_args(argv)
    import torch

    options = dict(rounds=args.rounds, seconds=args.seconds, layers=args.layers)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    document = dict(environment=dict(commit=commit, python=platform.python_version(), torch=torch.__version__,
                                     cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                                     cpu_flags=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
                                     threads=torch.get_num_threads()),
                    options=options, caps={},
                    caveat="an emulation on one CPU: the caps restrict the kernels oneDNN (bf16 matmuls), MKL (fp32 "
                           "matmuls, AVX2 cap only) and ATen pick, not the cores' clock, caches or memory; no bf16 "
                           "oneDNN kernel recorded = PyTorch's own bf16 GEMM")
    for cap in args.caps.split(","):
        load_before = os.getloadavg()
        document["caps"][cap] = dict(run_cap(cap, options), load_before=[round(x, 2) for x in load_before],
                                     load_after=[round(x, 2) for x in os.getloadavg()])
        print(f"{cap}: {document['caps'][cap]['speed_up_bf16']} {document['caps'][cap]['onednn']}", file=sys.stderr,
              flush=True)
    text = json.dumps(document, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
