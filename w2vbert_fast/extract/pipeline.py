"""The work of ``extract``: what it is asked, the model it runs, which clips are left to do (resume), batches by
length, and the pipeline — decode workers → features + model on the device → writers — with failures isolated
per clip.

What it is asked is an :class:`ExtractOptions`, typed values: the command line builds one from its arguments, a
program can build one directly. Frozen: ``extract`` reads it and never changes it. Its :class:`ModelSource` says
where the model comes from (a checkpoint folder, or seeded random weights of an architecture); the model is
loaded with its feature extractor, whose settings are checked against the model before any work, and its
identity (``loading.weights_identity``) is recorded with every output. A folder that cannot be used is a clear
one-line ExtractError.

Three stages, overlapped (``workers`` > 0):

* decode: each clip read, downmixed, resampled and checked in a pool of ``workers`` threads (WAV parsing, numpy
  and torch release the GIL), at most ``PREFETCH`` batches ahead of the device (a bounded queue); on CUDA into
  pinned memory, so the copies to the device are asynchronous; on a CPU, where the device is the host, each
  clip's features are computed there too (the log-mel runs per clip either way), off the model's thread;
* encode (the main thread): features (CUDA) and model on the device, the layer asked for only
  (``output_layer``), cast to the stored dtype, and each clip's finiteness as one (B,) flag tensor; on CUDA copied
  into pinned host memory with ``non_blocking`` and an event recorded — the main thread never waits for the
  device, and goes on to the next batch;
* write: a pool of threads waits for the batch's event (the one host sync per batch), slices each clip's frames
  (known on the host from its sample count) and writes them (``store``: per clip or shards), at most
  ``IN_FLIGHT`` batches behind.

``workers=0`` runs the same stages one after another on the main thread (the serial loop extract used to be;
benchmarks/bench_extract.py compares them). Outputs, resume and failures are the same either way: a clip that
cannot be decoded, fails the clip check, makes its batch raise, or comes out NaN/Inf is listed with its reason
and gets no output; the rest of its batch is written. A write that fails stops the run (ExtractError) once the
writes in flight are done.
"""

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from ..config import Wav2Vec2BertConfig
from ..features import FbankExtractor, check_clip
from ..loading import weights_identity
from ..modeling import Wav2Vec2BertModel
from ..ops.log_mel_fbank import SAMPLE_RATE
from . import ExtractError, audio, store

PREFETCH = 2  # batches decoded ahead of the device
IN_FLIGHT = 2  # batches encoded but not yet written, before the main thread waits for the writers
MAX_WRITERS = 4
DEFAULT_LAYER = 17  # what TTS systems take from w2v-bert-2.0's 24 layers


# -------------------------------------------------------------------------------- what a run is asked
@dataclass(frozen=True)
class ModelSource:
    """``folder``: a transformers-format checkpoint (config.json + model.safetensors); or, when it is None,
    seeded random weights of ``architecture`` (config.json keys) named ``name`` — for tests and quick checks."""

    folder: Optional[str] = None
    architecture: Optional[dict] = None
    name: str = ""
    seed: int = 0

    def __post_init__(self):
        if (self.folder is None) == (self.architecture is None):
            raise ValueError("ModelSource takes a checkpoint folder or a random architecture, exactly one")


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
    shard_size: Optional[int] = None  # clips per shard file (store.py); None: one file per clip
    workers: int = 4  # decode threads (and up to 4 writer threads); 0: every stage in turn on the main thread
    resample: bool = False  # clips at another rate are resampled to 16 kHz (else listed as failed)
    downmix: bool = False  # multi-channel clips are averaged to mono (else listed as failed)
    overwrite: bool = False  # replace outputs computed with another layer, model, dtype or source
    quiet: bool = False  # no progress line
    rank_timeout: float = 300.0  # under torchrun: seconds of silence after which a rank counts as lost
    threads: str = ""  # the command's torch threads and why (cli/common.py), said at the end of the start line


# ---------------------------------------------------------------------------------- the model it runs
def load_model(source: ModelSource, device, dtype):
    """(model in eval mode on ``device`` in ``dtype``, a one-line description of it)."""
    if source.folder is not None:
        try:
            model = Wav2Vec2BertModel.from_pretrained(source.folder, dtype=dtype, device=device)
        except (OSError, ValueError) as error:  # each names the file at fault and the fix
            raise ExtractError(f"--model {source.folder}: {error}") from None
        return model, f"{source.folder}"
    torch.manual_seed(source.seed)  # built on the CPU, so the same seed gives the same weights on any device
    model = Wav2Vec2BertModel(Wav2Vec2BertConfig(**source.architecture)).to(device=device, dtype=dtype).eval()
    return model, f"{source.name} architecture, random weights (seed {source.seed})"


def feature_extractor(source: ModelSource) -> FbankExtractor:
    """The checkpoint's preprocessor_config.json settings when it has one, else w2v-bert-2.0's. Padding on the
    right and the attention mask always: where the padding goes changes no clip's hidden states, and extract
    slices each clip's frames from the start."""
    folder = source.folder
    if folder and os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        try:
            return FbankExtractor.from_pretrained(folder, padding_side="right", return_attention_mask=True)
        except (OSError, ValueError, TypeError) as error:
            raise ExtractError(f"--model {folder}: {error}") from None
    return FbankExtractor()


def check_features(extractor, model, source: ModelSource):
    """ExtractError, before any work, if the extractor's rows do not fit the model's feature projection (e.g.
    ``"stride": 3`` in preprocessor_config.json: 240 values a row for a model that takes 160)."""
    width = extractor.num_mel_bins * extractor.stride
    expected = model.config.feature_projection_input_dim
    if width != expected or extractor.stride != 2:  # 2: the frame pairs store.hidden_frames counts
        where = f"--model {source.folder}: {os.path.join(source.folder, 'preprocessor_config.json')}" \
            if source.folder else "the feature extractor"
        raise ExtractError(f"{where} gives stride {extractor.stride} ({width} values a "
                           f"row) and config.json's feature_projection_input_dim is {expected}: extract takes stride 2 "
                           f"and 160 (2 × {extractor.num_mel_bins} mel bins, as w2v-bert-2.0); fix the stride or "
                           f"delete the file")


def choose_layer(requested, model) -> int:
    """The hidden state to extract (0 = after the feature projection, N = output of layer N): ``requested`` if
    this model has it; None: DEFAULT_LAYER, or the last layer of a model with fewer."""
    layers = model.config.num_hidden_layers
    layer = min(DEFAULT_LAYER, layers) if requested is None else requested
    if not 0 <= layer <= layers:
        raise ExtractError(f"--layer must be between 0 (the input to the first layer) and {layers} (the last "
                           f"layer's output) for this model, got {layer}")
    return layer


def model_identity(source: ModelSource, model) -> dict:
    """Output metadata that tells one model from another: a hash of its config, and of each weight file's bytes
    (or the seed of random weights)."""
    config = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    if source.folder is None:
        weights = f"random {source.name} seed {source.seed}"
    else:
        try:
            weights = weights_identity(source.folder)
        except ValueError as error:  # a weight file that cannot be read; the message names it
            raise ExtractError(str(error)) from None
    return {"model_config_sha256": config, "model_weights": weights}


# ------------------------------------------------------------ the work: resume, batches, the pipeline
@dataclass(frozen=True)
class Task:
    """A clip to extract: its audio, its output's name (and file, per clip), its length and rate (from the header
    or a manifest: ``claimed`` ones are checked against the decoded audio)."""

    path: str
    name: str
    out: Optional[str]
    seconds: float
    rate: Optional[int]
    claimed: bool = False


@dataclass
class Plan:
    """What a run has to do: ``todo`` tasks, how many outputs are ``skipped`` (done) and their manifest ``rows``,
    the outputs ``redone`` (stale or damaged) and in ``conflict`` (another layer, model, dtype or source), as
    messages, and the clips that already ``failed`` ([(path, message)])."""

    todo: list = field(default_factory=list)
    skipped: int = 0
    rows: list = field(default_factory=list)
    redone: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)
    failed: list = field(default_factory=list)


def plan(clips, out_dir, settings: store.Settings, hidden_size, overwrite=False, sharded=False) -> Plan:
    """Resume: an existing output that checks out is skipped (unless ``overwrite``); every other clip whose length
    is known (from its manifest line, else its header) is a task. Per clip, the output folder is listed once and
    only the clips with an output are stat'ed; sharded, only the shards' headers are read."""
    result = Plan()
    wanted = settings.metadata()
    if sharded:
        stored, damaged = store.read_shards(out_dir)
        for path, reason in damaged:
            try:
                aside = store.set_aside(path)
            except FileNotFoundError:  # another rank set it aside first
                aside = path[: -len(".safetensors")] + ".damaged"
            result.redone.append(f"{reason} (set aside as {os.path.basename(aside)}; its clips are redone)")
    else:
        stored = store.existing_outputs(out_dir)
    for clip in clips:
        out = None if sharded else store.output_path(out_dir, clip.name)
        if clip.name in stored and not overwrite:
            try:
                expected = {**wanted, **store.source_metadata(clip.path)}
            except OSError as error:
                result.failed.append((clip.path, f"{clip.path}: cannot read: {error.strerror}"))
                continue
            if sharded:
                entry = stored[clip.name]
                where = f"{entry.shard} [{clip.name}]"
                verdict, reason = store.check_metadata(entry.metadata, expected, hidden_size, entry.shape, entry.dtype)
                metadata, output, key = entry.metadata, entry.shard, clip.name
            else:
                where = out
                verdict, reason, metadata = store.check_output(out, expected, hidden_size)
                output, key = out, None
            if verdict == "done":
                result.skipped += 1
                result.rows.append(store.manifest_row(clip.path, os.path.relpath(output, out_dir),
                                                      int(metadata["num_samples"]), key))
                continue
            (result.conflicts if verdict == "conflict" else result.redone).append(f"{where}: {reason}")
        if clip.seconds is not None:
            result.todo.append(Task(clip.path, clip.name, out, clip.seconds, clip.rate, claimed=True))
            continue
        try:
            info = audio.audio_info(clip.path)
        except audio.AudioError as error:
            result.failed.append((clip.path, str(error)))
            continue
        result.todo.append(Task(clip.path, clip.name, out, info.seconds, info.sample_rate))
    return result


@dataclass(frozen=True)
class Batch:
    number: int
    tasks: list
    closes_shard: bool = False  # its writes complete a shard (the shard layout)


def by_length(tasks, batch_seconds):
    """Tasks sorted by length, grouped so that (longest clip in the batch) × (batch size) ≤ batch_seconds."""
    batches, current = [], []
    for task in sorted(tasks, key=lambda task: task.seconds):
        if current and task.seconds * (len(current) + 1) > batch_seconds:
            batches.append(current)
            current = []
        current.append(task)
    if current:
        batches.append(current)
    return batches


def plan_batches(tasks, batch_seconds, shard_size=None):
    """[Batch]: per clip, every task batched by length; sharded, ``shard_size`` tasks at a time (in input order),
    each group batched by length, its last batch closing its shard (so a shard is written as soon as it is done,
    and at most a shard's hidden states wait in memory)."""
    groups = [tasks] if shard_size is None else [tasks[i:i + shard_size] for i in range(0, len(tasks), shard_size)]
    batches = []
    for group in groups:
        grouped = by_length(group, batch_seconds)
        for i, tasks_of_batch in enumerate(grouped):
            batches.append(Batch(len(batches) + 1, tasks_of_batch,
                                 closes_shard=shard_size is not None and i == len(grouped) - 1))
    return batches


class Timings:
    """Seconds spent per stage, summed over threads (a stage in a pool may add up to more than the wall time)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seconds = {}

    def add(self, stage, seconds):
        with self.lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


class Encoder:
    """Features and model: a batch of clips → (B, T, hidden) hidden states of ``layer`` in ``save_dtype`` and a
    (B,) flag per clip, True where its frames are all finite — both still on the device, nothing waited for.

    On a CPU each clip's features are computed where it is decoded (:meth:`clip_features`, in the decode threads:
    the log-mel runs per clip anyway, so the values are the batched call's) and the batch only pads them; on CUDA
    the batch's features are computed on the device, on a stream of their own."""

    def __init__(self, extractor, model, layer, device, dtype, save_dtype=None, timings=None):
        self.extractor, self.model, self.layer, self.device, self.dtype = extractor, model, layer, device, dtype
        self.save_dtype = save_dtype or dtype
        self.timings = timings or Timings()
        self.features_per_clip = device.type == "cpu"
        # FbankExtractor builds small index tensors from host lists (a stream sync each): on their own stream they
        # wait for the last batch's features, not for its model
        self.feature_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def clip_features(self, wave):
        """One clip's (rows, 160) features and (rows,) mask, on the CPU, as a batch of it alone gives them."""
        batch = self.extractor([wave], sampling_rate=SAMPLE_RATE)
        return batch["input_features"][0], batch["attention_mask"][0]

    def padded(self, features):
        """[(rows, 160), (rows,)] → the batch the extractor would have made of those clips: rows padded with its
        padding value, masks with 0."""
        rows = max(f.shape[0] for f, _ in features)
        batch = torch.full((len(features), rows, features[0][0].shape[1]), float(self.extractor.padding_value))
        mask = torch.zeros(len(features), rows, dtype=features[0][1].dtype)
        for i, (f, m) in enumerate(features):
            batch[i, : f.shape[0]] = f
            mask[i, : m.shape[0]] = m
        return {"input_features": batch, "attention_mask": mask}

    def batch_features(self, waves):
        if self.feature_stream is None:
            return self.extractor(waves, sampling_rate=SAMPLE_RATE, device=self.device)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.feature_stream):
            batch = self.extractor(waves, sampling_rate=SAMPLE_RATE, device=self.device)
        main.wait_stream(self.feature_stream)
        for tensor in batch.values():
            tensor.record_stream(main)
        return batch

    def __call__(self, clips):
        """``clips``: [Decoded], with features (CPU) or waves (CUDA)."""
        start = time.perf_counter()
        if self.features_per_clip:
            batch = self.padded([clip.features for clip in clips])
        else:
            batch = self.batch_features([clip.wave for clip in clips])
        features, mask = batch["input_features"], batch["attention_mask"]
        middle = time.perf_counter()
        with torch.inference_mode():
            hidden = self.model(features.to(self.dtype), attention_mask=mask, output_layer=self.layer)
            hidden = hidden.last_hidden_state.to(self.save_dtype)
            bad_frames = ~torch.isfinite(hidden).all(dim=-1) & mask.bool()
            finite = ~bad_frames.any(dim=1)
        self.timings.add("features", middle - start)
        self.timings.add("model", time.perf_counter() - middle)
        return hidden, finite


@dataclass
class Decoded:
    """One clip after the decode stage: its samples at 16 kHz (or, on a CPU, its features) and its source's
    metadata, or why it failed."""

    task: Task
    samples: int = 0
    source: Optional[dict] = None  # source real path, size, mtime, sample rate
    wave: Optional[torch.Tensor] = None
    features: Optional[tuple] = None  # (rows, 160) features, (rows,) mask
    error: Optional[str] = None


@dataclass
class Part:
    """Clips encoded together (a batch, or one clip when its batch raised): their hidden states and finiteness
    flags on the host, valid once ``ready`` (a CUDA event; None: already) has happened."""

    clips: list  # [Decoded]
    hidden: torch.Tensor
    finite: torch.Tensor
    ready: Optional[object] = None


class Inline:
    """An executor that runs each call when it is submitted: the serial mode (``workers=0``) of the same loop."""

    def submit(self, fn, *args):
        future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as error:  # noqa: BLE001 - handed to whoever takes the result, as a pool would
            future.set_exception(error)
        return future

    def shutdown(self, wait=True, cancel_futures=False):
        pass


class ClipLayout:
    """One file per clip: a batch's clips are written as they come, their folders fsynced once per batch."""

    name = "clips"

    def __init__(self, out_dir, tag):
        self.out_dir, self.tag = out_dir, tag

    def store(self, items, run_metadata):
        """Write ``items`` ([(Decoded, hidden)]); their manifest rows."""
        rows, folders = [], set()
        for clip, hidden in items:
            task, samples = clip.task, clip.samples
            metadata = store.clip_metadata({**run_metadata["settings"], **clip.source}, samples,
                                           clip.source["source_sample_rate"], run_metadata["run"])
            store.write_clip(task.out, hidden, metadata, f"{task.out}.{self.tag}.partial")
            folders.add(os.path.dirname(task.out))
            rows.append(store.manifest_row(task.path, os.path.relpath(task.out, self.out_dir), samples))
        for folder in sorted(folders):
            store.fsync_folder(folder)
        return rows


class ShardLayout:
    """Shards: a batch's clips are kept (copied out of the batch's buffer) until their shard is complete."""

    name = "shards"

    def __init__(self, out_dir, tag, rank):
        self.out_dir, self.tag = out_dir, tag
        self.names = store.ShardNames(out_dir, rank, tag)

    def store(self, items, run_metadata):
        return [(clip, hidden.clone()) for clip, hidden in items]

    def write(self, items, run_metadata):
        """One shard of ``items`` ([(Decoded, hidden)]); their manifest rows."""
        path = self.names.next()
        clips = [(clip.task.name, hidden, {**clip.source, "num_samples": str(clip.samples)})
                 for clip, hidden in items]
        store.write_shard(path, clips, run_metadata["settings"], run_metadata["run"], self.tag)
        output = os.path.relpath(path, self.out_dir)
        return [store.manifest_row(clip.task.path, output, clip.samples, clip.task.name) for clip, _ in items]

    def close(self):
        store.fsync_folder(store.shard_folder(self.out_dir))


class Pipeline:
    """The stages above. ``job`` counts progress (see ranks.Job); ``run_metadata``: {"settings": the settings'
    metadata, "run": model description and package version}, recorded with every clip."""

    def __init__(self, encoder, layout, job, run_metadata, downmix=False, resample=False, workers=4):
        self.encoder, self.layout, self.job, self.run_metadata = encoder, layout, job, run_metadata
        self.downmix, self.resample, self.workers = downmix, resample, workers
        self.timings = encoder.timings
        self.pin = encoder.device.type == "cuda"

    # --------------------------------------------------------------------------------------------- stages
    def decode(self, task) -> Decoded:
        """A clip read and checked; any failure (an unreadable file, a failed resampling, even out of memory) is
        this clip's alone."""
        start = time.perf_counter()
        try:
            try:
                source = store.source_metadata(task.path)  # the version about to be read
            except FileNotFoundError:
                return Decoded(task, error=f"{task.path}: no such file (removed while the run goes?)")
            except OSError as error:
                return Decoded(task, error=f"{task.path}: cannot read: {error.strerror}")
            samples, rate = audio.read_clip(task.path, SAMPLE_RATE, downmix=self.downmix, resample=self.resample)
            claim = task.claimed and self.claim_mismatch(task, samples.shape[0], rate)
            if claim:
                return Decoded(task, error=claim)
            wave = check_clip(samples, task.path)
            source = {**source, "source_sample_rate": str(rate)}
            if self.encoder.features_per_clip:
                middle = time.perf_counter()
                features = self.encoder.clip_features(wave)
                self.timings.add("features", time.perf_counter() - middle)
                start += time.perf_counter() - middle  # counted as features, not decode
                return Decoded(task, wave.shape[0], source, features=features)
            return Decoded(task, wave.shape[0], source, wave=wave.pin_memory() if self.pin else wave)
        except ValueError as error:  # AudioError is one, and the clip check's
            return Decoded(task, error=str(error))
        except MemoryError:
            return Decoded(task, error=f"{task.path}: out of memory while decoding it")
        except Exception as error:  # noqa: BLE001 - a decoder's own fault is still one clip's
            return Decoded(task, error=f"{task.path}: cannot decode ({type(error).__name__}: {error})")
        finally:
            self.timings.add("decode", time.perf_counter() - start)

    @staticmethod
    def claim_mismatch(task, samples, rate) -> Optional[str]:
        """Why a manifest's duration or rate does not fit the decoded clip (None: it does). A duration is taken
        as right within 2 % or 0.1 s: manifests round them."""
        if task.rate is not None and task.rate != rate:
            return f"{task.path}: sample rate {rate} Hz, its manifest line says {task.rate} Hz (fix the manifest)"
        seconds = samples / SAMPLE_RATE
        if abs(seconds - task.seconds) > max(0.1, 0.02 * task.seconds):
            return (f"{task.path}: holds {seconds:.3f} s of audio, its manifest line says {task.seconds:g} s (fix "
                    f"the manifest: batches are sized from it)")
        return None

    def encode(self, decoded):
        """([Part], [(task, message)]): the batch's decoded clips through the encoder; if the batch as a whole
        raises, each clip alone, so only the clips at fault fail."""
        clips = [clip for clip in decoded if clip.error is None]
        if not clips:
            return [], []
        try:
            return [self.encode_part(clips)], []
        except (ValueError, RuntimeError) as batch_error:
            if len(clips) == 1:
                return [], [(clips[0].task, f"{clips[0].task.path}: {batch_error}")]
        parts, bad = [], []
        for clip in clips:
            try:
                parts.append(self.encode_part([clip]))
            except (ValueError, RuntimeError) as error:
                bad.append((clip.task, f"{clip.task.path}: {error}"))
        return parts, bad

    def encode_part(self, clips) -> Part:
        hidden, finite = self.encoder(clips)
        for clip in clips:  # their copies to the device are queued: the host memory can go (pinned: when done)
            clip.wave = clip.features = None
        if hidden.device.type != "cuda":
            return Part(clips, hidden, finite)
        start = time.perf_counter()
        host = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        host.copy_(hidden, non_blocking=True)
        flags = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        flags.copy_(finite, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        self.timings.add("copy", time.perf_counter() - start)
        return Part(clips, host, flags, ready)

    def finish(self, parts):
        """(what the layout keeps or wrote, [(task, message)] for the NaN/Inf clips): in a writer thread."""
        start = time.perf_counter()
        hint = "; try --dtype bfloat16 or float32" if torch.float16 in (self.encoder.dtype, self.encoder.save_dtype) \
            else ""
        items, bad = [], []
        for part in parts:
            if part.ready is not None:
                part.ready.synchronize()  # the batch's one host sync
            for clip, finite, hidden in zip(part.clips, part.finite.tolist(), part.hidden):
                if not finite:
                    bad.append((clip.task, f"{clip.task.path}: its hidden states came out NaN or Inf (not written)"
                                           f"{hint}"))
                    continue
                items.append((clip, hidden[: store.hidden_frames(clip.samples)]))
        kept = self.layout.store(items, self.run_metadata)
        self.timings.add("write", time.perf_counter() - start)
        return kept, bad

    def write_shard(self, items):
        start = time.perf_counter()
        rows = self.layout.write(items, self.run_metadata)
        self.timings.add("write", time.perf_counter() - start)
        return rows

    # ------------------------------------------------------------------------------------------------ loop
    def run(self, batches, quiet=False, failed_before=0):
        """(clips written, [(path, message)] of the clips that failed, manifest rows of the clips written).
        ``failed_before``: failures of this rank found before the loop, counted in the progress line."""
        tasks = [task for batch in batches for task in batch.tasks]
        self.count = Count(len(tasks), sum(task.seconds for task in tasks), failed_before)
        self.job.start_progress(len(batches), len(tasks), self.count.seconds, quiet=quiet)
        serial = self.workers == 0
        decoders = Inline() if serial else ThreadPoolExecutor(self.workers, "w2vbert_fast decode")
        writers = Inline() if serial else ThreadPoolExecutor(min(self.workers, MAX_WRITERS), "w2vbert_fast write")
        self.failures, self.rows, self.shard = [], [], []
        ahead, behind, shard_writes = deque(), deque(), deque()
        self.batches, self.shard_writes = len(batches), shard_writes
        pending = iter(batches)

        def decode_ahead():
            while len(ahead) < PREFETCH:
                batch = next(pending, None)
                if batch is None:
                    return
                ahead.append((batch, [decoders.submit(self.decode, task) for task in batch.tasks]))

        try:
            decode_ahead()
            while ahead:
                batch, futures = ahead.popleft()
                decode_ahead()
                decoded = self.wait("wait_decode", lambda: [future.result() for future in futures])
                parts, bad = self.encode(decoded)
                failed = [(clip.task, clip.error) for clip in decoded if clip.error is not None] + bad
                behind.append((batch, failed, writers.submit(self.finish, parts)))
                while behind and (len(behind) > IN_FLIGHT or behind[0][2].done()):
                    self.harvest(*behind.popleft(), writers, shard_writes)
                while shard_writes and shard_writes[0][1].done():
                    self.harvest_shard(*shard_writes.popleft())
            while behind:
                self.harvest(*behind.popleft(), writers, shard_writes)
            while shard_writes:
                self.harvest_shard(*shard_writes.popleft())
        finally:
            decoders.shutdown(wait=True, cancel_futures=True)
            writers.shutdown(wait=True)  # writes in flight finish whole, even when the run stops
            if isinstance(self.layout, ShardLayout):
                self.layout.close()
        return self.count.written, self.failures, self.rows

    def wait(self, stage, get):
        start = time.perf_counter()
        try:
            return get()
        finally:
            self.timings.add(stage, time.perf_counter() - start)

    def harvest(self, batch, failed, future, writers, shard_writes):
        """A batch's writes are done (or kept for its shard): count them, list its failures, close its shard."""
        kept, bad = self.wait("wait_write", future.result)
        failed = failed + bad
        self.failures += [(task.path, message) for task, message in failed]
        self.count.fail(failed)
        if isinstance(self.layout, ShardLayout):
            self.shard += kept
            if batch.closes_shard and self.shard:
                shard_writes.append((self.shard, writers.submit(self.write_shard, self.shard)))
                self.shard = []
        else:
            self.rows += kept
            self.count.wrote([task for task in batch.tasks if all(task is not bad_task for bad_task, _ in failed)])
        self.count.batches_done += 1
        self.show()

    def harvest_shard(self, items, future):
        """A shard is written: its clips count as written."""
        self.rows += self.wait("wait_write", future.result)
        self.count.wrote([clip.task for clip, _ in items])
        self.show()

    def show(self):
        count = self.count
        final = count.batches_done == self.batches and not self.shard and not self.shard_writes
        self.job.update(count.batches_done, count.written, count.seconds_done, count.failed, clips=count.clips,
                        seconds=count.seconds, final=final)


class Count:
    """The loop's counters: clips and audio seconds written, and the totals still to do — a clip that fails leaves
    the totals, so a finished run reads N/N clips with its failures beside them."""

    def __init__(self, clips, seconds, failed):
        self.clips, self.seconds, self.failed = clips, seconds, failed
        self.written, self.seconds_done, self.batches_done = 0, 0.0, 0

    def fail(self, failed):
        self.failed += len(failed)
        self.clips -= len(failed)
        self.seconds = max(self.seconds - sum(task.seconds for task, _ in failed), 0.0)

    def wrote(self, tasks):
        self.written += len(tasks)
        self.seconds_done += sum(task.seconds for task in tasks)
