"""The work of ``extract`` once its inputs are known: which clips are left to do (resume), batches by length,
and the batch loop — decode → features + model → writes — with failures isolated per clip.

Every stage takes and returns plain values (tasks, waves, hidden states), so each can move onto its own workers
without the others changing. A clip that cannot be decoded, fails the clip check, makes its batch raise, or
comes out NaN/Inf is listed with its reason and gets no output; the rest of its batch is written.
"""

import os
from dataclasses import dataclass, field

import torch

from ..features import check_clip
from ..ops.log_mel_fbank import SAMPLE_RATE
from . import audio, store


@dataclass(frozen=True)
class Task:
    """A clip to extract: its audio, its output, its length and rate (from the header), what its output records."""

    path: str
    out: str
    seconds: float
    rate: int
    metadata: dict


@dataclass
class Plan:
    """What a run has to do: ``todo`` tasks, how many outputs are ``skipped`` (done), the outputs ``redone``
    (stale or damaged) and in ``conflict`` (another layer, model, dtype or source), as messages, and the clips
    that already ``failed`` ([(path, message)])."""

    todo: list = field(default_factory=list)
    skipped: int = 0
    redone: list = field(default_factory=list)
    conflicts: list = field(default_factory=list)
    failed: list = field(default_factory=list)


def plan(clips, out_dir, settings: store.Settings, hidden_size, overwrite=False) -> Plan:
    """Resume: an existing output that checks out is skipped (unless ``overwrite``); every other clip whose audio
    header reads is a task."""
    result = Plan()
    for path, name in clips:
        out = store.output_path(out_dir, name)
        try:
            metadata = store.expected_metadata(path, settings)
        except OSError as error:
            result.failed.append((path, f"{path}: cannot read: {error.strerror}"))
            continue
        if os.path.exists(out) and not overwrite:
            verdict, reason = store.check_output(out, metadata, hidden_size)
            if verdict == "done":
                result.skipped += 1
                continue
            (result.conflicts if verdict == "conflict" else result.redone).append(f"{out}: {reason}")
        try:
            info = audio.audio_info(path)
        except audio.AudioError as error:
            result.failed.append((path, str(error)))
            continue
        result.todo.append(Task(path, out, info.seconds, info.sample_rate, metadata))
    return result


def plan_batches(tasks, batch_seconds):
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


class Encoder:
    """Features and model: a batch of waves → each clip's hidden states of ``layer``, its own frames only."""

    def __init__(self, extractor, model, layer, device, dtype):
        self.extractor, self.model, self.layer, self.device, self.dtype = extractor, model, layer, device, dtype

    def __call__(self, waves):
        features = self.extractor(waves, sampling_rate=SAMPLE_RATE, device=self.device)
        lengths = features["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            out = self.model(features["input_features"].to(self.dtype), attention_mask=features["attention_mask"],
                             output_hidden_states=True)
        hidden = out.hidden_states[self.layer]
        return [hidden[i, : int(length)] for i, length in enumerate(lengths)]


class Pipeline:
    """The batch loop. ``job`` counts progress (see ranks.Job); ``run_metadata`` (model description, package
    version) goes into every output."""

    def __init__(self, encoder, job, run_metadata, downmix=False, resample=False):
        self.encoder, self.job, self.run_metadata = encoder, job, run_metadata
        self.downmix, self.resample = downmix, resample

    def run(self, tasks, batch_seconds, quiet=False, failed_before=0):
        """(clips written, [(path, message)] of the clips that failed). ``failed_before``: failures of this rank
        found before the loop, counted in the progress line."""
        batches = plan_batches(tasks, batch_seconds)
        self.job.start_progress(len(batches), len(tasks), sum(task.seconds for task in tasks), quiet=quiet)
        done, audio_done, failures = 0, 0.0, []
        for number, batch in enumerate(batches, 1):
            ready, waves, bad = self.decode(batch)
            if ready:
                bad += self.encode_and_write_isolated(ready, waves)
            failures += [(task.path, message) for task, message in bad]
            written = [task for task in ready if all(task is not failed for failed, _ in bad)]
            done += len(written)
            audio_done += sum(task.seconds for task in written)
            self.job.update(number, done, audio_done, failed_before + len(failures))
        return done, failures

    def decode(self, batch):
        """(tasks decoded, their waves at 16 kHz, [(task, message)] for those that failed to decode or the check)."""
        ready, waves, bad = [], [], []
        for task in batch:
            try:
                wave, _ = audio.read_audio(task.path, SAMPLE_RATE, downmix=self.downmix, resample=self.resample)
                waves.append(check_clip(wave, task.path))
            except ValueError as error:  # AudioError is one
                bad.append((task, str(error)))
                continue
            ready.append(task)
        return ready, waves, bad

    def encode_and_write(self, batch, waves):
        """[(task, message)] for the clips whose hidden states came out NaN/Inf (not written); the rest written."""
        hint = "; try --dtype bfloat16 or float32" if self.encoder.dtype == torch.float16 else ""
        bad = []
        for task, wave, hidden in zip(batch, waves, self.encoder(waves)):
            if not bool(torch.isfinite(hidden).all()):
                bad.append((task, f"{task.path}: its hidden states came out NaN or Inf (not written){hint}"))
                continue
            self.write(task, hidden, len(wave))
        return bad

    def write(self, task, hidden_states, num_samples):
        store.write_clip(task.out, hidden_states, task.metadata, num_samples, task.rate, self.run_metadata)

    def encode_and_write_isolated(self, batch, waves):
        """encode_and_write; if the batch as a whole raises, each clip alone, so only the clips at fault fail."""
        try:
            return self.encode_and_write(batch, waves)
        except (ValueError, RuntimeError) as batch_error:
            if len(batch) == 1:
                return [(batch[0], f"{batch[0].path}: {batch_error}")]
        bad = []
        for task, wave in zip(batch, waves):
            try:
                bad += self.encode_and_write([task], [wave])
            except (ValueError, RuntimeError) as error:
                bad.append((task, f"{task.path}: {error}"))
        return bad
