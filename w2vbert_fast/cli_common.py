"""What the command-line subcommands share: named architectures, device/dtype choice, model and feature-extractor
loading, and the usage error that main() prints without a traceback.

Kept out of ``__main__`` because ``python -m w2vbert_fast`` runs that file as the module ``__main__``: a submodule
importing ``w2vbert_fast.__main__`` would get a second copy with its own CommandError class, which main() would
not catch.
"""

import os

import torch

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
SAMPLE_RATE = 16000


class CommandError(Exception):
    """A usage problem found after parsing (bad layer, bad model folder): printed without a traceback, exit 2."""


# ------------------------------------------------------------------------------------------------ helpers
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device_dtype(args):
    try:
        device = torch.device(args.device or default_device())
    except (RuntimeError, ValueError):
        raise CommandError(f"--device {args.device}: not a device; expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise CommandError(f"--device {args.device}: this package runs on cpu or cuda (cuda:N), not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {args.device}: no CUDA device is available (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise CommandError(f"--device {args.device}: there are {torch.cuda.device_count()} CUDA devices "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    return device, DTYPES[dtype_name]


def random_model(architecture: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32):
    """A Wav2Vec2BertModel of a named architecture with seeded random weights (built on the CPU, so the same
    seed gives the same weights on any device)."""
    from . import Wav2Vec2BertConfig, Wav2Vec2BertModel

    torch.manual_seed(seed)
    model = Wav2Vec2BertModel(Wav2Vec2BertConfig(**ARCHITECTURES[architecture]))
    return model.to(device=device, dtype=dtype).eval()


def load_model(args, device, dtype):
    """(model, description) from ``--model FOLDER`` or ``--random-weights ARCH``."""
    from . import Wav2Vec2BertModel

    if args.model:
        try:
            model = Wav2Vec2BertModel.from_pretrained(args.model, dtype=dtype, device=device)
        except (OSError, ValueError) as error:  # each names the file at fault and the fix
            raise CommandError(f"--model {args.model}: {error}") from None
        return model, f"{args.model}"
    model = random_model(args.random_weights, args.seed, device, dtype)
    return model, f"{args.random_weights} architecture, random weights (seed {args.seed})"


def feature_extractor(model_folder=None):
    from . import FbankExtractor

    if model_folder and os.path.isfile(os.path.join(model_folder, "preprocessor_config.json")):
        try:
            return FbankExtractor.from_pretrained(model_folder)
        except (OSError, ValueError, TypeError) as error:
            raise CommandError(f"--model {model_folder}: {error}") from None
    return FbankExtractor()
