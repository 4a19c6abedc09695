"""``extract``: audio files → one safetensors file of one layer's hidden states per clip, batched by length.
Never imports transformers.

What can go wrong, and what happens:
* an input that cannot be used (no permission, removed, a FIFO, undecodable, too short, samples beyond ±1e9, a
  folder that cannot be entered) or a clip whose hidden states come out NaN/Inf: named with its reason in the
  list at the end, nothing written for it, the rest goes on, exit status 1;
* a fault that would fail every clip (bad option, damaged checkpoint, output folder not writable): one line naming
  it and the fix, before any work, exit status 2;
* a rerun: an existing output is skipped only if it checks out (outputs.check_output); a damaged or out-of-date
  one is redone; one written with another layer, model, dtype or source stops the run before any work, naming
  --overwrite.
"""

import hashlib
import math
import os
import sys
import tempfile
import time

import torch

from .cli_common import SAMPLE_RATE, CommandError, feature_extractor, load_model, resolve_device_dtype
from .distributed import Ranks
from .outputs import check_output, save_hidden_states

DEFAULT_LAYER = 17  # what TTS systems take from w2v-bert-2.0's 24 layers


def gather_inputs(paths, list_file=None):
    """[(audio path, output name without extension)] and [(path, error)] for inputs that do not exist and
    folders that cannot be entered."""
    from .audio import AUDIO_EXTENSIONS

    if list_file:
        try:
            with open(list_file, encoding="utf-8") as f:
                paths = list(paths) + [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as error:
            raise CommandError(f"--list {list_file}: {error.strerror}") from None
        except UnicodeDecodeError as error:
            raise CommandError(f"--list {list_file}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                               f"{error.start}); save it as UTF-8") from None
    found, missing = [], []

    def unreadable_folder(error):
        missing.append((error.filename, f"{error.filename}: cannot enter this folder ({error.strerror}); "
                                        f"the audio in it was not extracted"))

    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path, onerror=unreadable_folder):
                dirs.sort()
                for name in sorted(files):
                    if name.lower().endswith(AUDIO_EXTENSIONS):
                        full = os.path.join(root, name)
                        found.append((full, os.path.splitext(os.path.relpath(full, path))[0]))
        elif os.path.exists(path):
            found.append((path, os.path.splitext(os.path.basename(path))[0]))
        else:
            missing.append((path, f"{path}: no such file or folder"))
    names = {}
    for path, name in found:
        if name in names and os.path.abspath(names[name]) != os.path.abspath(path):
            raise CommandError(f"{names[name]} and {path} would both be written to {name}.safetensors; "
                               f"extract them into different --out folders")
        names[name] = path
    unique = list({os.path.abspath(p): (p, n) for p, n in found}.values())
    return unique, missing


def plan_batches(clips, batch_seconds):
    """Clips sorted by length, grouped so that (longest clip in the batch) × (batch size) ≤ batch_seconds."""
    clips = sorted(clips, key=lambda clip: clip["seconds"])
    batches, current = [], []
    for clip in clips:
        if current and clip["seconds"] * (len(current) + 1) > batch_seconds:
            batches.append(current)
            current = []
        current.append(clip)
    if current:
        batches.append(current)
    return batches


def check_output_folder(folder):
    """CommandError unless files can be created in ``folder`` (made if missing): found before any work."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".w2vbert_fast-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as error:
        raise CommandError(f"--out {folder}: cannot write there ({error.strerror}); choose another folder or make "
                           f"it writable") from None


def model_identity(args, model) -> dict:
    """Output metadata that tells one model from another: a hash of its config, and the weight files' size and
    modification time (or the seed of random weights). Hashing gigabytes of weights on every run would cost
    more than it saves."""
    from .loading import checkpoint_files

    config = hashlib.sha256(model.config.to_json_string().encode()).hexdigest()
    if args.model:
        stats = [(os.path.basename(f), os.stat(f)) for f in checkpoint_files(args.model)]
        weights = ";".join(f"{name}:{st.st_size}:{st.st_mtime_ns}" for name, st in stats)
    else:
        weights = f"random {args.random_weights} seed {args.seed}"
    return {"model_config_sha256": config, "model_weights": weights}


def extract(args):
    import numpy as np

    from . import __version__
    from .audio import AudioError, audio_info, read_audio
    from .features import MAX_ABS_SAMPLE

    device, dtype = resolve_device_dtype(args)
    ranks = Ranks.from_env(device, args.rank_timeout)  # under torchrun: this process's share and GPU; else one rank
    device = ranks.device
    if not (math.isfinite(args.batch_seconds) and args.batch_seconds > 0):
        raise CommandError(f"--batch-seconds must be a positive number of seconds, got {args.batch_seconds}")
    check_output_folder(args.out)
    clips, failures = gather_inputs(args.inputs, args.list)
    if not clips and not failures:
        raise CommandError(f"no audio files in {' '.join(args.inputs)} (looked for .wav, .flac, …)")
    clips, failures = ranks.split(clips, failures)
    extractor = feature_extractor(args.model)
    model, description = load_model(args, device, dtype)
    layers = model.config.num_hidden_layers
    if args.layer is None:
        args.layer = min(DEFAULT_LAYER, layers)
    if not 0 <= args.layer <= layers:
        raise CommandError(f"--layer must be between 0 (the input to the first layer) and {layers} (the last "
                           f"layer's output) for this model, got {args.layer}")
    model.encoder.layers = model.encoder.layers[:args.layer]  # the layers after it are not needed
    log = sys.stderr
    identity = model_identity(args, model)

    todo, skipped, redone, conflicts, inputs = [], 0, [], [], len(clips) + len(failures)
    for path, name in clips:
        out = os.path.join(args.out, name + ".safetensors")
        try:
            source = os.stat(path)
        except OSError as error:
            failures.append((path, f"{path}: cannot read: {error.strerror}"))
            continue
        expected = {"layer": str(args.layer), "dtype": str(dtype)[6:], "source": os.path.abspath(path),
                    "source_size": str(source.st_size), "source_mtime_ns": str(source.st_mtime_ns), **identity}
        if os.path.exists(out) and not args.overwrite:
            verdict, reason = check_output(out, expected, model.config.hidden_size)
            if verdict == "done":
                skipped += 1
                continue
            (conflicts if verdict == "conflict" else redone).append(f"{out}: {reason}")
        try:
            info = audio_info(path)
        except AudioError as error:
            failures.append((path, str(error)))
            continue
        todo.append(dict(path=path, out=out, seconds=info.frames / info.sample_rate, rate=info.sample_rate,
                         metadata=expected))
    if conflicts:
        shown = "; ".join(conflicts[:3]) + (f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
        raise CommandError(f"{len(conflicts)} existing output(s) in {args.out} were computed differently: {shown}. "
                           f"Extract into another --out, or pass --overwrite to replace them")
    for message in redone:
        print(f"extract: redoing {message}", file=log)
    redo = f" ({len(redone)} stale or damaged, redone)" if redone else ""
    print(f"extract: {inputs} inputs, {skipped} already written (skipped), {len(todo)} to do{redo}; layer "
          f"{args.layer} of {description} on {device.type}, {str(dtype)[6:]}", file=log, flush=True)

    def run(batch, waves):
        features = extractor(waves, sampling_rate=SAMPLE_RATE, device=device)
        lengths = features["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            out = model(features["input_features"].to(dtype), attention_mask=features["attention_mask"],
                        output_hidden_states=True)
        hidden = out.hidden_states[args.layer]
        failed = []
        for i, (clip, wave) in enumerate(zip(batch, waves)):
            clip_hidden = hidden[i, : int(lengths[i])]
            if not bool(torch.isfinite(clip_hidden).all()):
                failed.append((clip, f"{clip['path']}: its hidden states came out NaN or Inf (not written)"
                               + ("; try --dtype bfloat16 or float32" if dtype == torch.float16 else "")))
                continue
            try:
                save_hidden_states(clip["out"], clip_hidden, {
                    **clip["metadata"], "sample_rate": str(SAMPLE_RATE), "source_sample_rate": str(clip["rate"]),
                    "num_samples": str(len(wave)), "model": description, "w2vbert_fast": __version__,
                })
            except OSError as error:  # a full or read-only disk fails every clip after it: stop here
                raise CommandError(f"cannot write {clip['out']} ({error.strerror}); outputs written so far are "
                                   f"complete and a rerun resumes after them") from None
        return failed

    start, done, audio_done = time.perf_counter(), 0, 0.0
    batches = plan_batches(todo, args.batch_seconds)
    ranks.progress(len(batches), todo, quiet=args.quiet)
    for number, batch in enumerate(batches, 1):
        ready, waves = [], []
        for clip in batch:
            try:
                wave, _ = read_audio(clip["path"], SAMPLE_RATE, downmix=args.downmix, resample=args.resample)
                if len(wave) < 560:  # FbankExtractor needs two 25 ms frames to normalise
                    raise AudioError(f"{clip['path']}: {len(wave)} samples is too short (at least 560, 35 ms)")
                peak = float(np.abs(wave).max())
                if peak > MAX_ABS_SAMPLE:
                    raise AudioError(f"{clip['path']}: a sample of magnitude {peak:.3g}, above {MAX_ABS_SAMPLE:.0e}, "
                                     f"would overflow the fp32 power spectrum (samples are expected in [-1, 1])")
            except AudioError as error:
                failures.append((clip["path"], str(error)))
                continue
            ready.append(clip)
            waves.append(wave)
        if ready:
            try:
                bad = run(ready, waves)
            except (ValueError, RuntimeError) as batch_error:  # find the clip(s) at fault, keep the others
                if len(ready) == 1:
                    bad = [(ready[0], f"{ready[0]['path']}: {batch_error}")]
                else:
                    bad = []
                    for clip, wave in zip(ready, waves):
                        try:
                            bad += run([clip], [wave])
                        except (ValueError, RuntimeError) as error:
                            bad.append((clip, f"{clip['path']}: {error}"))
            failures += [(clip["path"], message) for clip, message in bad]
            ready = [clip for clip in ready if all(clip is not failed for failed, _ in bad)]
        done += len(ready)
        audio_done += sum(clip["seconds"] for clip in ready)
        ranks.update(number, done, audio_done, len(failures))

    print(f"extract: {done} written, {skipped} skipped (already written), {len(failures)} failed -> {args.out}",
          file=log, flush=True)
    if failures:
        print("failed (not written; fix or remove them and rerun: written clips are skipped):", file=log)
        for _, message in failures:
            print(f"  {message}", file=log)
    return ranks.finish(failures, args.out)  # 1 if any clip of the job failed (on any rank), else 0
