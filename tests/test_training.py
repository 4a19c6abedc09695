"""Fine-tuning at model level: a CTC training step through optimize() and the standalone model equals
transformers' (loss and every gradient), under torch.compile and autocast too; gradient checkpointing saves as
much on a patched model as on transformers'; nothing of size L×L is saved for backward."""

import copy

import pytest
import torch
import transformers
from conftest import FP32_ATOL, HALF_ERROR_FLOOR, assert_fp32_close, assert_half_precision_close, requires_cuda
from model_helpers import DEVICE, max_diff_on_valid, our_model_like, ragged_batch, transformers_model

import w2vbert_fast

LENGTHS = [37, 29, 12]  # ragged, odd, one short sequence
VOCAB = 13
# Training mode with nothing random in it, so two models can be compared step for step. SpecAugment
# (mask_time_prob) is transformers' Model.forward, which a patched model keeps; the standalone model has none.
# The mean CTC loss (transformers' fine-tuning recipe) keeps gradients O(1), where FP32_ATOL is an fp32 bound.
DETERMINISTIC = dict(vocab_size=VOCAB, layerdrop=0.0, final_dropout=0.0, conformer_conv_dropout=0.0, mask_time_prob=0.0,
                     ctc_loss_reduction="mean")
ADAPTER = dict(add_adapter=True, num_adapter_layers=1)
# transformers 5.2x names it activation_checkpointing_enable; gradient_checkpointing_enable is its alias there
CHECKPOINT_APIS = [name for name in ("gradient_checkpointing_enable", "activation_checkpointing_enable")
                   if hasattr(transformers.PreTrainedModel, name)]
pytestmark = pytest.mark.filterwarnings("ignore:`gradient_checkpointing_(en|dis)able` is deprecated:FutureWarning")


def ctc_model(**overrides):
    return transformers_model("Wav2Vec2BertForCTC", **{**DETERMINISTIC, **overrides}).train()


def ctc_batch(config, lengths=LENGTHS, seed=0):
    """Features, a right-padded mask, and labels padded with -100 (what transformers' CTC recipes' collators
    write; labels padded with the blank read differently in transformers before 5.2x)."""
    features, mask = ragged_batch(lengths, config.feature_projection_input_dim, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(1, VOCAB, (len(lengths), 5), generator=generator)
    labels[0, 4:] = -100
    labels[-1, 3:] = -100
    return features, mask, labels


def train_step(model, features, mask, labels, device="cpu", autocast=None):
    """One forward (under autocast to ``autocast``, when given) + backward (outside it, as PyTorch recommends) on
    ``device``: the loss and every parameter's gradient, on the CPU."""
    model.to(device).zero_grad(set_to_none=True)
    with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        loss = model(features.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
    loss.backward()
    grads = {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), grads


def assert_step_matches(ours, reference):
    (loss, grads), (ref_loss, ref_grads) = ours, reference
    assert_fp32_close(loss, ref_loss)
    assert set(grads) == set(ref_grads), "a parameter got no gradient on one side only"
    for name, grad in ref_grads.items():
        try:
            assert_fp32_close(grads[name], grad)
        except AssertionError as error:
            raise AssertionError(f"gradient of {name}: {error}") from None


class SavedForBackward:
    """Counts what autograd saves for backward in the forward pass (a non-reentrant checkpoint's region keeps its
    own, uncounted; a reentrant one's recompute runs in the backward pass, outside the count)."""

    def __init__(self):
        self.elements, self.largest = 0, 0

    def _pack(self, tensor):
        self.elements += tensor.numel()
        self.largest = max(self.largest, tensor.numel())
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def saved_in_step(model, features, mask, labels, device="cpu"):
    model.to(device).zero_grad(set_to_none=True)
    with SavedForBackward() as saved:
        loss = model(features.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
    loss.backward()
    return saved


# ------------------------------------------------------------------------------------ CTC step equal to transformers
@pytest.mark.parametrize("adapter", [False, True], ids=["encoder", "adapter"])
@pytest.mark.parametrize("backend_name", ["torch", "auto", "triton"])
def test_ctc_step_of_optimized_model_matches_transformers(backend, backend_name, adapter):
    backend(backend_name)
    hf = ctc_model(**(ADAPTER if adapter else {}))
    patched = w2vbert_fast.optimize(copy.deepcopy(hf))
    batch = ctc_batch(hf.config)
    assert_step_matches(train_step(patched, *batch, device=DEVICE), train_step(hf, *batch))


@pytest.mark.parametrize("adapter", [False, True], ids=["encoder", "adapter"])
def test_ctc_step_of_standalone_model_matches_transformers(backend, adapter):
    backend("triton")
    hf = ctc_model(**(ADAPTER if adapter else {}))
    ours = our_model_like(hf).train()
    batch = ctc_batch(hf.config)
    assert_step_matches(train_step(ours, *batch, device=DEVICE), train_step(hf, *batch))


def test_standalone_ctc_loss_ignores_labels_padded_with_the_blank():
    # as transformers' ForCTCLoss (5.2x): a CTC target never holds the blank, so it reads as padding, like -100
    ours = our_model_like(ctc_model()).train()
    features, mask, labels = ctc_batch(ours.config)
    blank_padded = labels.masked_fill(labels == -100, ours.config.pad_token_id)
    assert_fp32_close(ours(features, attention_mask=mask, labels=blank_padded).loss,
                      ours(features, attention_mask=mask, labels=labels).loss)


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_ctc_step_matches_transformers_under_torch_compile(backend, backend_name):
    # aot_eager traces forward and backward through the ops' autograd registrations as inductor would, without
    # inductor's C++ code generation, which takes minutes on a 2-core CI machine
    backend(backend_name)
    hf = ctc_model(num_hidden_layers=1)
    patched = w2vbert_fast.optimize(copy.deepcopy(hf)).to(DEVICE)
    compiled = torch.compile(patched, backend="aot_eager")
    batch = ctc_batch(hf.config)
    reference = train_step(hf, *batch)
    step = train_step(compiled, *batch, device=DEVICE)
    assert_step_matches((step[0], {k.removeprefix("_orig_mod."): g for k, g in step[1].items()}), reference)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_standalone_ctc_step_compiles_in_one_graph(backend, checkpointing):
    # checkpointed: dynamo traces torch.utils.checkpoint with the Padding dataclass among its arguments
    backend("triton")
    hf = ctc_model(num_hidden_layers=1)
    ours = our_model_like(hf).train().to(DEVICE)
    if checkpointing:
        ours.gradient_checkpointing_enable()
    features, mask, labels = ctc_batch(hf.config)
    compiled = torch.compile(ours.wav2vec2_bert, backend="aot_eager", fullgraph=True)
    hidden = compiled(features.to(DEVICE), attention_mask=mask.to(DEVICE)).last_hidden_state
    logits = ours.lm_head(hidden)
    loss = w2vbert_fast.modeling.ctc_loss(logits, labels.to(DEVICE), mask.sum(-1).to(DEVICE), ours.config)
    loss.backward()
    reference = train_step(hf, features, mask, labels)
    grads = {name: p.grad.cpu() for name, p in ours.named_parameters() if p.grad is not None}
    assert_step_matches((loss.detach().cpu(), grads), reference)


# ------------------------------------------------------------------------------------------------------ autocast
def assert_gradient_within_half_precision(name, ours, torch_lowp, reference):
    """``assert_half_precision_close`` per parameter gradient, except linear_k.bias: softmax is invariant to the
    per-row constant q·b_k it adds, so its exact gradient is 0 (fp32 gives ~1e-8) and any relative error to it is
    noise over noise. Its error is judged instead against the gradient of its sibling linear_q.bias, the scale of
    that layer's attention gradients: within the half-precision floor of it."""
    if name.endswith("self_attn.linear_k.bias"):
        scale = reference[name.replace("linear_k.bias", "linear_q.bias")].norm()
        error = (ours.double() - reference[name].double()).norm()
        assert torch.isfinite(ours).all() and error <= HALF_ERROR_FLOOR[torch.bfloat16] * scale, (
            f"|error| {error:.3e} > {HALF_ERROR_FLOOR[torch.bfloat16]:.1e} × |grad linear_q.bias| {scale:.3e}")
        return
    assert_half_precision_close(ours.bfloat16(), torch_lowp.bfloat16(), reference[name])


AUTOCAST_CASES = [
    pytest.param("cpu", "auto", id="cpu-auto"),
    pytest.param("cpu", "torch", id="cpu-torch"),
    # the interpreter's bf16 tl.dot is wrong, so the kernels' bf16 step is checked on a GPU only
    pytest.param("cuda", "triton", id="cuda-triton", marks=requires_cuda),
]


@pytest.mark.parametrize("device, backend_name", AUTOCAST_CASES)
def test_bf16_autocast_step_is_within_half_precision_error_of_fp32(backend, device, backend_name):
    backend(backend_name)
    hf = ctc_model()
    patched = w2vbert_fast.optimize(copy.deepcopy(hf))
    batch = ctc_batch(hf.config)
    reference = train_step(copy.deepcopy(hf), *batch, device=device)
    torch_lowp = train_step(copy.deepcopy(hf), *batch, device=device, autocast=torch.bfloat16)
    ours = train_step(patched, *batch, device=device, autocast=torch.bfloat16)
    assert_half_precision_close(ours[0][None].bfloat16(), torch_lowp[0][None].bfloat16(), reference[0][None])
    assert set(ours[1]) == set(reference[1])
    for name, grad in reference[1].items():
        try:
            assert_gradient_within_half_precision(name, ours[1][name], torch_lowp[1][name], reference[1])
        except AssertionError as error:
            raise AssertionError(f"gradient of {name}: {error}") from None


@pytest.mark.parametrize("device, backend_name", [
    pytest.param("cpu", "torch", id="cpu-torch"),
    pytest.param("cpu", "auto", id="cpu-auto"),
    pytest.param("cuda", "triton", id="cuda-triton", marks=requires_cuda),  # bf16 kernels: GPU only (see above)
])
def test_backward_inside_the_autocast_region_is_within_half_precision_error(backend, device, backend_name):
    # not what PyTorch recommends, but common in hand-written loops: autograd then runs the backward under autocast
    backend(backend_name)
    hf = ctc_model()
    patched = w2vbert_fast.optimize(copy.deepcopy(hf)).to(device)
    features, mask, labels = ctc_batch(hf.config)
    reference = train_step(copy.deepcopy(hf), features, mask, labels, device=device)
    torch_lowp = train_step(copy.deepcopy(hf), features, mask, labels, device=device, autocast=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = patched(features.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
    assert_half_precision_close(loss.detach().cpu()[None].bfloat16(), torch_lowp[0][None].bfloat16(),
                                reference[0][None])
    for name, param in patched.named_parameters():
        assert_gradient_within_half_precision(name, param.grad.cpu(), torch_lowp[1][name], reference[1])


# ------------------------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.parametrize("when", ["before-optimize", "after-optimize"])
@pytest.mark.parametrize("api", CHECKPOINT_APIS)
def test_checkpointing_saves_as_much_on_an_optimized_model_as_on_transformers(backend, api, when):
    backend("auto")
    hf = ctc_model()
    batch = ctc_batch(hf.config)
    reference = train_step(hf, *batch)
    without = saved_in_step(hf, *batch).elements
    getattr(hf, api)()
    with_checkpointing = saved_in_step(hf, *batch).elements
    assert with_checkpointing < without / 4  # the layers' activations are what a step saves

    patched = copy.deepcopy(ctc_model())
    if when == "before-optimize":
        getattr(patched, api)()
    w2vbert_fast.optimize(patched)
    if when == "after-optimize":
        getattr(patched, api)()
    assert saved_in_step(patched, *batch).elements <= with_checkpointing
    assert_step_matches(train_step(patched, *batch), reference)  # the recompute changes nothing


def test_checkpointing_recomputes_through_the_kernels(backend):
    # the recompute in the backward pass replays the ops' forward (and their registered backward) exactly
    backend("triton")
    hf = ctc_model(num_hidden_layers=1)
    batch = ctc_batch(hf.config)
    reference = train_step(hf, *batch)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    saved_by_transformers = saved_in_step(hf, *batch).elements
    patched = w2vbert_fast.optimize(copy.deepcopy(hf)).to(DEVICE)
    assert saved_in_step(patched, *batch, device=DEVICE).elements <= saved_by_transformers
    assert_step_matches(train_step(patched, *batch, device=DEVICE), reference)


def test_checkpointing_disabled_again_saves_the_activations_again(backend):
    backend("auto")
    patched = w2vbert_fast.optimize(ctc_model())
    batch = ctc_batch(patched.config)
    without = saved_in_step(patched, *batch).elements
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert saved_in_step(patched, *batch).elements < without / 4
    patched.gradient_checkpointing_disable()
    assert saved_in_step(patched, *batch).elements == without


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("api", ["gradient_checkpointing_enable", "activation_checkpointing_enable"])
def test_standalone_checkpointing_saves_as_much_as_transformers(backend, api, use_reentrant):
    # the Padding dataclass (mask and lengths tensors) is an argument of every checkpointed layer
    backend("auto")
    hf = ctc_model()
    ours = our_model_like(hf).train()
    batch = ctc_batch(hf.config)
    reference = train_step(hf, *batch)
    without = saved_in_step(ours, *batch).elements
    kwargs = {"use_reentrant": use_reentrant}
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    getattr(ours, api)(kwargs)
    assert ours.is_gradient_checkpointing
    saved = saved_in_step(ours, *batch).elements
    assert saved < without / 4
    assert saved <= saved_in_step(hf, *batch).elements
    assert_step_matches(train_step(ours, *batch), reference)


def test_checkpointing_every_second_layer_saves_the_others(backend):
    backend("auto")
    ours = our_model_like(ctc_model(num_hidden_layers=2)).train()
    batch = ctc_batch(ours.config)
    without = saved_in_step(ours, *batch).elements
    ours.gradient_checkpointing_enable()
    every_layer = saved_in_step(ours, *batch).elements
    ours.gradient_checkpointing_enable(every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in ours.wav2vec2_bert.encoder.layers] == [True, False]
    assert every_layer < saved_in_step(ours, *batch).elements < without


@pytest.mark.parametrize("every_n_layers", [0, -1, 1.5, True])
def test_checkpointing_rejects_a_bad_layer_interval(every_n_layers):
    ours = our_model_like(ctc_model())
    with pytest.raises(ValueError, match="every_n_layers"):
        ours.gradient_checkpointing_enable(every_n_layers=every_n_layers)


def test_checkpointing_keeps_hidden_states_and_stays_off_in_eval(backend):
    backend("auto")
    hf = ctc_model()
    features, mask, labels = ctc_batch(hf.config)
    patched = w2vbert_fast.optimize(copy.deepcopy(hf))
    patched.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    out = patched(features, attention_mask=mask, labels=labels, output_hidden_states=True)
    ref = hf(features, attention_mask=mask, labels=labels, output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours_h, ref_h in zip(out.hidden_states, ref.hidden_states):  # padded positions are unspecified
        assert max_diff_on_valid(ours_h, ref_h, LENGTHS) <= FP32_ATOL
    patched.eval()  # transformers' rule: checkpointing is for training mode only
    in_eval = saved_in_step(patched, features, mask, labels).elements
    patched.gradient_checkpointing_disable()
    assert saved_in_step(patched, features, mask, labels).elements == in_eval


# ------------------------------------------------------------------------------------------------ O(L) memory
# Narrow, so that L² outgrows every (B, L, channels) activation at a length the interpreter runs in seconds:
# L² = 22,500 against at most B·L·2·hidden = 19,200 (the conv module's GLU input).
NARROW = dict(hidden_size=32, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1)
L2_LENGTHS = [150, 101]


@pytest.mark.parametrize("backend_name", ["triton", "auto"])
def test_training_step_saves_no_tensor_of_length_squared(backend, backend_name):
    backend(backend_name)
    patched = w2vbert_fast.optimize(ctc_model(**NARROW))
    saved = saved_in_step(patched, *ctc_batch(patched.config, L2_LENGTHS), device=DEVICE)
    length = max(L2_LENGTHS)
    assert saved.largest < length * length, \
        f"a tensor of {saved.largest:,} elements (L² = {length * length:,}) was saved for backward"


def autograd_node_names(tensor) -> set:
    names, seen, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_training_step_differentiates_through_both_kernels(backend):
    # under the triton backend the gradients come from the ops' registered backward, not from autograd through the
    # PyTorch references (whose graph would hold matmul/softmax/conv nodes in their place)
    backend("triton")
    patched = w2vbert_fast.optimize(ctc_model(num_hidden_layers=1)).to(DEVICE)
    features, mask, labels = ctc_batch(patched.config)
    loss = patched(features.to(DEVICE), attention_mask=mask.to(DEVICE), labels=labels.to(DEVICE)).loss
    names = " ".join(autograd_node_names(loss))
    for op in ("w2vbert_fast_rel_key_attention", "w2vbert_fast_glu_depthwise_conv"):
        assert op in names, f"no backward node of the {op} op in the training step's autograd graph"
