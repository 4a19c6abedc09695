"""The fused relative-key attention kernel against its PyTorch reference and against transformers.

On a machine without a GPU the kernel runs under Triton's interpreter (tests/conftest.py), fp32 and fp16;
bf16 is checked on the GPU only, because the interpreter's bf16 ``tl.dot`` is wrong.
"""

import copy
import importlib

import pytest
import torch
from conftest import FP32_ATOL, HAS_CUDA, assert_fp32_close, assert_half_precision_close, requires_cuda
from model_helpers import DEVICE as MODEL_DEVICE
from model_helpers import max_diff_on_valid, our_model_like, ragged_batch, transformers_model

import w2vbert_fast
from w2vbert_fast.ops import _backend, rel_key_attention, rel_key_attention_reference
from w2vbert_fast.ops.rel_key_attention import _launch

kernel_module = importlib.import_module("w2vbert_fast.ops.rel_key_attention")

DEVICE = "cuda" if HAS_CUDA else "cpu"


def make_inputs(batch, length, heads, head_dim, left, right, dtype=torch.float32, seed=0):
    """q, k, v as strided views of one fused projection output (B, L, 3, H, D), as a model would produce them."""
    generator = torch.Generator().manual_seed(seed)
    fused = torch.randn(batch, length, 3, heads, head_dim, generator=generator).to(DEVICE, dtype)
    q, k, v = fused.unbind(2)
    # Large enough that the position bias moves the softmax: a kernel that drops or misplaces it fails.
    table = (2 * torch.randn(left + right + 1, head_dim, generator=generator)).to(DEVICE, dtype)
    return q, k, v, table


def key_mask_of(lengths, length):
    return torch.arange(length, device=lengths.device)[None, :] < lengths[:, None]


def reference_fp32(q, k, v, table, left, right, lengths=None, zero_padded_queries=True):
    mask = None if lengths is None else key_mask_of(lengths, q.shape[1])
    out = rel_key_attention_reference(q.float(), k.float(), v.float(), table.float(), left, right,
                                      q.shape[-1] ** -0.5, mask)
    if mask is not None and zero_padded_queries:
        out = out.masked_fill(~mask[..., None], 0)
    return out


WINDOWS = [(64, 8), (3, 5), (0, 0)]
WINDOW_IDS = ["left64-right8", "left3-right5", "left0-right0"]


@pytest.mark.parametrize("left,right", WINDOWS, ids=WINDOW_IDS)
@pytest.mark.parametrize("length", [1, 7, 64, 65, 200])
def test_kernel_matches_reference_fp32_for_any_length_and_window(backend, length, left, right):
    backend("triton")
    q, k, v, table = make_inputs(2, length, 2, 32, left, right)
    out = rel_key_attention(q, k, v, table, left, right, 32 ** -0.5)
    assert_fp32_close(out, reference_fp32(q, k, v, table, left, right))


@pytest.mark.parametrize("heads,head_dim", [(1, 16), (3, 24), (4, 64), (2, 80)], ids=lambda x: str(x))
def test_kernel_handles_head_counts_and_head_sizes(backend, heads, head_dim):
    backend("triton")
    q, k, v, table = make_inputs(2, 45, heads, head_dim, 6, 3)
    out = rel_key_attention(q, k, v, table, 6, 3, head_dim ** -0.5)
    assert out.shape == (2, 45, heads * head_dim)
    assert_fp32_close(out, reference_fp32(q, k, v, table, 6, 3))


@pytest.mark.parametrize("lengths", [[70, 33, 1, 64], [1, 1], [70, 69]], ids=["ragged", "one-frame-each", "off-by-one"])
@pytest.mark.parametrize("left,right", WINDOWS, ids=WINDOW_IDS)
def test_ragged_lengths_ignore_padded_keys_and_zero_padded_queries(backend, lengths, left, right):
    backend("triton")
    length = max(lengths)
    q, k, v, table = make_inputs(len(lengths), length, 2, 16, left, right, seed=1)
    lengths = torch.tensor(lengths, device=DEVICE)
    # padded keys and values hold garbage that must not leak into real rows
    pad = ~key_mask_of(lengths, length)
    k[pad] = 1e4
    v[pad] = float("nan")
    out = rel_key_attention(q, k, v, table, left, right, 16 ** -0.5, lengths)
    expected = reference_fp32(q, k, v.nan_to_num(0.0), table, left, right, lengths)
    assert_fp32_close(out, expected)
    assert (out[pad] == 0).all()


def test_all_but_one_row_padded(backend):
    backend("triton")
    q, k, v, table = make_inputs(2, 97, 3, 16, 64, 8)
    lengths = torch.tensor([97, 1], device=DEVICE)
    out = rel_key_attention(q, k, v, table, 64, 8, 0.25, lengths)
    assert_fp32_close(out, reference_fp32(q, k, v, table, 64, 8, lengths))


def test_padded_queries_computed_like_transformers_when_asked(backend):
    """zero_padded_queries=False: padded rows attend to the valid keys, as transformers computes them (the
    adapter's strided conv reads one)."""
    backend("triton")
    q, k, v, table = make_inputs(3, 50, 2, 16, 3, 5)
    lengths = torch.tensor([50, 20, 3], device=DEVICE)
    out = rel_key_attention(q, k, v, table, 3, 5, 0.25, lengths, zero_padded_queries=False)
    assert_fp32_close(out, reference_fp32(q, k, v, table, 3, 5, lengths, zero_padded_queries=False))


@pytest.mark.parametrize("zero_padded_queries", [True, False])
def test_every_output_element_is_written(zero_padded_queries):
    """The output is poisoned with NaN before the kernel runs: an unwritten row or column fails."""
    q, k, v, table = make_inputs(3, 77, 2, 24, 6, 3)
    lengths = torch.tensor([77, 31, 1], device=DEVICE, dtype=torch.int32)
    out = torch.full((3, 77, 48), float("nan"), device=DEVICE)
    lse = torch.full((3, 2, 77), float("nan"), device=DEVICE)
    _launch(q, k, v, table, 6, 3, 24 ** -0.5, lengths, zero_padded_queries, out=out, lse=lse)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_fp32_close(out, reference_fp32(q, k, v, table, 6, 3, lengths, zero_padded_queries))


def config_id(config):
    """BLOCK_M-BLOCK_N-warps-stages-maxnreg of a triton.Config."""
    return "-".join(map(str, (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
                              config.num_stages, config.maxnreg)))


def tuned_configs(tables):
    """Every config once (the key-mask builds' tables are subsets of their precision's)."""
    return [pytest.param(c, id=f"{precision}-{config_id(c)}") for precision, table in tables.items()
            if "+" not in precision for c in table]


@pytest.mark.parametrize("config", tuned_configs(kernel_module.FORWARD_CONFIGS))
def test_every_tuned_forward_config_gives_the_same_result(config):
    """The GPU autotuner may pick any of these (each precision's own); the interpreter runs each once, in fp32, on a
    ragged batch: the tile shapes and their masking, not the precision, are what differs."""
    q, k, v, table = make_inputs(2, 200, 1, 32, 64, 8, seed=4)
    lengths = torch.tensor([200, 71], device=DEVICE, dtype=torch.int32)
    out, _ = _launch(q, k, v, table, 64, 8, 32 ** -0.5, lengths, True, config=config)
    assert_fp32_close(out, reference_fp32(q, k, v, table, 64, 8, lengths))


@pytest.mark.parametrize("tables, kernel", [(kernel_module.FORWARD_CONFIGS, "_forward_kernel"),
                                            (kernel_module.DKDV_CONFIGS, "_backward_dkdv_kernel"),
                                            (kernel_module.DQ_CONFIGS, "_backward_dq_kernel")],
                         ids=["forward", "dkdv", "dq"])
@pytest.mark.parametrize("dtype, precision", [(torch.bfloat16, "half"), (torch.float16, "half"),
                                              (torch.float32, "fp32")])
@pytest.mark.parametrize("with_key_mask", [False, True], ids=["lengths", "key-mask"])
def test_the_gpu_autotuner_tries_only_the_configs_checked_for_the_input_precision(tables, kernel, dtype, precision,
                                                                                  with_key_mask):
    """fp32's dots hold twice the operands: the half-precision tiles would cut it to 8 resident warps per SM; the
    key-mask build keeps the tiles that fit it. The compile check compiles what LAUNCH_META lists for the dtype and
    the build: exactly what the autotuner keeps."""
    gpu_configs = kernel_module._configs(tables, interpreted=False)
    assert len(gpu_configs) == len({id(c) for table in tables.values() for c in table})
    q = torch.empty(1, 8, 1, 64, dtype=dtype)
    key_mask = torch.ones(1, 8, dtype=torch.bool) if with_key_mask else None
    meta = kernel_module._common_meta(q, 3, 5, None, True, key_mask)
    kept = kernel_module._pruner(tables)(gpu_configs, {"q_ptr": q}, **meta)
    table = tables.get(precision + "+key_mask", tables[precision]) if with_key_mask else tables[precision]
    assert [c.all_kwargs() for c in kept] == [c.all_kwargs() for c in table]
    assert all(c.maxnreg == config.maxnreg for c, config in zip(kept, table))
    assert all(c in tables[precision] for c in table)  # a subset: the key-mask build never runs an unchecked tile
    checked = kernel_module.LAUNCH_META[kernel + ("+key_mask" if with_key_mask else "")].configs(
        str(dtype).removeprefix("torch."))
    assert [c.all_kwargs() for c in checked] == [c.all_kwargs() for c in kept]


def test_fp64_on_a_gpu_runs_the_reference_not_an_unchecked_kernel_config(monkeypatch):
    q, k, v, table = (t.double() for t in make_inputs(1, 9, 1, 8, 3, 5))
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", "auto")
    monkeypatch.setattr(_backend, "device_of", lambda *tensors: torch.device("cuda", 0))  # as on CUDA tensors
    monkeypatch.setattr(_backend, "device_capability", lambda device: (9, 0))  # of an H100
    monkeypatch.setattr(_backend, "triton_interpreter_enabled", lambda: False)
    ran = []
    real = kernel_module._rel_key_attention_op
    # args[9]: the op's ``implementation`` (key_mask follows it)
    monkeypatch.setattr(kernel_module, "_rel_key_attention_op", lambda *args: ran.append(args[9]) or real(*args))
    out = rel_key_attention(q, k, v, table, 3, 5, 0.25)
    assert ran == []  # the literal reference, not the op
    assert torch.allclose(out, rel_key_attention_reference(q, k, v, table, 3, 5, 0.25))
    rel_key_attention(q.float(), k.float(), v.float(), table.float(), 3, 5, 0.25)
    assert ran == [_backend.TRITON]


@pytest.mark.parametrize("length", [7, 65, 130])
@pytest.mark.parametrize("left,right", [(64, 8), (3, 5)], ids=["left64-right8", "left3-right5"])
def test_fp16_error_within_twice_pytorch_fp16_error(backend, length, left, right):
    backend("triton")
    q, k, v, table = make_inputs(2, length, 2, 64, left, right, dtype=torch.float16, seed=2)
    lengths = torch.tensor([length, max(1, length // 3)], device=DEVICE)
    ours = rel_key_attention(q, k, v, table, left, right, 0.125, lengths)
    assert ours.dtype == torch.float16
    mask = key_mask_of(lengths, length)
    torch_fp16 = rel_key_attention_reference(q, k, v, table, left, right, 0.125, mask).masked_fill(~mask[..., None], 0)
    assert_half_precision_close(ours, torch_fp16, reference_fp32(q, k, v, table, left, right, lengths))


@requires_cuda
@pytest.mark.parametrize("length", [1, 65, 200, 1500])
def test_bf16_on_gpu_error_within_twice_pytorch_bf16_error(backend, length):
    # GPU only: under the interpreter bf16 tl.dot is wrong.
    backend("triton")
    q, k, v, table = make_inputs(2, length, 16, 64, 64, 8, dtype=torch.bfloat16, seed=3)
    lengths = torch.tensor([length, max(1, length // 2)], device=DEVICE)
    ours = rel_key_attention(q, k, v, table, 64, 8, 0.125, lengths)
    mask = key_mask_of(lengths, length)
    torch_bf16 = rel_key_attention_reference(q, k, v, table, 64, 8, 0.125, mask).masked_fill(~mask[..., None], 0)
    assert_half_precision_close(ours, torch_bf16, reference_fp32(q, k, v, table, 64, 8, lengths))


def test_views_with_any_strides_need_no_copy(backend):
    backend("triton")
    q, k, v, table = make_inputs(2, 40, 2, 16, 3, 5)
    # heads-major storage viewed as (B, L, H, D): a layout no projection produces, still read in place
    q_hm = q.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3)
    out = rel_key_attention(q_hm, k, v, table, 3, 5, 0.25)
    assert_fp32_close(out, reference_fp32(q, k, v, table, 3, 5))
    # a non-unit stride on head_dim is copied by the launcher, still right
    q_strided = torch.stack([q, torch.zeros_like(q)], dim=-1)[..., 0]
    assert q_strided.stride(-1) == 2
    assert_fp32_close(rel_key_attention(q_strided, k, v, table, 3, 5, 0.25), reference_fp32(q, k, v, table, 3, 5))


def test_distance_embedding_in_another_dtype_is_cast_like_the_reference(backend):
    backend("triton")
    q, k, v, table = make_inputs(1, 33, 2, 64, 3, 5, dtype=torch.float16)
    out = rel_key_attention(q, k, v, table.float(), 3, 5, 0.125)
    expected = reference_fp32(q, k, v, table, 3, 5)
    assert (out.float() - expected).abs().max().item() < 2e-2


def test_the_op_is_registered_with_torch_library():
    q, k, v, table = make_inputs(2, 19, 2, 16, 3, 5)
    lengths = torch.tensor([19, 8], device=DEVICE, dtype=torch.int32)
    op = torch.ops.w2vbert_fast.rel_key_attention.default
    torch.library.opcheck(op, (q, k, v, table, 3, 5, 0.25, lengths, True, "triton"),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_traces_through_the_kernel_without_graph_breaks(backend):
    backend("triton")
    q, k, v, table = make_inputs(2, 30, 2, 16, 3, 5)
    lengths = torch.tensor([30, 12], device=DEVICE)

    def attention(q, k, v, table, lengths):
        return rel_key_attention(q, k, v, table, 3, 5, 0.25, lengths) * 2

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    assert_fp32_close(compiled(q, k, v, table, lengths), 2 * reference_fp32(q, k, v, table, 3, 5, lengths))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q must have shape"),
        (lambda a: {**a, "k": a["k"][:, :-1]}, "k must have q's shape"),
        (lambda a: {**a, "v": a["v"].half()}, "v must have q's dtype"),
        (lambda a: {**a, "q": a["q"].long(), "k": a["k"].long(), "v": a["v"].long()}, "q must be a floating-point"),
        (lambda a: {**a, "distance_embedding": a["distance_embedding"][:-1]}, "distance_embedding must have shape"),
        (lambda a: {**a, "left": -1}, "left must be a non-negative int"),
        (lambda a: {**a, "lengths": torch.tensor([5])}, "lengths must be a"),
        (lambda a: {**a, "lengths": torch.tensor([5.0, 3.0])}, "lengths must be an integer tensor"),
        (lambda a: {**a, "lengths": torch.tensor([0, 3])}, "lengths must lie in"),
        (lambda a: {**a, "lengths": torch.tensor([12, 3])}, "lengths must lie in"),
    ],
    ids=["rank", "k-shape", "v-dtype", "integer-q", "table-rows", "negative-left", "lengths-shape",
         "float-lengths", "zero-length", "length-past-end"],
)
def test_bad_inputs_are_value_errors_naming_the_argument(backend, change, message):
    backend("triton")
    # on the CPU: that is where lengths' values are checked (on a GPU the check would sync every layer)
    q, k, v, table = (t.cpu() for t in make_inputs(2, 11, 2, 16, 3, 5))
    args = dict(q=q, k=k, v=v, distance_embedding=table, left=3, right=5, scale=0.25, lengths=torch.tensor([11, 4]))
    args = change(args)
    with pytest.raises(ValueError, match=message):
        rel_key_attention(**args)


@requires_cuda
def test_out_of_range_lengths_on_the_gpu_are_clamped_not_read_out_of_bounds(backend):
    backend("triton")
    q, k, v, table = make_inputs(2, 11, 2, 16, 3, 5)
    out = rel_key_attention(q, k, v, table, 3, 5, 0.25, torch.tensor([0, 500], device=DEVICE))
    assert torch.isfinite(out).all()
    assert_fp32_close(out[1], reference_fp32(q, k, v, table, 3, 5)[1])


# ------------------------------------------------------------------------------- in the model, vs transformers
def test_standalone_model_uses_the_kernel_and_matches_transformers(backend, monkeypatch):
    backend("triton")
    calls = []
    real = kernel_module._rel_key_attention_op
    monkeypatch.setattr(kernel_module, "_rel_key_attention_op", lambda *args: calls.append(1) or real(*args))
    hf = transformers_model(num_hidden_layers=2, left_max_position_embeddings=8, right_max_position_embeddings=2)
    ours = our_model_like(hf).to(MODEL_DEVICE)
    lengths = [45, 21, 1]
    features, mask = ragged_batch(lengths, hf.config.feature_projection_input_dim)
    with torch.no_grad():
        ref = hf(features, attention_mask=mask, output_hidden_states=True)
        out = ours(features.to(MODEL_DEVICE), attention_mask=mask.to(MODEL_DEVICE), output_hidden_states=True)
    assert len(calls) == 2, "the kernel should run once per layer"
    for o, r in zip(out.hidden_states, ref.hidden_states):
        assert max_diff_on_valid(o.cpu(), r, lengths) <= FP32_ATOL


def test_optimized_transformers_model_with_adapter_matches_through_the_kernel(backend):
    """The adapter reads a padded row, so the kernel computes padded query rows like transformers there."""
    backend("triton")
    hf = transformers_model(add_adapter=True, num_adapter_layers=1)
    reference = copy.deepcopy(hf)
    lengths = [23, 17, 6]
    features, mask = ragged_batch(lengths, hf.config.feature_projection_input_dim)
    w2vbert_fast.optimize(hf).to(MODEL_DEVICE)
    with torch.no_grad():
        ref = reference(features, attention_mask=mask).last_hidden_state
        out = hf(features.to(MODEL_DEVICE), attention_mask=mask.to(MODEL_DEVICE)).last_hidden_state.cpu()
    out_lengths = reference._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
    assert max_diff_on_valid(out, ref, out_lengths) <= FP32_ATOL


def test_one_layer_at_the_real_sizes_matches_transformers_through_the_kernel(backend):
    backend("triton")
    hf = transformers_model(
        hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=1,
        left_max_position_embeddings=64, right_max_position_embeddings=8, conv_depthwise_kernel_size=31,
        feature_projection_input_dim=160,
    )
    ours = our_model_like(hf).to(MODEL_DEVICE)
    lengths = [81, 40]
    features, mask = ragged_batch(lengths, 160)
    with torch.no_grad():
        ref = hf(features, attention_mask=mask).last_hidden_state
        out = ours(features.to(MODEL_DEVICE), attention_mask=mask.to(MODEL_DEVICE)).last_hidden_state.cpu()
    assert max_diff_on_valid(out, ref, lengths) <= FP32_ATOL


# ------------------------------------------------------------------------------------------------ memory
@requires_cuda
def test_peak_memory_grows_linearly_with_length(backend):
    """Nothing L×L: from L = 3,000 to 30,000 the extra memory grows 10×, not 100×."""
    backend("triton")
    peaks = {}
    for length in (3000, 30000):
        q, k, v, table = make_inputs(1, length, 16, 64, 64, 8, dtype=torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        rel_key_attention(q, k, v, table, 64, 8, 0.125)
        torch.cuda.synchronize()
        peaks[length] = torch.cuda.max_memory_allocated() - base
        del q, k, v, table
    output_bytes = 30000 * 16 * 64 * 2
    assert peaks[30000] <= 12 * peaks[3000] + (1 << 20), peaks
    assert peaks[30000] <= 2 * output_bytes, peaks
