"""Any attention_mask transformers accepts — right padding, left padding, holes, a mix — gives transformers' result
at every real frame: the standalone model and every patched head, with and without the adapter, forward and
gradients, on the ``auto`` (banded CPU path), ``torch`` (reference) and ``triton`` (the kernels, interpreted on the
CPU) backends, and compiled in one graph.

"Real frames" are where transformers' own heads read: a row's frames marked 1 for the encoder's output; the first
``count`` frames (count = the row's number of ones, as transformers' length arithmetic takes it) for what comes after
the adapter and for the CTC loss — under left padding those include masked frames, which is why masked rows before
a row's last real frame are computed as transformers computes them, not zeroed.
"""

import copy

import pytest
import torch
import torch._dynamo.testing
from conftest import FP32_ATOL, requires_cuda
from model_helpers import DEVICE, capture_masked_forward, our_model_like, transformers_model

import w2vbert_fast

LENGTH = 21
FEATURES = 20  # model_helpers.TINY's feature_projection_input_dim


def mask_of(form, length=LENGTH):
    """(3, length) long 0/1 masks; every form keeps one row all real, as transformers' own tests do."""
    frames = torch.arange(length)
    full = torch.ones(length, dtype=torch.bool)
    rows = {
        "right": [full, frames < 13, frames < 4],
        "left": [full, frames >= 8, frames >= 17],
        "holes": [full, (frames < 4) | (frames >= 9), frames % 3 != 1],
        "mixed": [(frames >= 3) & (frames < 15), full, (frames >= 6) & (frames % 4 != 0)],
    }[form]
    return torch.stack(rows).long()


FORMS = ["right", "left", "holes", "mixed"]


def features_for(mask, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(mask.shape[0], mask.shape[1], FEATURES, generator=generator)


def max_diff_at(a, b, where):
    """max |a - b| over the (B, T) frames ``where`` marks."""
    return (a.double() - b.double()).abs()[where.bool()].max().item()


def first_count(mask, length=None):
    """(B, length) bool: each row's first ``count`` frames, count = its number of ones."""
    length = mask.shape[1] if length is None else length
    return torch.arange(length)[None, :] < mask.sum(1, keepdim=True)


def run_ours(model, features, mask, **kwargs):
    model = model.to(DEVICE)
    return model(features.to(DEVICE), attention_mask=mask.to(DEVICE), **kwargs)


# --------------------------------------------------------------------------------------------- the encoder
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("backend_name", ["auto", "torch", "triton"])
def test_every_mask_form_matches_transformers_at_real_frames(backend, backend_name, form):
    backend(backend_name)
    hf = transformers_model()
    mask = mask_of(form)
    features = features_for(mask)
    with torch.no_grad():
        ref = hf(features, attention_mask=mask, output_hidden_states=True)
        out = run_ours(our_model_like(hf), features, mask, output_hidden_states=True)
    assert torch.isfinite(out.last_hidden_state).all()
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert max_diff_at(ours.cpu(), theirs, mask) <= FP32_ATOL
    # masked frames before a row's last real one are computed as transformers computes them (its heads read them)
    extent = torch.arange(LENGTH)[None, :] < (mask * torch.arange(1, LENGTH + 1)).amax(1, keepdim=True)
    assert max_diff_at(out.last_hidden_state.cpu(), ref.last_hidden_state, extent) <= FP32_ATOL


@pytest.mark.parametrize("form", ["left", "holes"])
@pytest.mark.parametrize("backend_name", ["auto", "torch", "triton"])
def test_gradients_with_left_padding_and_holes_match_transformers(backend, backend_name, form):
    """Every parameter's gradient of a loss over the real frames (the kernels' backward with a key and frame mask)."""
    backend(backend_name)
    hf = transformers_model(mask_time_prob=0.0)  # no SpecAugment: training mode without randomness
    ours = our_model_like(hf).to(DEVICE).train()
    hf.train()
    for module in (hf, ours):  # dropout off, training mode on (the backward paths)
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    hf.config.layerdrop = ours.config.layerdrop = 0.0
    mask = mask_of(form)
    features = features_for(mask)
    weight = torch.randn(LENGTH, hf.config.hidden_size, generator=torch.Generator().manual_seed(3))
    real = mask.bool()[..., None]
    (hf(features, attention_mask=mask).last_hidden_state * weight * real).sum().backward()
    out = run_ours(ours, features, mask).last_hidden_state
    (out * weight.to(DEVICE) * real.to(DEVICE)).sum().backward()
    theirs = dict(hf.named_parameters())
    # (some gradients are 0 in exact arithmetic, the keys' bias for one: a tolerance relative to the largest one)
    scale = max(p.grad.abs().max().item() for p in theirs.values() if p.grad is not None)
    for name, param in ours.named_parameters():
        expected = theirs[name].grad if theirs[name].grad is not None else torch.zeros_like(param, device="cpu")
        got = param.grad.cpu() if param.grad is not None else torch.zeros_like(expected)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------- heads
HEADS = {
    "Wav2Vec2BertForCTC": dict(vocab_size=13),
    "Wav2Vec2BertForSequenceClassification": dict(num_labels=4),
    "Wav2Vec2BertForAudioFrameClassification": dict(num_labels=3),
    "Wav2Vec2BertForXVector": dict(num_labels=5, tdnn_dim=(16, 16, 24), tdnn_kernel=(3, 1, 1), tdnn_dilation=(1, 2, 1),
                                   xvector_output_dim=12),
}


@pytest.mark.parametrize("form", ["left", "mixed"])
@pytest.mark.parametrize("cls_name", list(HEADS))
def test_every_patched_head_matches_transformers_with_any_mask(backend, cls_name, form):
    """Pooled heads (sequence classification, x-vector) and the CTC loss read frames that are masked under left
    padding: they must match too."""
    backend("auto")
    hf = transformers_model(cls_name, **HEADS[cls_name])
    reference = copy.deepcopy(hf)
    w2vbert_fast.optimize(hf)
    mask = mask_of(form)
    features = features_for(mask)
    kwargs = {}
    if cls_name.endswith("ForCTC"):
        kwargs["labels"] = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100], [7, 8, 9, -100]])
    elif cls_name.endswith(("SequenceClassification", "XVector")):
        kwargs["labels"] = torch.tensor([0, 1, 3])
    with torch.no_grad():
        ref = reference(features, attention_mask=mask, **kwargs)
        out = hf(features, attention_mask=mask, **kwargs)
    if cls_name.endswith("AudioFrameClassification"):
        assert max_diff_at(out.logits, ref.logits, mask) <= FP32_ATOL
    elif cls_name.endswith("ForCTC"):
        assert max_diff_at(out.logits, ref.logits, first_count(mask)) <= FP32_ATOL
    else:
        assert (out.logits - ref.logits).abs().max().item() <= FP32_ATOL
    if "labels" in kwargs:
        assert abs(out.loss.item() - ref.loss.item()) <= 1e-4 * max(1.0, abs(ref.loss.item()))
    if cls_name.endswith("XVector"):
        assert (out.embeddings - ref.embeddings).abs().max().item() <= FP32_ATOL


@pytest.mark.parametrize("form", ["left", "holes"])
@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_standalone_ctc_loss_with_left_padding_matches_transformers(backend, backend_name, form):
    backend(backend_name)
    hf = transformers_model("Wav2Vec2BertForCTC", vocab_size=13)
    mask = mask_of(form)
    features = features_for(mask)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100], [7, 8, 9, -100]])
    with torch.no_grad():
        ref = hf(features, attention_mask=mask, labels=labels)
        out = run_ours(our_model_like(hf), features, mask, labels=labels.to(DEVICE))
    assert max_diff_at(out.logits.cpu(), ref.logits, first_count(mask)) <= FP32_ATOL
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-4 * max(1.0, abs(ref.loss.item()))


@pytest.mark.parametrize("form", ["left", "holes"])
@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_the_adapter_follows_transformers_with_any_mask(backend, backend_name, form):
    """The adapter subsamples transformers' way (lengths from the count of ones, right-padded after it): its output
    matches at each row's first sub-sampled count of frames."""
    backend(backend_name)
    hf = transformers_model(add_adapter=True, num_adapter_layers=2)
    mask = mask_of(form)
    features = features_for(mask)
    with torch.no_grad():
        ref = hf(features, attention_mask=mask).last_hidden_state
        out = run_ours(our_model_like(hf), features, mask).last_hidden_state.cpu()
    counts = hf._get_feat_extract_output_lengths(mask.sum(1))
    where = torch.arange(ref.shape[1])[None, :] < counts[:, None]
    assert out.shape == ref.shape
    assert max_diff_at(out, ref, where) <= FP32_ATOL


# ------------------------------------------------------------------------------------------ the checks left
@pytest.mark.parametrize("validate", ["auto", "1"], ids=["default-on-cpu", "validate-flag"])
def test_masks_with_values_other_than_0_and_1_or_an_empty_row_are_still_errors(monkeypatch, validate):
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", validate)
    ours = our_model_like(transformers_model())
    mask = mask_of("left")
    features = features_for(mask)
    two = mask.clone()
    two[0, 0] = 2
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 and 1.*row\(s\) \[0\]"):
        ours(features, attention_mask=two)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"no real frame in batch row\(s\) \[2\]"):
        ours(features, attention_mask=empty)


def test_a_left_padded_mask_is_reduced_on_the_device_without_reading_it(monkeypatch):
    """With checks off, building Padding from any mask never reads it on the host (a sync on a GPU)."""
    monkeypatch.setenv("W2VBERT_FAST_VALIDATE", "0")
    mask = mask_of("mixed")
    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, name=name, **k: pytest.fail(f"host read: Tensor.{name}"))
    padding = w2vbert_fast.modeling.Padding.from_attention_mask(mask, LENGTH, 3)
    monkeypatch.undo()
    assert padding.lengths.dtype == torch.int32
    assert padding.lengths.tolist() == [15, 21, 20]  # one past each row's last real frame
    assert torch.equal(padding.frame_mask, mask.bool()) and torch.equal(padding.mask, mask.bool())


# ------------------------------------------------------------------------------------------------ compiled
@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("kind", ["standalone", "patched"])
def test_a_left_padded_forward_compiles_in_one_graph_and_matches(backend, fresh_dynamo, kind):
    backend("auto")
    hf = transformers_model(num_hidden_layers=1)
    model = our_model_like(hf) if kind == "standalone" else w2vbert_fast.optimize(copy.deepcopy(hf))
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for form in ("left", "holes", "right"):  # other mask forms, same shape: no recompile
            mask = mask_of(form)
            features = features_for(mask)
            out = compiled(features, attention_mask=mask).last_hidden_state
            assert max_diff_at(out, hf(features, attention_mask=mask).last_hidden_state, mask) <= FP32_ATOL
    assert counter.frame_count == 1


def test_a_holed_mask_traces_through_the_kernels_custom_ops_forward_and_backward(backend, fresh_dynamo):
    backend("triton")
    hf = transformers_model(num_hidden_layers=1)
    model = our_model_like(hf).to(DEVICE)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)
    mask = mask_of("holes")
    features = features_for(mask).to(DEVICE).requires_grad_(True)
    out = compiled(features, attention_mask=mask.to(DEVICE)).last_hidden_state
    (out * mask.to(DEVICE)[..., None]).sum().backward()
    reference_features = features.detach().cpu().requires_grad_(True)
    ref = hf(reference_features, attention_mask=mask).last_hidden_state
    (ref * mask[..., None]).sum().backward()
    assert max_diff_at(out.detach().cpu(), ref.detach(), mask) <= FP32_ATOL
    assert (features.grad.cpu() - reference_features.grad).abs().max().item() <= 1e-4


@requires_cuda
def test_a_cuda_graph_of_the_masked_forward_replays_every_mask_form(backend):
    backend("auto")
    hf = transformers_model(num_hidden_layers=1)
    model = our_model_like(hf).cuda()
    static_mask = torch.ones(3, LENGTH, dtype=torch.long, device="cuda")
    static_features = torch.zeros(3, LENGTH, FEATURES, device="cuda")
    with torch.no_grad():
        graph, static_out = capture_masked_forward(model, static_features, static_mask)
        for form in FORMS:
            mask = mask_of(form)
            features = features_for(mask)
            static_features.copy_(features)
            static_mask.copy_(mask)
            graph.replay()
            torch.cuda.synchronize()
            ref = hf(features, attention_mask=mask).last_hidden_state
            assert max_diff_at(static_out.cpu(), ref, mask) <= FP32_ATOL
