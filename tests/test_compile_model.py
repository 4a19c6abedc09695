"""torch.compile and CUDA graphs as tested features: the masked forward has no host sync and no data-dependent
branch, so it traces in one graph (``fullgraph=True``) and replays from a CUDA graph.

On the CPU (CI) inductor compiles the tiny model's product path (the ``auto`` backend) and the traced graph runs
through the kernels' custom ops under the ``triton`` backend (interpreted); on a GPU, ``mode="reduce-overhead"``
and a manual ``torch.cuda.graphs`` capture replay the standalone model for a fixed shape.
"""

import copy

import pytest
import torch
import torch._dynamo.testing
from conftest import FP32_ATOL, requires_cuda
from model_helpers import (DEVICE, capture_masked_forward, max_diff_on_valid, our_model_like, ragged_batch,
                           transformers_model)

import w2vbert_fast

LENGTHS = [19, 11, 6]  # ragged: padding in two rows, one row full


def models(kind):
    """(model to compile, transformers eager oracle): the standalone model or a patched transformers model."""
    hf = transformers_model(num_hidden_layers=1)
    if kind == "standalone":
        return our_model_like(hf), hf
    return w2vbert_fast.optimize(copy.deepcopy(hf)), hf


def inputs(hf, masked, device="cpu"):
    features, mask = ragged_batch(LENGTHS if masked else [19, 19, 19], hf.config.feature_projection_input_dim)
    return features.to(device), (mask.to(device) if masked else None)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "no-mask"])
@pytest.mark.parametrize("kind", ["standalone", "patched"])
def test_inductor_fullgraph_equals_eager_and_transformers(backend, kind, masked):
    backend("auto")
    model, hf = models(kind)
    features, mask = inputs(hf, masked)
    compiled = torch.compile(model, backend="inductor", fullgraph=True, dynamic=False)
    with torch.no_grad():
        eager = model(features, attention_mask=mask).last_hidden_state
        out = compiled(features, attention_mask=mask).last_hidden_state
        ref = hf(features, attention_mask=mask).last_hidden_state
    lengths = LENGTHS if masked else [19, 19, 19]
    assert max_diff_on_valid(out, eager, lengths) <= FP32_ATOL
    assert max_diff_on_valid(out, ref, lengths) <= FP32_ATOL
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("kind", ["standalone", "patched"])
def test_masked_forward_traces_through_the_kernels_custom_ops_in_one_graph(backend, kind):
    """Under the triton backend the ops are custom ops: the masked forward traces through both in one graph,
    with the mask's lengths as a tensor input (no sync, no guard on values), and runs the kernels."""
    backend("triton")
    model, hf = models(kind)
    model.to(DEVICE)
    features, mask = inputs(hf, True)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = compiled(features.to(DEVICE), attention_mask=mask.to(DEVICE)).last_hidden_state.cpu()
        ref = hf(features, attention_mask=mask).last_hidden_state
    assert max_diff_on_valid(out, ref, LENGTHS) <= FP32_ATOL


@pytest.mark.parametrize("kind", ["standalone", "patched"])
def test_adapter_model_with_a_mask_traces_in_one_graph(backend, kind):
    """The adapter builds its Padding from sub-sampled lengths on the device too."""
    backend("auto")
    hf = transformers_model(num_hidden_layers=1, add_adapter=True, num_adapter_layers=2)
    model = our_model_like(hf) if kind == "standalone" else w2vbert_fast.optimize(copy.deepcopy(hf))
    features, mask = inputs(hf, True)
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
    with torch.no_grad():
        out = compiled(features, attention_mask=mask).last_hidden_state
        ref = hf(features, attention_mask=mask).last_hidden_state
    out_lengths = hf._get_feat_extract_output_lengths(torch.tensor(LENGTHS)).tolist()
    assert max_diff_on_valid(out, ref, out_lengths) <= FP32_ATOL


def test_a_new_mask_of_the_same_shape_reuses_the_compiled_graph(backend):
    """The mask's values are data, not guards: other lengths at the same shape do not recompile."""
    backend("auto")
    model, hf = models("standalone")
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    features, mask = inputs(hf, True)
    other = torch.zeros_like(mask)
    other[:, :7] = 1
    with torch.no_grad():
        compiled(features, attention_mask=mask)
        out = compiled(features, attention_mask=other).last_hidden_state
        ref = hf(features, attention_mask=other).last_hidden_state
    assert counter.frame_count == 1
    assert max_diff_on_valid(out, ref, [7, 7, 7]) <= FP32_ATOL


def test_value_checks_are_off_while_compiling_and_follow_the_validate_flag_eagerly(monkeypatch):
    from w2vbert_fast.ops._backend import checks_values

    def checked(x):
        return x + (1 if checks_values(x) else 0)

    x = torch.zeros(2)
    compiled = torch.compile(checked, backend="eager", fullgraph=True)
    assert checked(x).tolist() == [1, 1]  # auto on a CPU tensor: free, so on
    assert compiled(x).tolist() == [0, 0]  # compiling: a data-dependent read would break the graph
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "0")
    assert checked(x).tolist() == [0, 0]
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "1")
    torch._dynamo.reset()
    assert checked(x).tolist() == [1, 1] and compiled(x).tolist() == [0, 0]


# ----------------------------------------------------------------------------------------------- GPU only
def gpu_model_and_batch():
    model, hf = models("standalone")
    features, mask = inputs(hf, True)
    with torch.no_grad():
        ref = hf(features, attention_mask=mask).last_hidden_state
    return model.cuda(), features.cuda(), mask.cuda(), ref


@requires_cuda
def test_masked_forward_makes_no_host_sync_on_the_gpu(backend):
    backend("auto")
    model, features, mask, ref = gpu_model_and_batch()
    with torch.no_grad():
        model(features, attention_mask=mask)  # first call: autotuning and compilation may sync
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(features, attention_mask=mask).last_hidden_state
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert max_diff_on_valid(out.cpu(), ref, LENGTHS) <= FP32_ATOL


@requires_cuda
def test_manual_cuda_graph_capture_of_the_masked_forward_replays_new_inputs(backend):
    backend("auto")
    model, features, mask, ref = gpu_model_and_batch()
    static_features, static_mask = torch.zeros_like(features), torch.ones_like(mask)
    with torch.no_grad():
        graph, static_out = capture_masked_forward(model, static_features, static_mask)
        static_features.copy_(features)
        static_mask.copy_(mask)
        graph.replay()
        torch.cuda.synchronize()
    assert max_diff_on_valid(static_out.cpu(), ref, LENGTHS) <= FP32_ATOL


@requires_cuda
def test_reduce_overhead_compile_replays_correctly_for_a_fixed_shape(backend):
    backend("auto")
    model, features, mask, ref = gpu_model_and_batch()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True, dynamic=False)
    other = torch.zeros_like(mask)
    other[:, :7] = 1
    with torch.no_grad():
        for _ in range(3):  # warm-up, record, replay
            out = compiled(features, attention_mask=mask).last_hidden_state.clone()
        replayed = compiled(features, attention_mask=other).last_hidden_state.clone()  # another mask, same graph
        ref_other = model.cpu()(features.cpu(), attention_mask=other.cpu()).last_hidden_state
    assert max_diff_on_valid(out.cpu(), ref, LENGTHS) <= FP32_ATOL
    assert max_diff_on_valid(replayed.cpu(), ref_other, [7, 7, 7]) <= FP32_ATOL
