"""attention_mask → which frames are real, on the mask's device with no host sync; the value checks, when asked."""

from dataclasses import dataclass
from typing import Optional

import torch

from ..ops._backend import checks_values


@dataclass
class Padding:
    """Which frames of a batch are real, built once per forward on the mask's device with tensor ops only: no host
    sync and no data-dependent Python branch, so a masked forward compiles in one graph (``fullgraph=True``) and
    captures into a CUDA graph.

    Any mask transformers accepts: right padding, left padding, holes. ``mask`` is the real frames, ``lengths`` one
    past each row's last real frame (its extent: for right padding the number of real frames). The kernels skip
    every key block past ``lengths`` and zero the query rows there (nothing reads them: transformers' heads read a
    row's first ``count`` frames, and count <= extent); within it, ``frame_mask`` marks the keys attention may see
    and the frames the conv module reads as zero, and masked rows before the extent are computed as transformers
    computes them (under left padding its heads read them).

    ``frame_mask`` is None when the padding comes from lengths (right padding by construction: the adapter's):
    the kernels' cheapest build. ``lengths`` may all equal T (nothing padded): the kernels take that as is, no
    special case. ``keep_padded_rows``: the rows past the extent must be computed as transformers computes them
    too (an adapter's strided conv reads one of them).
    """

    mask: torch.Tensor  # (B, T) bool, True = real frame
    lengths: torch.Tensor  # (B,) int32 (the kernels' dtype: no per-layer conversion), one past the last real frame
    frame_mask: Optional[torch.Tensor] = None  # (B, T) bool, the same as mask, when it may not be right padding
    keep_padded_rows: bool = False

    @staticmethod
    def from_lengths(lengths, length, keep_padded_rows=False) -> "Padding":
        lengths = lengths.to(torch.int32)
        mask = torch.arange(length, device=lengths.device, dtype=torch.int32)[None, :] < lengths[:, None]
        return Padding(mask=mask, lengths=lengths, keep_padded_rows=keep_padded_rows)

    @staticmethod
    def from_attention_mask(attention_mask, length, batch, keep_padded_rows=False,
                            validate: Optional[bool] = None) -> Optional["Padding"]:
        """``attention_mask``: (batch, length), 1 (or True, or nonzero) = real frame, any pattern. Shape and dtype
        errors are raised always (no sync); ``validate`` (default: ``ops._backend.checks_values``) also checks the
        values on the host: 0/1 only, at least one real frame per row."""
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise ValueError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, length):
            raise ValueError(
                f"attention_mask must have shape (batch, frames) = ({batch}, {length}), got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype.is_complex:
            raise ValueError(f"attention_mask must be a bool, integer or floating 0/1 tensor, got {attention_mask.dtype}")
        real = attention_mask != 0
        frames = torch.arange(1, length + 1, device=real.device, dtype=torch.int32)
        extent = torch.where(real, frames, 0).amax(dim=1) if length > 0 else real.new_zeros(batch, dtype=torch.int32)
        padding = Padding(mask=real, lengths=extent.to(torch.int32), frame_mask=real,
                          keep_padded_rows=keep_padded_rows)
        if validate is None:
            validate = checks_values(attention_mask)
        if validate:
            check_mask_values(attention_mask, padding)
        return padding


def check_mask_values(attention_mask, padding) -> None:
    """The host-side checks of a mask's values, in one device-to-host copy: 0/1 only, no empty row."""
    not_binary = ((attention_mask != 0) & (attention_mask != 1)).any(dim=1)
    empty = padding.lengths == 0
    not_binary, empty = torch.stack([not_binary, empty]).cpu().tolist()
    rows = lambda flags: [i for i, flag in enumerate(flags) if flag]  # noqa: E731
    if any(not_binary):
        raise ValueError(f"attention_mask must hold only 0 and 1 (1 = real frame, 0 = padding); row(s) {rows(not_binary)} do not")
    if any(empty):
        raise ValueError(f"attention_mask has no real frame in batch row(s) {rows(empty)}: every sequence needs at least one")
