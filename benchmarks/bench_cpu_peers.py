"""On a CPU: ours against the CPU runtimes a user would pick instead, each converted from the same checkpoint folder
and parity-checked against transformers before it is timed.

    pytest benchmarks/bench_cpu_peers.py --benchmark-only                   # smoke: 1 layer, 2 s (a minute or two)
    W2VBERT_FAST_CPU_PEERS=1 pytest benchmarks/bench_cpu_peers.py --benchmark-only \\
        --benchmark-json=benchmarks/results/cpu-peers-<commit>.json         # the claim: 24 layers, 6 / 20 / 30 s
    python benchmarks/tools/cpu_peers_run.py                                # the same, on a quiet machine only,
                                                                            # then RESULTS.md regenerated

The model: the w2v-bert-2.0 architecture (hidden 1024, 16 heads, FFN 4096, relative_key 64/8, conv k=31; 24 layers,
1 in the smoke run) with seeded random weights, **plus the one-layer adapter** of its CTC fine-tunes
(``add_adapter=True``): CTranslate2's Wav2Vec2Bert runtime always builds at least one adapter layer (4.8: its
``build_layers_list`` makes layer 0 unconditionally) and hard-codes hidden 1024 and 16 heads, so every contender runs
that model, saved once by transformers' ``save_pretrained`` into a folder everyone converts or loads from. One clip
of speech-like audio, batch 1, its features computed once (FbankExtractor), the last hidden state (after the adapter)
compared and timed. Contenders:

* transformers ``Wav2Vec2BertModel`` with sdpa, fp32 (the reference) and bf16; ``torch.compile`` of it (inductor,
  fp32; needs a C++ compiler);
* ours, ``w2vbert_fast.Wav2Vec2BertModel.from_pretrained(folder)``, fp32 and bf16;
* CTranslate2 (``pip install ctranslate2``), fp32 and int8, converted with ``ctranslate2.converters.
  TransformersConverter`` from a ``Wav2Vec2BertForCTC`` folder made from the checkpoint (``return_hidden``: no LM
  head). CTranslate2 4.8's adapter layer adds the normalised input of its feed-forward block where the block's
  output belongs (``src/layers/wav2vec2bert.cc``, ``AdapterLayer``): its outputs are not transformers'. Its parity
  check is then against transformers with that one step reproduced (the adapter FFN replaced by the identity), which
  checks everything else it computes (``parity_against`` says which reference passed); the error against
  transformers proper is recorded too (``error_vs_transformers``);
* ONNX Runtime (``pip install onnxruntime onnx``), fp32, the transformers model exported with
  ``torch.onnx.export`` (TorchScript exporter, dynamic frame axis), CPUExecutionProvider.

A contender whose package is not installed is skipped, saying which (``pip install -e ".[peers]"``); one that fails
its parity check fails the test (a runtime computing another function has no speed worth recording). Parity: the
largest |difference| over the largest |reference value| (``error_vs_reference``), at most 1e-3 in fp32, 0.1 in bf16
and 0.25 in int8 (the issue measured 3.5–4.4 % for bf16, 9 % for CTranslate2's int8). Every runtime gets
``torch.get_num_threads()`` threads; the load average before each contender is recorded (``load_average``), so a
shared machine shows. Time: the full run is about 40 minutes on 2 cores (each 30 s fp32 forward takes ~30 s; the
ONNX export and the CTranslate2 conversions ~5 minutes; the compiles ~1 minute per length).
"""

import functools
import os
import shutil
import tempfile
import time

import pytest
import torch
from bench_encoder import W2V_BERT_2_0, features, speech_like_audio
from conftest import ON_GPU

import w2vbert_fast

FULL = os.environ.get("W2VBERT_FAST_CPU_PEERS", "0") not in ("", "0")
LAYERS = 24 if FULL else 1
# W2VBERT_FAST_CPU_PEERS_SECONDS="6,20": other clip lengths (a rerun of some of them)
SECONDS = [float(s) for s in os.environ.get("W2VBERT_FAST_CPU_PEERS_SECONDS", "").split(",") if s.strip()] or (
    [6.0, 20.0, 30.0] if FULL else [2.0])
ARCHITECTURE = dict(W2V_BERT_2_0, num_hidden_layers=LAYERS, add_adapter=True, num_adapter_layers=1)
# (parity bound on error_vs_reference) per compute dtype
PARITY = {"float32": 1e-3, "bfloat16": 0.1, "int8": 0.25}
PEERS_EXTRA = 'pip install -e ".[peers]"'
CONTENDERS = {  # name: (dtype, extra)
    "transformers sdpa": ("float32", {"role": "reference"}),
    "transformers sdpa, bf16": ("bfloat16", {}),
    "torch.compile(transformers sdpa)": ("float32", {}),
    "ours": ("float32", {}),
    "ours, bf16": ("bfloat16", {}),
    "CTranslate2": ("float32", {}),
    "CTranslate2, int8": ("int8", {}),
    "ONNX Runtime": ("float32", {}),
}

pytestmark = pytest.mark.skipif(ON_GPU, reason="CPU runtimes: run on a machine without a GPU (or hide it with "
                                                 "CUDA_VISIBLE_DEVICES='')")


# ------------------------------------------------------------------------------------------ shared set-up
@functools.lru_cache(maxsize=None)
def work_folder() -> str:
    folder = tempfile.mkdtemp(prefix="w2vbert_fast-peers-")
    import atexit

    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.lru_cache(maxsize=None)
def checkpoint() -> str:
    """The transformers-format folder every contender starts from: seeded random weights, save_pretrained."""
    transformers = pytest.importorskip("transformers")
    folder = os.path.join(work_folder(), "checkpoint")
    torch.manual_seed(0)
    model = transformers.Wav2Vec2BertModel(transformers.Wav2Vec2BertConfig(**ARCHITECTURE))
    model.save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def reference_model():
    """transformers, sdpa, fp32, from the folder: the reference (and what torch.compile compiles)."""
    transformers = pytest.importorskip("transformers")
    return transformers.Wav2Vec2BertModel.from_pretrained(checkpoint(), attn_implementation="sdpa").eval()


@functools.lru_cache(maxsize=None)
def clip_features(seconds):
    """(1, F, 160) fp32 features of one clip of ``seconds`` of speech-like audio."""
    return features([speech_like_audio(seconds, seed=11)])[0].float()


@functools.lru_cache(maxsize=None)
def reference_outputs(seconds):
    """(transformers' last hidden state, the same with CTranslate2's adapter step): fp32, from one encoder pass."""
    model = reference_model()
    with torch.inference_mode():
        out = model(clip_features(seconds), output_hidden_states=True)
        encoder_out = out.hidden_states[-1]  # before the adapter
        adapter_layer = model.adapter.layers[0]
        ffn = adapter_layer.ffn
        adapter_layer.ffn = torch.nn.Identity()  # CTranslate2 4.8: LN(h) + h where ffn(LN(h)) + h belongs
        try:
            ct2_like = model.adapter(encoder_out)
        finally:
            adapter_layer.ffn = ffn
    return out.last_hidden_state, ct2_like


def error_of(output, expected) -> float:
    """max |output − expected| / max |expected|, in fp64."""
    output, expected = torch.as_tensor(output).double(), expected.double()
    assert output.shape == expected.shape, f"output shape {tuple(output.shape)}, expected {tuple(expected.shape)}"
    return ((output - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------ the contenders
def transformers_runner(dtype):
    transformers = pytest.importorskip("transformers")
    torch_dtype = getattr(torch, dtype)
    model = reference_model() if dtype == "float32" else transformers.Wav2Vec2BertModel.from_pretrained(
        checkpoint(), attn_implementation="sdpa", dtype=torch_dtype).eval()
    return lambda x: model(x.to(torch_dtype)).last_hidden_state


def compiled_runner(dtype):
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("torch.compile on a CPU needs a C++ compiler (inductor builds its kernels): none on PATH")
    compiled = torch.compile(reference_model(), dynamic=False)
    return lambda x: compiled(x).last_hidden_state


def our_runner(dtype):
    torch_dtype = getattr(torch, dtype)
    model = w2vbert_fast.Wav2Vec2BertModel.from_pretrained(checkpoint(), dtype=torch_dtype, device="cpu").eval()
    return lambda x: model(x.to(torch_dtype)).last_hidden_state


@functools.lru_cache(maxsize=None)
def ctranslate2_folder(quantization):
    """The checkpoint converted by CTranslate2's TransformersConverter (through a Wav2Vec2BertForCTC folder with a
    stand-in vocabulary, which the converter requires; ``return_hidden``: no LM head)."""
    ctranslate2 = pytest.importorskip("ctranslate2", reason=f"CTranslate2 is not installed ({PEERS_EXTRA})")
    transformers = pytest.importorskip("transformers")
    import json

    ctc_folder = os.path.join(work_folder(), "for-ctc")
    if not os.path.isdir(ctc_folder):
        vocabulary = os.path.join(work_folder(), "vocab.json")
        with open(vocabulary, "w") as f:
            json.dump({f"t{i}": i for i in range(32)}, f)
        tokenizer = transformers.Wav2Vec2CTCTokenizer(vocabulary, unk_token="t1", pad_token="t0")
        ctc = transformers.Wav2Vec2BertForCTC.from_pretrained(checkpoint(), vocab_size=len(tokenizer.get_vocab()))
        ctc.config.return_hidden = True
        ctc.save_pretrained(ctc_folder)
        tokenizer.save_pretrained(ctc_folder)
        del ctc
    out = os.path.join(work_folder(), f"ctranslate2-{quantization}")
    ctranslate2.converters.TransformersConverter(ctc_folder).convert(out, quantization=quantization, force=True)
    return out


def ctranslate2_runner(dtype):
    ctranslate2 = pytest.importorskip("ctranslate2", reason=f"CTranslate2 is not installed ({PEERS_EXTRA})")
    # converted in fp32; int8 is a compute type of the same conversion
    model = ctranslate2.models.Wav2Vec2Bert(ctranslate2_folder("float32"), device="cpu", compute_type=dtype,
                                            intra_threads=torch.get_num_threads())
    inputs = {}

    def run(x):
        key = x.data_ptr()
        if key not in inputs:  # the input's StorageView built once per clip, outside the timed calls
            inputs.clear()
            inputs[key] = (x, ctranslate2.StorageView.from_array(x.contiguous().numpy()))
        return model.encode(inputs[key][1], to_cpu=True)

    return run


@functools.lru_cache(maxsize=None)
def onnx_file():
    pytest.importorskip("onnx", reason=f"onnx is not installed ({PEERS_EXTRA})")
    path = os.path.join(work_folder(), "onnx", "model.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)

    class LastHiddenState(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, input_features):
            return self.model(input_features).last_hidden_state

    import warnings

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(LastHiddenState(reference_model()).eval(), (clip_features(SECONDS[0]),), path,
                          input_names=["input_features"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_features": {1: "frames"}, "last_hidden_state": {1: "adapter_frames"}},
                          dynamo=False, opset_version=17)
    return path


def onnxruntime_runner(dtype):
    ort = pytest.importorskip("onnxruntime", reason=f"ONNX Runtime is not installed ({PEERS_EXTRA})")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_file(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"input_features": x.numpy()})[0]


RUNNERS = {"transformers sdpa": transformers_runner, "transformers sdpa, bf16": transformers_runner,
           "torch.compile(transformers sdpa)": compiled_runner, "ours": our_runner, "ours, bf16": our_runner,
           "CTranslate2": ctranslate2_runner, "CTranslate2, int8": ctranslate2_runner,
           "ONNX Runtime": onnxruntime_runner}


def as_tensor(output):
    """A contender's output (torch tensor, numpy array, CTranslate2 StorageView) as an fp32 torch tensor."""
    if isinstance(output, torch.Tensor):
        return output.float()
    import numpy as np

    return torch.from_numpy(np.array(output, dtype=np.float32))


@pytest.mark.parametrize("contender", list(CONTENDERS))
@pytest.mark.parametrize("seconds", SECONDS, ids=lambda s: f"{s:g}s")
def test_cpu_peer(measure, seconds, contender):
    dtype, extra = CONTENDERS[contender]
    run = RUNNERS[contender](dtype)
    x = clip_features(seconds)
    expected, ct2_expected = reference_outputs(seconds)
    load_average = [round(v, 2) for v in os.getloadavg()]
    with torch.inference_mode():
        started = time.perf_counter()
        output = as_tensor(run(x))  # the parity check's call is also the warm-up (compiles, allocations, plans)
        first_call_s = time.perf_counter() - started
        error = parity = error_of(output, expected)
        against = "transformers"
        if contender.startswith("CTranslate2") and error > PARITY[dtype]:
            parity, against = error_of(output, ct2_expected), "transformers with CTranslate2 4.8's adapter step"
        assert parity <= PARITY[dtype], (
            f"{contender} differs from {against} by {parity:.3g} of the largest value (allowed {PARITY[dtype]:g} in "
            f"{dtype}; {error:.3g} from transformers): not timed")
        measure(run, [(x,)], case=f"CPU peers, {LAYERS} layer{'s' if LAYERS > 1 else ''} + adapter, {seconds:g} s",
                contender=contender, warmup=0, repeats=3 if FULL else 2, rounds=1, claim=FULL,
                audio_seconds=seconds, frames=x.shape[1], dtype=dtype, threads=torch.get_num_threads(),
                error_vs_reference=parity, parity_against=against, error_vs_transformers=error,
                first_call_s=first_call_s,
                load_average=load_average, **extra)
