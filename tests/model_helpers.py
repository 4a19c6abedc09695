"""Tiny configurations and paired (transformers, ours) models for the parity tests."""

import torch

import w2vbert_fast

# Where the Triton backend runs the real kernels: the GPU when there is one, else the CPU under the interpreter.
# transformers, the oracle, stays on the CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Odd sizes on purpose: hidden 48 over 3 heads (head 16), kernel 5, feature dim 20 (the real one is 160).
TINY = dict(
    hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=40, feature_projection_input_dim=20,
    conv_depthwise_kernel_size=5, left_max_position_embeddings=6, right_max_position_embeddings=3,
)


def tiny_config(**overrides) -> dict:
    values = dict(TINY)
    values.update(overrides)
    return values


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter non-trivial values (LayerNorm weights away from 1, biases away from 0, position
    biases away from their zero init), so a parity test cannot pass by a term being zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("layer_norm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif param.dim() <= 1 or "pos_bias" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            else:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
    return model


def transformers_model(cls_name: str = "Wav2Vec2BertModel", seed: int = 0, **overrides):
    import transformers

    config = transformers.Wav2Vec2BertConfig(**tiny_config(**overrides))
    torch.manual_seed(seed)
    return randomize_(getattr(transformers, cls_name)(config), seed).eval()


def our_model_like(hf_model):
    config = w2vbert_fast.Wav2Vec2BertConfig.from_dict(hf_model.config.to_dict())
    cls = w2vbert_fast.Wav2Vec2BertForCTC if type(hf_model).__name__.endswith("ForCTC") else w2vbert_fast.Wav2Vec2BertModel
    ours = cls(config).eval()
    ours.load_state_dict(hf_model.state_dict(), strict=True)
    return ours


def ragged_batch(lengths, feature_dim, seed=0, dtype=torch.float32):
    """Features (B, max(lengths), feature_dim) and a right-padded 0/1 attention mask (B, max(lengths))."""
    generator = torch.Generator().manual_seed(seed)
    total = max(lengths)
    features = torch.randn(len(lengths), total, feature_dim, generator=generator, dtype=dtype)
    mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return features, mask


def capture_masked_forward(model, static_features, static_mask):
    """(graph, static last_hidden_state) of ``model``'s masked forward captured into a CUDA graph: copy new inputs
    into the static tensors and ``graph.replay()``. Warmed up off the capture first (autotuning, cuBLAS handles)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            model(static_features, attention_mask=static_mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_features, attention_mask=static_mask).last_hidden_state
    return graph, static_out


def max_diff_on_valid(a, b, lengths):
    return max((a[i, :n].double() - b[i, :n].double()).abs().max().item() for i, n in enumerate(lengths))
