"""What the commands share: the named architectures of ``--random-weights``, the device and dtype of
``--device`` / ``--dtype``, the model a command runs (from explicit values, never the argparse namespace; loaded by
``extract.pipeline.load_model``), and the usage error that main() prints without a traceback."""

import torch

from ..extract.pipeline import ModelSource, load_model

ARCHITECTURES = {
    # facebook/w2v-bert-2.0 (600M parameters)
    "w2v-bert-2.0": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         feature_projection_input_dim=160, hidden_act="swish", position_embeddings_type="relative_key",
                         left_max_position_embeddings=64, right_max_position_embeddings=8,
                         conv_depthwise_kernel_size=31, add_adapter=False),
    # for tests and quick checks: the same structure, small
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                 feature_projection_input_dim=160, hidden_act="swish", position_embeddings_type="relative_key",
                 left_max_position_embeddings=64, right_max_position_embeddings=8, conv_depthwise_kernel_size=31,
                 add_adapter=False),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CommandError(Exception):
    """A usage problem found after parsing (a device that is not there): printed without a traceback, exit 2."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_dtype(device_name=None, dtype_name=None):
    """(torch.device, torch.dtype) of ``--device`` / ``--dtype``: the default device when None, bfloat16 on CUDA
    and float32 on the CPU by default; CommandError for a device that does not exist here."""
    try:
        device = torch.device(device_name or default_device())
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {device_name}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {device_name}: this package runs on cpu or cuda (cuda:N), not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {device_name}: no CUDA device is available (torch.cuda.is_available() is "
                           f"False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {device_name}: there are {torch.cuda.device_count()} CUDA devices "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device, DTYPES[dtype_name or ("bfloat16" if device.type == "cuda" else "float32")]


def model_source(folder=None, random_weights=None, seed=0) -> ModelSource:
    """``--model FOLDER``, else ``--random-weights ARCH`` with ``--seed``."""
    if folder:
        return ModelSource(folder=folder)
    return ModelSource(architecture=ARCHITECTURES[random_weights], name=random_weights, seed=seed)


def random_model(architecture: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32):
    """A Wav2Vec2BertModel of a named architecture with seeded random weights (built on the CPU, so the same
    seed gives the same weights on any device)."""
    return load_model(model_source(random_weights=architecture, seed=seed), device, dtype)[0]
