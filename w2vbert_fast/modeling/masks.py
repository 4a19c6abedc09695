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

    A mask is read as right padding: row b's length is its number of nonzero entries and frames ``[0, length)``
    are the real ones (what transformers' own output-length arithmetic assumes, and what FbankExtractor makes).
    Telling a mask with holes (a 0 before a 1) from right padding needs the host to read the mask, so it is
    checked only when value checks run (see ``ops._backend.checks_values``: by default on CPU tensors outside
    torch.compile, everywhere with ``W2VBERT_FAST_VALIDATE=1``), and then it raises. Unchecked, a mask with holes
    gives the output of the right-padded mask with the same number of ones per row.

    ``lengths`` may all equal T (nothing padded): the kernels take that as is, no special case. ``mask`` is
    derived from ``lengths``. ``keep_padded_rows``: padded rows must be computed as transformers computes them
    (an adapter's strided conv reads one of them).
    """

    mask: torch.Tensor  # (B, T) bool, True = real frame (t < lengths[b])
    lengths: torch.Tensor  # (B,) int32, the kernels' dtype: no per-layer conversion
    keep_padded_rows: bool = False

    @staticmethod
    def from_lengths(lengths, length, keep_padded_rows=False) -> "Padding":
        lengths = lengths.to(torch.int32)
        mask = torch.arange(length, device=lengths.device, dtype=torch.int32)[None, :] < lengths[:, None]
        return Padding(mask=mask, lengths=lengths, keep_padded_rows=keep_padded_rows)

    @staticmethod
    def from_attention_mask(attention_mask, length, batch, keep_padded_rows=False,
                            validate: Optional[bool] = None) -> Optional["Padding"]:
        """``attention_mask``: (batch, length), 1 (or True, or nonzero) = real frame. Shape and dtype errors are
        raised always (no sync); ``validate`` (default: ``ops._backend.checks_values``) also checks the values on
        the host: 0/1 only, at least one real frame per row, right padding."""
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
        padding = Padding.from_lengths(real.sum(dim=1, dtype=torch.int32), length, keep_padded_rows)
        if validate is None:
            validate = checks_values(attention_mask)
        if validate:
            check_mask_values(attention_mask, real, padding)
        return padding


def check_mask_values(attention_mask, real, padding) -> None:
    """The host-side checks of a mask's values, in one device-to-host copy: 0/1 only, no empty row, no hole."""
    not_binary = ((attention_mask != 0) & (attention_mask != 1)).any(dim=1)
    empty = padding.lengths == 0
    holes = (real != padding.mask).any(dim=1)
    not_binary, empty, holes = torch.stack([not_binary, empty, holes]).cpu().tolist()
    rows = lambda flags: [i for i, flag in enumerate(flags) if flag]  # noqa: E731
    if any(not_binary):
        raise ValueError(f"attention_mask must hold only 0 and 1 (1 = real frame, 0 = padding); row(s) {rows(not_binary)} do not")
    if any(empty):
        raise ValueError(f"attention_mask has no real frame in batch row(s) {rows(empty)}: every sequence needs at least one")
    if any(holes):
        raise ValueError(
            f"attention_mask row(s) {rows(holes)} are not right padding (a 0 before a 1): w2vbert_fast reads a mask "
            "as right padding (real frames first, then padding); put each sequence's real frames first"
        )
