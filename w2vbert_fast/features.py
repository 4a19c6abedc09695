"""FbankExtractor: transformers' SeamlessM4TFeatureExtractor, batched, on any device, and a stand-in for it.

The numbers come from ``ops.log_mel_fbank`` (the Triton kernel on CUDA tensors, a vectorised PyTorch path on the
CPU); this file does what transformers' extractor does around them, exactly as it does: reading the clips (channel 0
of a multi-channel one), truncation, padding (either side; to the longest clip, to ``max_length``, to a multiple),
the padding value, stride stacking and the attention mask, the return types; ``pad`` for data collators; and
transformers' ``preprocessor_config.json``. It also holds the one check of a clip every caller uses (``check_clip``).
"""

import copy
import json
import math
import os
from collections.abc import Mapping

import numpy as np
import torch

from . import ops
from .ops.log_mel_fbank import FRAME_LENGTH, HOP_LENGTH, NUM_MEL_BINS, SAMPLE_RATE, num_frames

# The largest |sample| accepted. The power of one frame is at most 512·400·(2·1.97·32768·A)² ≈ 3.4e15·A²
# (Parseval; ×32768 scaling, DC removal and pre-emphasis at most ×3.94), which must stay below fp32's 3.4e38:
# A = 1e9 leaves five orders of magnitude, and still admits int16-range samples passed as floats.
MAX_ABS_SAMPLE = 1e9
# The fewest samples a clip may have: two 25 ms frames (one frame's per-bin variance is undefined)
MIN_SAMPLES = FRAME_LENGTH + HOP_LENGTH

# what preprocessor_config.json names the class, so transformers' AutoFeatureExtractor loads a folder we saved
TRANSFORMERS_CLASS = "SeamlessM4TFeatureExtractor"
_SETTINGS = ("feature_size", "sampling_rate", "num_mel_bins", "padding_value", "stride", "padding_side",
             "return_attention_mask")
# transformers' PaddingStrategy values; True and False are its aliases for the first and the last
_PADDING = {True: "longest", "longest": "longest", "max_length": "max_length", False: "do_not_pad",
            "do_not_pad": "do_not_pad"}
# a sentinel: return_tensors left out gives torch tensors (this package's API), an explicit None numpy arrays
# (transformers' answer to None)
_TORCH_BY_DEFAULT = object()


class FeatureBatch(dict):
    """The extractor's output: a dict of ``input_features`` and ``attention_mask`` (torch tensors or numpy arrays).

    A dict, so every collator, ``Trainer`` and ``datasets.map`` takes it as a mapping, and it needs no transformers;
    with what transformers' ``BatchFeature`` adds that processors, pipelines and tutorials use: attribute access
    (``batch.input_features``) and ``.to(device or dtype)``.
    """

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs):
        """As ``BatchFeature.to``: floating-point tensors take the dtype and the device, the others (the mask) only
        the device; numpy arrays stay. Changes this batch and returns it."""
        device = kwargs.get("device")
        if device is None and args:
            if isinstance(args[0], (str, int, torch.device)):
                device = args[0]
            elif not isinstance(args[0], torch.dtype):
                raise ValueError(f"FeatureBatch.to takes a device or a dtype, got {args[0]!r}")

        def moved(value):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value.to(*args, **kwargs)
            if isinstance(value, torch.Tensor) and device is not None:
                return value.to(device=device, non_blocking=kwargs.get("non_blocking", False))
            return value

        self.update({key: moved(value) for key, value in self.items()})
        return self


class FbankExtractor:
    """``fe = FbankExtractor(); batch = fe(clips, sampling_rate=16000, device="cuda")``.

    ``batch["input_features"]``: (B, F, 160) float32, ``batch["attention_mask"]``: (B, F) int32, on ``device``:
    the same values as ``SeamlessM4TFeatureExtractor()(clips, sampling_rate=16000, return_tensors="pt")``.

    It stands in for that extractor (``processor.feature_extractor = FbankExtractor.from_pretrained(folder)``): the
    same call options, ``pad``, attributes and preprocessor_config.json. It is not a subclass of transformers'
    ``FeatureExtractionMixin`` (the package runs without transformers), so a processor's constructor, which checks
    that class, refuses it: build the processor with transformers' extractor, then assign ours; and save such a
    processor's settings with our ``save_pretrained`` (``ProcessorMixin.save_pretrained`` serialises only
    transformers' classes).

    Deliberate differences from transformers:

    - ``return_tensors`` left out gives torch tensors (on ``device``); ``"np"`` or an explicit ``None`` gives numpy
      arrays, as transformers gives for both.
    - Every argument after the clips is keyword-only: this class's second positional argument used to be
      ``sampling_rate`` and transformers' is ``padding``, so a positional call would mean different things.
    - Refused with a ValueError naming the clip, where transformers returns NaN features or an error from deep
      inside: a clip of 400–559 samples (one frame, whose per-bin variance is undefined: NaN in transformers) or
      fewer (one frame is the minimum), integer samples (transformers computes on them unscaled), non-finite
      samples, and samples beyond ±MAX_ABS_SAMPLE (1e9), whose fp32 power spectrum could overflow into NaN.
    - Refused with a ValueError naming the setting: ``num_mel_bins``/``feature_size`` other than 80 and
      ``sampling_rate`` other than 16000 (the kernel's filter bank).
    - ``padding=False`` with clips of different frame counts, or ``padding="max_length"`` with a clip longer
      than ``max_length`` and no ``truncation``: a ValueError saying so (transformers fails unpacking a shape).
    - With ``stride=1`` the mask is the frame mask; transformers returns an empty (B, 0) one.
    """

    model_input_names = ["input_features", "attention_mask"]

    def __init__(self, feature_size=80, sampling_rate=16000, num_mel_bins=80, padding_value=0.0, stride=2,
                 padding_side="right", return_attention_mask=True, **kwargs):
        if num_mel_bins != NUM_MEL_BINS or feature_size != NUM_MEL_BINS:
            raise ValueError(
                f"num_mel_bins and feature_size must be {NUM_MEL_BINS} (the kernel's filter bank), "
                f"got {num_mel_bins} and {feature_size}"
            )
        if sampling_rate != SAMPLE_RATE:
            raise ValueError(f"sampling_rate must be {SAMPLE_RATE} (w2v-bert-2.0's), got {sampling_rate}")
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if isinstance(padding_value, bool) or not isinstance(padding_value, (int, float)):
            raise ValueError(f"padding_value must be a number, got {padding_value!r}")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if not isinstance(return_attention_mask, bool):
            raise ValueError(f"return_attention_mask must be True or False, got {return_attention_mask!r}")
        kind = kwargs.pop("feature_extractor_type", TRANSFORMERS_CLASS)
        if kind != TRANSFORMERS_CLASS:
            raise ValueError(f"feature_extractor_type is {kind!r}: FbankExtractor computes {TRANSFORMERS_CLASS}'s "
                             "features only")
        kwargs.pop("processor_class", None)  # transformers drops it too: it is the processor's, not the extractor's
        self.feature_size = feature_size
        self.num_mel_bins = num_mel_bins
        self.sampling_rate = sampling_rate
        self.padding_value = padding_value
        self.stride = stride
        self.padding_side = padding_side
        self.return_attention_mask = return_attention_mask
        self.extra = dict(kwargs)  # unknown keys of preprocessor_config.json, kept and written back as transformers

    # ------------------------------------------------------------------------------------------- settings
    @classmethod
    def from_pretrained(cls, folder, **settings):
        """Read the settings of a transformers-format folder, as transformers does: the ``feature_extractor``
        entry of ``processor_config.json`` where there is one (what transformers 5 processors save), else
        ``preprocessor_config.json``; ``folder`` may also be the path of such a JSON file. ``settings`` override
        what the file says (e.g. ``padding_side="left"``). Local folders only: nothing is downloaded."""
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"from_pretrained got unknown keyword(s) {unknown}: it reads a local folder, and takes "
                            f"only settings to override ({', '.join(_SETTINGS)})")
        return cls.from_dict({**_read_settings(os.fspath(folder)), **settings})

    @classmethod
    def from_dict(cls, values):
        """An extractor from a dict of settings, as ``to_dict`` (and transformers' ``to_dict``) gives."""
        if not isinstance(values, Mapping):
            raise ValueError(f"the settings must be a JSON object (a mapping), got {type(values).__name__}")
        return cls(**values)

    def to_dict(self):
        """The settings as transformers' extractor gives them: the same keys, ``feature_extractor_type`` its class
        name (so transformers loads what ``save_pretrained`` writes), unknown keys kept."""
        return {**copy.deepcopy(self.extra), "feature_extractor_type": TRANSFORMERS_CLASS,
                **{name: getattr(self, name) for name in _SETTINGS}}

    def to_json_string(self):
        """preprocessor_config.json's text, formatted as transformers writes it."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, folder):
        """Write ``folder/preprocessor_config.json`` (creating the folder); returns ``[its path]``."""
        folder = os.fspath(folder)
        if os.path.isfile(folder):
            raise ValueError(f"save_pretrained needs a folder, {folder!r} is a file")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "preprocessor_config.json")
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())
        return [path]

    def __repr__(self):
        return f"FbankExtractor {self.to_json_string()}"

    # ------------------------------------------------------------------------------------------------ call
    def __call__(self, raw_speech, *, padding=True, pad_to_multiple_of=2, max_length=None, truncation=False,
                 return_tensors=_TORCH_BY_DEFAULT, sampling_rate=None, return_attention_mask=None,
                 do_normalize_per_mel_bins=True, device=None, lengths=None):
        """raw_speech, as transformers reads it: one clip (a 1-D numpy array, torch tensor or list of floats), a
        list of clips, or a 2-D numpy array of one clip a row. A multi-channel clip, channels first — a 2-D torch
        tensor, a 2-D element of a list, a row of a 3-D numpy array — gives its channel 0. A padded (B, N) tensor or
        array with ``lengths`` (the samples of each row) is a batch. Samples are floats at ``sampling_rate`` (must
        be the extractor's, 16 kHz; None assumes it), nominally in [-1, 1].

        padding: True/"longest" pads to the longest clip, "max_length" to ``max_length`` frames, either then to a
        multiple of ``pad_to_multiple_of`` frames; False/"do_not_pad" needs every clip to give the same number of
        frames. truncation=True cuts clips to ``max_length`` frames (rounded up to the multiple); the per-bin
        normalisation still spans the whole clip, as transformers. Padded frames hold ``padding_value``, on the
        ``padding_side``; then ``stride`` frames are stacked into one row. return_tensors: "pt" torch tensors on
        ``device`` (default: the input tensor's device, else the CPU; the computation runs there too), "np" or
        None numpy arrays, left out torch tensors. Returns a :class:`FeatureBatch`.
        """
        if sampling_rate is not None and sampling_rate != self.sampling_rate:
            raise ValueError(
                f"sampling_rate must be the extractor's {self.sampling_rate} Hz, got {sampling_rate}: resample first"
            )
        strategy = _padding_strategy(padding, max_length, truncation, pad_to_multiple_of)
        as_numpy = _returns_numpy(return_tensors)
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        if device is None:
            device = raw_speech.device if isinstance(raw_speech, torch.Tensor) else torch.device("cpu")
        checked = [check_clip(clip, name) for clip, name in _clips(raw_speech, lengths)]
        waveforms, sizes = _padded_waveforms(checked, torch.device(device))

        # (B, F, 80), zeros after each clip's frames; transformers normalises when the flag is truthy (None: not)
        features = ops.log_mel_fbank(waveforms, sizes, normalize=bool(do_normalize_per_mel_bins))
        # frame counts from the host's clip sizes: no device sync
        counts = [int(num_frames(clip.shape[0])) for clip in checked]
        if truncation:
            limit = _round_up(max_length, pad_to_multiple_of)
            counts = [min(count, limit) for count in counts]
        frames = _padded_length(counts, strategy, max_length, pad_to_multiple_of, "clip")
        features, mask = self._place(features, counts, frames)

        # stride stacking as transformers: drop the remainder, fold `stride` frames into one row of 80·stride
        frames -= frames % self.stride
        features = features[:, :frames].reshape(len(counts), frames // self.stride, NUM_MEL_BINS * self.stride)
        # a stacked row is real when its frame at offset 1 is (transformers' `indices % stride == 1`)
        mask = mask[:, :frames][:, 1 :: self.stride] if self.stride > 1 else mask[:, :frames]
        out = {"input_features": features}
        if return_attention_mask:
            out["attention_mask"] = mask
        return _batch_of(out, as_numpy)

    def _place(self, features, counts, frames):
        """(B, F, 80) right-aligned frames → (B, frames, 80) with each clip's first ``counts`` frames on the
        padding side's end and ``padding_value`` elsewhere, and the (B, frames) int32 mask. On the CPU per clip with
        numpy, on the calling thread (see ``_place_on_host``); elsewhere batched tensor ops with no host sync."""
        if features.device.type == "cpu":
            return _place_on_host(features, counts, frames, self.padding_side, self.padding_value)
        return self._place_on_device(features, counts, frames)

    def _place_on_device(self, features, counts, frames):
        available = features.shape[1]
        positions = torch.arange(frames, device=features.device)
        counts = _host_to_device(counts, features.device)
        if self.padding_side == "right":
            real = positions[None, :] < counts[:, None]
            if available >= frames:
                features = features[:, :frames]
            else:
                features = torch.nn.functional.pad(features, (0, 0, 0, frames - available))
        else:
            first = frames - counts  # each clip's first real position
            real = positions[None, :] >= first[:, None]
            source = (positions[None, :] - first[:, None]).clamp(0, available - 1)
            features = torch.gather(features, 1, source[..., None].expand(-1, -1, features.shape[2]))
        # also clears the frames truncation cut, which log_mel_fbank computed
        features = features.masked_fill(~real[..., None], float(self.padding_value))
        return features, real.to(torch.int32)

    # ------------------------------------------------------------------------------------------------- pad
    def pad(self, processed_features, padding=True, max_length=None, truncation=False, pad_to_multiple_of=None,
            return_attention_mask=None, return_tensors=None):
        """Pad already-extracted features into a batch, as transformers' ``SequenceFeatureExtractor.pad`` (what
        ``processor.pad`` and CTC data collators call): ``processed_features`` is a list of mappings with
        ``input_features`` (F_i, D) and optionally ``attention_mask`` (F_i,), or one mapping of lists. Rows are
        truncated, padded with ``padding_value`` on ``padding_side`` and masked as ``__call__`` does with frames.
        return_tensors None gives what the inputs were (torch tensors for tensors, else numpy), as transformers.
        """
        strategy = _padding_strategy(padding, max_length, truncation, pad_to_multiple_of)
        examples, masks, given_torch = _examples(processed_features)
        as_numpy = not given_torch if return_tensors is None else _returns_numpy(return_tensors)
        if return_attention_mask is None:
            return_attention_mask = self.return_attention_mask
        counts = [example.shape[0] for example in examples]
        if truncation:
            limit = _round_up(max_length, pad_to_multiple_of)
            counts = [min(count, limit) for count in counts]
        rows = _padded_length(counts, strategy, max_length, pad_to_multiple_of, "example")
        features = torch.full((len(examples), rows, examples[0].shape[1]), float(self.padding_value))
        mask = torch.zeros(len(examples), rows, dtype=torch.int32)
        for i, (example, count) in enumerate(zip(examples, counts)):
            start = rows - count if self.padding_side == "left" else 0
            features[i, start : start + count] = example[:count]
            mask[i, start : start + count] = 1 if masks is None else masks[i][:count]
        out = {"input_features": features}
        if return_attention_mask:
            out["attention_mask"] = mask
        return _batch_of(out, as_numpy)


# -------------------------------------------------------------------------------------------- the options
def _padding_strategy(padding, max_length, truncation, pad_to_multiple_of):
    """Check the padding options as transformers does, and name the padding strategy."""
    if isinstance(padding, str) or isinstance(padding, bool):
        strategy = _PADDING.get(padding)
    else:
        strategy = None
    if strategy is None:
        raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise ValueError(f"max_length must be a positive int or None, got {max_length!r}")
    if strategy == "max_length" and max_length is None:
        raise ValueError("padding='max_length' needs max_length (the frames to pad to)")
    if truncation and max_length is None:
        raise ValueError("truncation=True needs max_length (the frames to cut to)")
    if pad_to_multiple_of is not None and (isinstance(pad_to_multiple_of, bool)
                                           or not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
    return strategy


def _returns_numpy(return_tensors):
    if return_tensors is _TORCH_BY_DEFAULT or return_tensors == "pt":
        return False
    if return_tensors is None or return_tensors == "np":
        return True
    raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {return_tensors!r}")


def _round_up(length, multiple):
    return length if multiple is None else -(-length // multiple) * multiple


def _padded_length(counts, strategy, max_length, pad_to_multiple_of, unit):
    """The frames (rows) every item is padded to, as transformers' ``pad``; a ValueError where it would leave the
    batch ragged."""
    if strategy == "do_not_pad":
        if len(set(counts)) > 1:
            raise ValueError(f"padding=False needs every {unit} to give the same number of frames, got {counts}")
        return counts[0]
    target = _round_up(max(counts) if strategy == "longest" else max_length, pad_to_multiple_of)
    longer = [i for i, count in enumerate(counts) if count > target]
    if longer:
        raise ValueError(f"{unit}(s) {longer} have more than max_length={max_length} frames: pass truncation=True "
                         "to cut them, or a larger max_length")
    return target


def _batch_of(values, as_numpy):
    if as_numpy:
        values = {key: value.cpu().numpy() for key, value in values.items()}
    return FeatureBatch(values)


# ------------------------------------------------------------------------------------------------ reading
def _read_settings(path):
    """The settings dict of a folder or a JSON file, found where transformers looks."""
    if os.path.isfile(path):
        return _load_json(path)
    processor = os.path.join(path, "processor_config.json")
    if os.path.isfile(processor):
        values = _load_json(processor)
        for key in ("feature_extractor", "audio_processor"):
            if key in values:
                if not isinstance(values[key], dict):
                    raise ValueError(f"{processor}: {key} must be a JSON object, got {type(values[key]).__name__}")
                return values[key]
    config = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(config):
        raise ValueError(f"no preprocessor_config.json in {path!r} (nor a feature_extractor entry in a "
                         "processor_config.json): from_pretrained reads a local transformers-format folder")
    return _load_json(config)


def _load_json(path):
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON ({error}): fix it, or delete it to use w2v-bert-2.0's "
                             "feature settings") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(values).__name__}")
    return values


def _clips(raw_speech, lengths):
    """raw_speech → [(one clip, its name)], batched the way transformers batches it."""
    if lengths is not None:
        if not isinstance(raw_speech, (torch.Tensor, np.ndarray)) or raw_speech.ndim != 2:
            raise ValueError("lengths is only for a padded (batch, samples) array or tensor of raw_speech")
        lengths = torch.as_tensor(lengths)
        if lengths.dim() != 1 or lengths.shape[0] != raw_speech.shape[0] or lengths.dtype.is_floating_point:
            raise ValueError(
                f"lengths must be ({raw_speech.shape[0]},) integers, got {tuple(lengths.shape)} {lengths.dtype}"
            )
        bad = [i for i, n in enumerate(lengths.tolist()) if not 0 <= n <= raw_speech.shape[1]]
        if bad:
            raise ValueError(f"lengths of clip(s) {bad} lie outside [0, {raw_speech.shape[1]}]")
        clips = [(raw_speech[i, :n], f"clip {i}") for i, n in enumerate(lengths.tolist())]
    elif isinstance(raw_speech, np.ndarray):
        # transformers: a 2-D or 3-D array is a batch (of clips, or of channels-first clips)
        if raw_speech.ndim > 3:
            raise ValueError(f"raw_speech as an array must be (samples,), (batch, samples) or (batch, channels, "
                             f"samples), got shape {raw_speech.shape}")
        clips = [_channel_0(raw_speech, "clip 0")] if raw_speech.ndim == 1 else [
            _channel_0(row, f"clip {i}") for i, row in enumerate(raw_speech)]
    elif isinstance(raw_speech, torch.Tensor):
        # transformers: any tensor is one clip, a 2-D one (channels, samples)
        if raw_speech.dim() > 2:
            raise ValueError(f"raw_speech as a tensor must be one clip, (samples,) or (channels, samples), got shape "
                             f"{tuple(raw_speech.shape)}: pass a list of clips, or a padded (batch, samples) tensor "
                             "with lengths=")
        clips = [_channel_0(raw_speech, "clip 0")]
    elif isinstance(raw_speech, (list, tuple)):
        # transformers: a list whose first item is a sequence is a batch, else one clip of numbers
        if raw_speech and isinstance(raw_speech[0], (torch.Tensor, np.ndarray, list, tuple)):
            clips = [_channel_0(clip, f"clip {i}") for i, clip in enumerate(raw_speech)]
        else:
            clips = [(raw_speech, "clip 0")] if raw_speech else []
    else:
        raise ValueError(f"raw_speech must be an array, a tensor or a list of them, got {type(raw_speech).__name__}")
    if not clips:
        raise ValueError("raw_speech holds no clip")
    return clips


def _channel_0(clip, name):
    """A clip, or channel 0 of a channels-first one (what transformers keeps)."""
    if isinstance(clip, (torch.Tensor, np.ndarray)) and clip.ndim == 2:
        return clip[0], f"{name} (channel 0 of {clip.shape[0]})"
    if isinstance(clip, (list, tuple)) and clip and isinstance(clip[0], (list, tuple, np.ndarray, torch.Tensor)):
        return clip[0], f"{name} (channel 0 of {len(clip)})"
    return clip, name


def _host_to_device(values, device, dtype=torch.int64):
    """A small tensor of host values on ``device`` without a stream sync: through pinned memory to a GPU (a copy
    from pageable memory, what ``torch.tensor(..., device="cuda")`` makes, waits for the stream)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _padded_waveforms(checked, device):
    """Checked clips → (B, N) float32 right-padded waveforms and (B,) lengths on ``device``: assembled where the
    clips are (pinned host memory for host clips going to a GPU), then one non-blocking copy."""
    sizes = [c.shape[0] for c in checked]
    if device.type == "cpu":
        # numpy on the calling thread: see _place_on_host
        waveforms = np.zeros((len(checked), max(sizes)), dtype=np.float32)
        for i, clip in enumerate(checked):
            waveforms[i, : clip.shape[0]] = clip.cpu().numpy()
        return torch.from_numpy(waveforms), torch.tensor(sizes)
    staging = device if all(c.device == device for c in checked) else torch.device("cpu")
    pinned = staging.type == "cpu" and device.type == "cuda"
    waveforms = torch.zeros(len(checked), max(sizes), dtype=torch.float32, device=staging, pin_memory=pinned)
    for i, clip in enumerate(checked):
        waveforms[i, : clip.shape[0]] = clip.to(staging)
    return waveforms.to(device, non_blocking=True), _host_to_device(sizes, device)


def _place_on_host(features, counts, frames, padding_side, padding_value):
    """``FbankExtractor._place`` for CPU tensors, per clip with numpy. The CPU work of a batch is a few ms in all:
    as PyTorch ops over the batch each step would be a parallel region of torch's threads, and on a shared CPU
    (other processes busy, a cgroup quota below the cores it sees) every region waits for a descheduled worker
    thread, up to a scheduler time slice each (``benchmarks/bench_cpu_contention.py``). numpy never starts threads
    for these."""
    source = features.numpy()
    placed = np.full((len(counts), frames, source.shape[2]), padding_value, dtype=np.float32)
    real = np.zeros((len(counts), frames), dtype=np.int32)
    for i, count in enumerate(counts):
        rows = slice(0, count) if padding_side == "right" else slice(frames - count, frames)
        placed[i, rows] = source[i, :count]
        real[i, rows] = 1
    return torch.from_numpy(placed), torch.from_numpy(real)


def _examples(processed_features):
    """pad()'s input → (F_i, D) float32 CPU tensors, their masks (or None) and whether they came as tensors."""
    if isinstance(processed_features, (list, tuple)):
        if not processed_features or not all(isinstance(e, Mapping) for e in processed_features):
            raise ValueError("processed_features must be a non-empty list of mappings with input_features, or a "
                             "mapping of lists")
        processed_features = {key: [e[key] for e in processed_features] for key in processed_features[0].keys()}
    if not isinstance(processed_features, Mapping) or "input_features" not in processed_features:
        found = list(processed_features.keys()) if isinstance(processed_features, Mapping) else None
        raise ValueError(f"processed_features must hold input_features, got {found or type(processed_features)}")
    others = sorted(set(processed_features) - {"input_features", "attention_mask"})
    if others:
        raise ValueError(f"pad() pads input_features and attention_mask only, got also {others}: pad those "
                         "separately (processor.pad gives labels to the tokenizer)")
    features = list(processed_features["input_features"])
    if not features:
        raise ValueError("processed_features holds no example")
    given_torch = isinstance(features[0], torch.Tensor)
    examples = []
    for i, example in enumerate(features):
        if isinstance(example, torch.Tensor):
            example = example.detach().cpu().to(torch.float32)
        else:
            example = torch.from_numpy(np.asarray(example, dtype=np.float32))
        width = examples[0].shape[1] if examples else None
        if example.dim() != 2 or example.shape[1] != (width or example.shape[1]):
            raise ValueError(f"input_features of example {i} must be (frames, {width or 'features'}), got shape "
                             f"{tuple(example.shape)}")
        examples.append(example)
    masks = processed_features.get("attention_mask")
    if masks is not None:
        masks = [torch.as_tensor(np.asarray(m.cpu() if isinstance(m, torch.Tensor) else m)) for m in masks]
        bad = [i for i, (m, e) in enumerate(zip(masks, examples)) if tuple(m.shape) != (e.shape[0],)]
        if len(masks) != len(examples) or bad:
            raise ValueError(f"attention_mask must be one (frames,) row per example of input_features; rows {bad} "
                             "are not")
    return examples, masks, given_torch


def check_clip(clip, name="clip") -> torch.Tensor:
    """The one check of a clip of samples, for every caller (the extractor, ``extract``, ``demo``): mono, floating
    point, at least two frames (``MIN_SAMPLES``), finite, no sample beyond ``MAX_ABS_SAMPLE``. Returns it as a
    float32 tensor; raises a ValueError that starts with ``name``."""
    if isinstance(clip, torch.Tensor):
        tensor = clip.detach()
    else:
        try:
            array = np.asarray(clip)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{name} is not an array of samples: {error}") from None
        if array.dtype == object:
            raise ValueError(f"{name} is not an array of samples (ragged or non-numeric)")
        tensor = torch.from_numpy(np.ascontiguousarray(array)) if array.dtype.kind in "fiub" else None
        if tensor is None:
            raise ValueError(f"{name} has samples of type {array.dtype}, expected floats")
        if isinstance(clip, (list, tuple)) and not tensor.dtype.is_floating_point:
            tensor = tensor.float()  # a Python list of numbers
    if tensor.dim() != 1:
        raise ValueError(
            f"{name} must be mono, one dimension of samples; got shape {tuple(tensor.shape)} "
            "(mix or pick a channel first)"
        )
    if not tensor.dtype.is_floating_point:
        raise ValueError(
            f"{name} has {tensor.dtype} samples, expected floats in [-1, 1] (divide 16-bit PCM by 32768)"
        )
    samples = tensor.shape[0]
    if samples < FRAME_LENGTH:
        raise ValueError(f"{name} has {samples} samples, fewer than one {FRAME_LENGTH}-sample frame (at least "
                         f"{MIN_SAMPLES}, 35 ms at 16 kHz, are needed)")
    if samples < MIN_SAMPLES:
        raise ValueError(
            f"{name} has {samples} samples, a single frame (fewer than {MIN_SAMPLES}, 35 ms at 16 kHz): its "
            f"per-bin variance is undefined (transformers returns NaN features); give at least {MIN_SAMPLES} samples"
        )
    if tensor.device.type == "cpu" and tensor.dtype != torch.bfloat16:
        # numpy on the calling thread (see _place_on_host); min and max are NaN when any sample is NaN
        array = np.asarray(tensor.numpy(), dtype=np.float32)
        peak = float(np.maximum(-array.min(), array.max()))
        tensor = torch.from_numpy(array)
    else:
        tensor = tensor.to(torch.float32)
        # one pass, no copy, one sync for both checks: aminmax gives NaN for both ends when any sample is NaN
        low, high = torch.aminmax(tensor)
        peak = float(torch.maximum(-low, high))
    if not math.isfinite(peak):
        raise ValueError(f"{name} contains NaN or Inf samples")
    if peak > MAX_ABS_SAMPLE:
        raise ValueError(
            f"{name} has a sample of magnitude {peak:.3g}, above {MAX_ABS_SAMPLE:.0e}: its fp32 power "
            "spectrum would overflow to Inf and the features to NaN; samples are expected in [-1, 1]"
        )
    return tensor
