"""The dispatch table (ops/_backend.py): what ``auto`` runs per GPU arch, input dtype and op, the overrides, the
error for a dtype the GPU lacks, and ``describe()``.

No GPU here: the device's compute capability is patched (``torch.cuda.get_device_capability``, what the table reads),
and the op-level tests make CPU tensors look like CUDA ones to the dispatcher (``_backend.device_of``) so the call
sites are checked too. The expected table below is README's "Which path each GPU gets", written out by hand: a
change to ``_backend.TRITON_TABLE`` must change the documentation and this test with it.
"""

import importlib

import pytest
import torch

from w2vbert_fast.ops import _backend, describe, glu_depthwise_conv, log_mel_fbank, rel_key_attention

T, P, E, R = _backend.TRITON, _backend.FAST, "error", _backend.REFERENCE
OPS = ("rel_key_attention", "glu_depthwise_conv", "log_mel_fbank")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def row(attention, conv, fbank):
    """{op: {dtype: path}} from three (fp16, bf16, fp32) triples."""
    return {op: dict(zip(DTYPES, paths)) for op, paths in zip(OPS, (attention, conv, fbank))}


# README: T4 (sm_75): attention portable, the conv and fbank kernels, no bf16; A100 (sm_80) and H100 (sm_90): the
# kernels; A10/RTX 30 (sm_86) and L4/RTX 40 (sm_89): the attention kernels in fp16/bf16 (portable in fp32), the conv
# kernels in fp16 (portable in bf16 and fp32), the fbank kernels; anything else (V100, Blackwell, …): portable, bf16 refused before sm_80.
EXPECTED = {
    (7, 5): row((P, E, P), (T, E, T), (T, T, T)),
    (8, 0): row((T, T, T), (T, T, T), (T, T, T)),
    (8, 6): row((T, T, P), (T, P, P), (T, T, T)),
    (8, 9): row((T, T, P), (T, P, P), (T, T, T)),
    (9, 0): row((T, T, T), (T, T, T), (T, T, T)),
    (7, 0): row((P, E, P), (P, E, P), (P, P, P)),
    (10, 0): row((P, P, P), (P, P, P), (P, P, P)),
    (12, 0): row((P, P, P), (P, P, P), (P, P, P)),
}


@pytest.fixture
def gpu(monkeypatch):
    """``gpu((7, 5))``: the CUDA device reports that compute capability; the backend is ``auto`` unless set."""
    monkeypatch.delenv("W2VBERT_FAST_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a real GPU runs no interpreter

    def set_capability(capability):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a test GPU")
        return torch.device("cuda", 0)

    return set_capability


def path_of(op, device, dtype):
    try:
        return _backend.choose(op, device, dtype).path
    except ValueError as error:
        assert "float16" in str(error)
        return E


@pytest.mark.parametrize("capability", list(EXPECTED), ids=[f"sm_{a}{b}" for a, b in EXPECTED])
def test_auto_runs_the_documented_path_for_every_op_and_dtype(gpu, capability):
    device = gpu(capability)
    got = {op: {dtype: path_of(op, device, dtype) for dtype in DTYPES} for op in OPS}
    assert got == EXPECTED[capability]


def test_the_table_covers_the_compiled_archs_and_only_checked_dtypes():
    """Every arch in TRITON_TABLE is one the compile check compiles (benchmarks/tools/compile_check.py TARGETS), and
    every dtype one the kernels are checked for."""
    compiled = {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"}
    for op, archs in _backend.TRITON_TABLE.items():
        assert set(archs) <= compiled, op
        for dtypes in archs.values():
            assert set(dtypes) <= {str(d).replace("torch.", "") for d in _backend.OP_DTYPES[op]}, op


def test_bf16_on_a_t4_is_refused_with_the_dtype_named_and_float16_suggested(gpu):
    device = gpu((7, 5))
    with pytest.raises(ValueError, match=r"bfloat16 inputs need a GPU of compute capability 8\.0 or newer; a test "
                                         r"GPU is sm_75.*torch\.float16"):
        _backend.choose("rel_key_attention", device, torch.bfloat16)
    # the fbank casts any float samples to fp32 on the device: a bf16 waveform is fine
    assert _backend.choose("log_mel_fbank", device, torch.bfloat16).path == T


@pytest.mark.parametrize("name, capability, dtype, expected", [
    ("portable", (9, 0), torch.bfloat16, P),  # the portable path on a GPU the table gives to the kernels
    ("portable", (8, 0), torch.float32, P),
    ("portable", (7, 5), torch.bfloat16, E),  # no bf16 on a T4, whatever the path
    ("triton", (7, 5), torch.float16, T),  # forced: the kernels even where the table says portable
    ("triton", (7, 5), torch.bfloat16, T),  # forced: no dtype refusal either (Triton says what it can't do)
    ("torch", (7, 5), torch.bfloat16, R),  # the reference runs whatever the device
    ("auto", (9, 0), torch.float64, R),  # no kernel or fused attention takes fp64 on a GPU
    ("triton", (9, 0), torch.float64, R),
], ids=["portable-sm90", "portable-sm80-fp32", "portable-bf16-sm75", "triton-sm75", "triton-bf16-sm75",
        "torch-bf16-sm75", "auto-fp64", "triton-fp64"])
def test_the_backend_variable_overrides_the_table(gpu, monkeypatch, name, capability, dtype, expected):
    device = gpu(capability)
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", name)
    assert path_of("rel_key_attention", device, dtype) == expected
    if dtype != torch.float64:
        assert path_of("glu_depthwise_conv", device, dtype) == expected


def test_fp64_fbank_on_a_gpu_runs_the_kernels(gpu):
    assert _backend.choose("log_mel_fbank", gpu((9, 0)), torch.float64).path == T


def test_cpu_tensors_take_the_fast_path_on_auto_and_portable_and_need_the_interpreter_for_triton(monkeypatch):
    for name in ("auto", "portable"):
        monkeypatch.setenv("W2VBERT_FAST_BACKEND", name)
        assert {_backend.choose(op, "cpu", torch.bfloat16).path for op in OPS} == {P}
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.choose("rel_key_attention", "cpu", torch.float64).path == T
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.choose("rel_key_attention", "cpu", torch.float32)


def test_an_unknown_backend_or_op_is_named(monkeypatch):
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"W2VBERT_FAST_BACKEND must be one of \('auto', 'triton', 'portable', "
                                         r"'torch'\), got 'fastest'"):
        _backend.choose("rel_key_attention", "cpu", torch.float32)
    monkeypatch.delenv("W2VBERT_FAST_BACKEND")
    with pytest.raises(ValueError, match="op must be one of"):
        _backend.choose("conv", "cpu", torch.float32)


def test_describe_names_the_device_and_says_each_ops_path_and_why(gpu, monkeypatch):
    gpu((7, 5))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    text = describe()
    lines = text.splitlines()
    assert lines[0] == "W2VBERT_FAST_BACKEND=auto on a test GPU (sm_75, compute capability 7.5):"
    assert len(lines) == 1 + len(OPS) * len(DTYPES)
    by_key = {tuple(line.split()[:2]): line for line in lines[1:]}
    assert by_key[("rel_key_attention", "float16")].split()[2] == "fast"
    assert "without tensor-core MMA" in by_key[("rel_key_attention", "float16")]
    assert "memory-efficient attention" in by_key[("rel_key_attention", "float16")]
    assert by_key[("rel_key_attention", "bfloat16")].split()[2] == "error"
    assert "torch.float16" in by_key[("rel_key_attention", "bfloat16")]
    assert by_key[("log_mel_fbank", "float32")].split()[2] == "triton"
    assert describe("cpu").splitlines()[0] == "W2VBERT_FAST_BACKEND=auto on cpu:"


# ------------------------------------------------------------------------------ the ops ask the table by their name
@pytest.fixture
def as_if_on_cuda(gpu, monkeypatch):
    """CPU tensors that the dispatcher takes for tensors on a GPU of the given capability; records each choice."""
    chosen = []
    real = _backend.choose

    def recording(op, device, dtype, name=None, explain=True):
        choice = real(op, device, dtype, name, explain)
        chosen.append((op, dtype, choice.path))
        return choice

    def set_gpu(capability):
        gpu(capability)
        monkeypatch.setattr(_backend, "device_of", lambda *tensors: torch.device("cuda", 0))
        monkeypatch.setattr(_backend, "choose", recording)
        return chosen

    return set_gpu


def test_attention_on_a_t4_runs_the_portable_path_and_refuses_bf16(as_if_on_cuda, monkeypatch):
    chosen = as_if_on_cuda((7, 5))
    kernel_module = importlib.import_module("w2vbert_fast.ops.rel_key_attention")
    ran = []
    real = kernel_module._rel_key_attention_op
    monkeypatch.setattr(kernel_module, "_rel_key_attention_op", lambda *args: ran.append(args[9]) or real(*args))
    q, k, v = (torch.randn(1, 9, 2, 8) for _ in range(3))
    table = torch.randn(4 + 2 + 1, 8)
    out = rel_key_attention(q, k, v, table, 4, 2, 0.3)
    assert chosen == [("rel_key_attention", torch.float32, P)] and ran == [P]
    torch.testing.assert_close(out, kernel_module.rel_key_attention_reference(q, k, v, table, 4, 2, 0.3))
    with pytest.raises(ValueError, match="bfloat16 inputs need a GPU"):
        rel_key_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), table.bfloat16(), 4, 2, 0.3)


def test_the_conv_and_fbank_ops_ask_the_table_under_their_own_names(as_if_on_cuda, monkeypatch):
    chosen = as_if_on_cuda((8, 6))
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", "portable")  # runnable here: the PyTorch paths
    x = torch.randn(1, 12, 8)
    glu_depthwise_conv(x, torch.randn(4, 1, 3), torch.ones(4), torch.zeros(4), 1e-5)
    log_mel_fbank(torch.randn(1, 800) * 0.1)
    assert chosen == [("glu_depthwise_conv", torch.float32, P), ("log_mel_fbank", torch.float32, P)]
