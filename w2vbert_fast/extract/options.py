"""What an extraction is asked to do, as typed values: the command line builds an ExtractOptions from its
arguments, a program can build one directly. Frozen: ``extract`` reads it and never changes it."""

from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .model import ModelSource


@dataclass(frozen=True)
class ExtractOptions:
    out: str  # the output folder
    model: ModelSource
    inputs: Tuple[str, ...] = ()  # audio files and folders (searched recursively)
    list_file: Optional[str] = None  # a text file of audio paths, one per line
    manifest: Optional[str] = None  # JSON lines or TSV: path and optionally duration, sample rate, name (inputs.py)
    layer: Optional[int] = None  # None: 17, or the last layer of a model with fewer
    batch_seconds: float = 60.0  # padded audio per batch
    # under torchrun a CUDA device becomes cuda:LOCAL_RANK
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    save_dtype: Optional[torch.dtype] = None  # the dtype the hidden states are stored in (None: dtype)
    shard_size: Optional[int] = None  # clips per shard file (shards.py); None: one file per clip
    workers: int = 4  # decode threads (and up to 4 writer threads); 0: every stage in turn on the main thread
    resample: bool = False  # clips at another rate are resampled to 16 kHz (else listed as failed)
    downmix: bool = False  # multi-channel clips are averaged to mono (else listed as failed)
    overwrite: bool = False  # replace outputs computed with another layer, model, dtype or source
    quiet: bool = False  # no progress line
    rank_timeout: float = 300.0  # under torchrun: seconds of silence after which a rank counts as lost
