"""``extract``: audio files → one safetensors file of one layer's hidden states per clip, batched by length,
resumable, unreadable files reported by name without stopping the rest. Never imports transformers."""

import os
import sys
import time

import torch

from .cli_common import SAMPLE_RATE, CommandError, feature_extractor, load_model, resolve_device_dtype


def gather_inputs(paths, list_file=None):
    """[(audio path, output name without extension)] and [(path, error)] for inputs that do not exist."""
    from .audio import AUDIO_EXTENSIONS

    if list_file:
        try:
            with open(list_file, encoding="utf-8") as f:
                paths = list(paths) + [line.strip() for line in f if line.strip() and not line.startswith("#")]
        except OSError as error:
            raise CommandError(f"--list {list_file}: {error.strerror}") from None
    found, missing = [], []
    for path in paths:
        if os.path.isdir(path):
            for root, dirs, files in os.walk(path):
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


def save_hidden_states(path, hidden_states, metadata):
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = path + ".partial"
    save_file({"hidden_states": hidden_states.contiguous().cpu()}, partial, metadata=metadata)
    os.replace(partial, path)  # a crash never leaves a file that a rerun would skip


def extract(args):
    from . import __version__
    from .audio import AudioError, audio_info, read_audio

    device, dtype = resolve_device_dtype(args)
    if args.batch_seconds <= 0:
        raise CommandError(f"--batch-seconds must be positive, got {args.batch_seconds}")
    clips, failures = gather_inputs(args.inputs, args.list)
    if not clips and not failures:
        raise CommandError(f"no audio files in {' '.join(args.inputs)} (looked for .wav, .flac, …)")
    model, description = load_model(args, device, dtype)
    layers = model.config.num_hidden_layers
    if not 0 <= args.layer <= layers:
        raise CommandError(f"--layer must be between 0 (the input to the first layer) and {layers} (the last "
                           f"layer's output) for this model, got {args.layer}")
    model.encoder.layers = model.encoder.layers[:args.layer]  # the layers after it are not needed
    extractor = feature_extractor(args.model)
    log = sys.stderr

    todo, skipped, inputs = [], 0, len(clips) + len(failures)
    for path, name in clips:
        out = os.path.join(args.out, name + ".safetensors")
        if os.path.exists(out) and not args.overwrite:
            skipped += 1
            continue
        try:
            info = audio_info(path)
        except AudioError as error:
            failures.append((path, str(error)))
            continue
        todo.append(dict(path=path, out=out, seconds=info.frames / info.sample_rate, rate=info.sample_rate))
    print(f"extract: {inputs} inputs, {skipped} "
          f"already written (skipped), {len(todo)} to do; layer {args.layer} of {description} on {device.type}, "
          f"{str(dtype)[6:]}", file=log, flush=True)

    def run(batch, waves):
        features = extractor(waves, sampling_rate=SAMPLE_RATE, device=device)
        lengths = features["attention_mask"].sum(dim=1).tolist()
        with torch.inference_mode():
            out = model(features["input_features"].to(dtype), attention_mask=features["attention_mask"],
                        output_hidden_states=True)
        hidden = out.hidden_states[args.layer]
        for i, (clip, wave) in enumerate(zip(batch, waves)):
            save_hidden_states(clip["out"], hidden[i, : int(lengths[i])], {
                "layer": str(args.layer), "source": os.path.abspath(clip["path"]),
                "sample_rate": str(SAMPLE_RATE), "source_sample_rate": str(clip["rate"]),
                "num_samples": str(len(wave)), "model": description, "dtype": str(dtype)[6:],
                "w2vbert_fast": __version__,
            })

    start, done, audio_done = time.perf_counter(), 0, 0.0
    batches = plan_batches(todo, args.batch_seconds)
    for number, batch in enumerate(batches, 1):
        ready, waves = [], []
        for clip in batch:
            try:
                wave, _ = read_audio(clip["path"], SAMPLE_RATE, downmix=args.downmix, resample=args.resample)
                if len(wave) < 560:  # FbankExtractor needs two 25 ms frames to normalise
                    raise AudioError(f"{clip['path']}: {len(wave)} samples is too short (at least 560, 35 ms)")
            except AudioError as error:
                failures.append((clip["path"], str(error)))
                continue
            ready.append(clip)
            waves.append(wave)
        if ready:
            try:
                run(ready, waves)
            except (ValueError, RuntimeError) as batch_error:  # find the clip(s) at fault, keep the others
                if len(ready) == 1:
                    failures.append((ready[0]["path"], f"{ready[0]['path']}: {batch_error}"))
                    ready = []
                else:
                    kept = []
                    for clip, wave in zip(ready, waves):
                        try:
                            run([clip], [wave])
                            kept.append(clip)
                        except (ValueError, RuntimeError) as error:
                            failures.append((clip["path"], f"{clip['path']}: {error}"))
                    ready = kept
        done += len(ready)
        audio_done += sum(clip["seconds"] for clip in ready)
        elapsed = time.perf_counter() - start
        print(f"[batch {number}/{len(batches)}] {done}/{len(todo)} clips, {audio_done / 3600:.3f} h of audio in "
              f"{elapsed:.1f} s ({audio_done / max(elapsed, 1e-9):.1f}x real time), {len(failures)} failed",
              file=log, flush=True)

    print(f"extract: {done} written, {skipped} skipped (already written), {len(failures)} failed -> {args.out}",
          file=log, flush=True)
    if failures:
        print("failed (not written; fix or remove them and rerun: written clips are skipped):", file=log)
        for _, message in failures:
            print(f"  {message}", file=log)
        return 1
    return 0
