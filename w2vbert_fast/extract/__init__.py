"""The bulk-extraction application: audio files → one safetensors file of one layer's hidden states per clip,
batched by length, resumable, one process or many under torchrun. Never imports transformers, nor the command
line: ``extract(ExtractOptions(...))`` is the whole interface.

What can go wrong, and what happens:
* an input that cannot be used (no permission, removed, a FIFO, undecodable, too short, samples beyond ±1e9, a
  folder that cannot be entered) or a clip whose hidden states come out NaN/Inf: named with its reason in the
  list at the end, nothing written for it, the rest goes on, exit status 1;
* a fault that would fail every clip (bad option, damaged checkpoint, output folder not writable): an
  ExtractError naming it and the fix, before any work (the command line prints it as one line, exit status 2);
* a rerun: an existing output is skipped only if it checks out (store.check_output); a damaged or out-of-date
  one is redone; one written with another layer, model, dtype or source stops the run before any work, naming
  --overwrite.

Files: inputs (what to read) → ranks (this process's share) → model (what runs) → pipeline (resume plan,
batches, decode → features + model → writes) → store (the outputs) → ranks (the end: manifest, exit status);
audio decodes, progress counts.
"""

import math
import sys

from .. import __version__
from . import inputs, model, pipeline, store
from .errors import ExtractError
from .model import ModelSource
from .options import ExtractOptions
from .ranks import Job

__all__ = ["ExtractError", "ExtractOptions", "ModelSource", "extract"]


def extract(options: ExtractOptions) -> int:
    """Run the extraction; the exit status (0 all written, 1 some clip failed — on any rank under torchrun);
    ExtractError for a fault that would fail every clip."""
    job = Job.join(options.device, options.rank_timeout)  # under torchrun: this process's GPU; else one rank
    if not (math.isfinite(options.batch_seconds) and options.batch_seconds > 0):
        raise ExtractError(f"--batch-seconds must be a positive number of seconds, got {options.batch_seconds}")
    store.check_output_folder(options.out)
    clips, failures = inputs.gather(options.inputs, options.list_file)
    if not clips and not failures:
        raise ExtractError(f"no audio files in {' '.join(options.inputs)} (looked for .wav, .flac, …)")
    clips, failures = job.split(clips, failures)
    extractor = model.feature_extractor(options.model)
    net, description = model.load_model(options.model, job.device, options.dtype)
    layer = model.choose_layer(options.layer, net)
    settings = store.Settings(layer, options.dtype, model.model_identity(options.model, net))
    work = pipeline.plan(clips, options.out, settings, net.config.hidden_size, options.overwrite)
    report_plan(work, len(clips) + len(failures), options.out,
                f"layer {layer} of {description} on {job.device.type}, {str(options.dtype)[6:]}")
    failures += work.failed
    encoder = pipeline.Encoder(extractor, net, layer, job.device, options.dtype)
    run = pipeline.Pipeline(encoder, job, {"model": description, "w2vbert_fast": __version__}, options.downmix,
                            options.resample)
    with model.up_to_layer(net, layer):
        done, failed = run.run(work.todo, options.batch_seconds, options.quiet, failed_before=len(failures))
    failures += failed
    report_end(done, work.skipped, failures, options.out)
    return job.finish(failures, options.out)  # 1 if any clip of the job failed (on any rank), else 0


def report_plan(work, input_count, out_dir, what):
    """Stop on conflicts (before any work); else say what will be done."""
    if work.conflicts:
        shown = "; ".join(work.conflicts[:3]) + (f"; and {len(work.conflicts) - 3} more"
                                                 if len(work.conflicts) > 3 else "")
        raise ExtractError(f"{len(work.conflicts)} existing output(s) in {out_dir} were computed differently: "
                           f"{shown}. Extract into another --out, or pass --overwrite to replace them")
    for message in work.redone:
        print(f"extract: redoing {message}", file=sys.stderr)
    redo = f" ({len(work.redone)} stale or damaged, redone)" if work.redone else ""
    print(f"extract: {input_count} inputs, {work.skipped} already written (skipped), {len(work.todo)} to do{redo}; "
          f"{what}", file=sys.stderr, flush=True)


def report_end(done, skipped, failures, out_dir):
    print(f"extract: {done} written, {skipped} skipped (already written), {len(failures)} failed -> {out_dir}",
          file=sys.stderr, flush=True)
    if failures:
        print("failed (not written; fix or remove them and rerun: written clips are skipped):", file=sys.stderr)
        for _, message in failures:
            print(f"  {message}", file=sys.stderr)
