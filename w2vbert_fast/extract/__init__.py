"""The bulk-extraction application: audio files → one layer's hidden states per clip (one safetensors file per
clip, or shards of many), batched by length, pipelined (decode threads → device → writer threads), resumable, one
process or many under torchrun. Never imports transformers, nor the command line: ``extract(ExtractOptions(...))``
is the whole interface, and ``load_features(out_dir)`` reads what it wrote.

What can go wrong, and what happens:
* an input that cannot be used (no permission, removed or truncated, a FIFO, undecodable, a rate outside
  1–384 kHz, a failed resampling, too short, samples beyond ±1e9, a manifest line its audio contradicts, a folder
  that cannot be entered) or a clip whose hidden states come out NaN/Inf: named with its reason in the list at the
  end, nothing written for it, the rest goes on, exit status 1;
* a fault that would fail every clip (bad option, damaged checkpoint, preprocessor settings that do not fit the
  model, output folder not writable): an ExtractError naming it and the fix, before any work (the command line
  prints it as one line, exit status 2);
* a rerun: an existing output is skipped only if it checks out (store.check_output, store.read_shards); a damaged
  or out-of-date one is redone; one written with another layer, model, dtype or source stops the run before any
  work, naming --overwrite.

Files: inputs (what to read) → ranks (this process's share) → pipeline (the options, the model it runs, resume
plan, batches, decode → features + model → writes) → store (the outputs) → ranks (the end: manifest, exit
status); audio decodes and resamples, progress counts, store reads back.
"""

import math
import sys
import time


class ExtractError(Exception):
    """A fault that would fail every clip, as opposed to one bad clip (which is listed and skipped): a bad option,
    a damaged checkpoint, an output folder that cannot be written, a full disk. Found before any work where it can
    be, else it stops the run with what was written complete. Its message names the file or option at fault and
    the fix; the command line prints it as one line and exits with status 2, so the application never needs the
    command line's error type."""


# after ExtractError: the modules below raise it (``from . import ExtractError``)
from . import inputs, pipeline, store
from .pipeline import ExtractOptions, ModelSource
from .ranks import Job
from .store import load_features

__all__ = ["ExtractError", "ExtractOptions", "ModelSource", "extract", "load_features"]


def check_options(options: ExtractOptions):
    """ExtractError for an option that would fail every clip, before any work."""
    if not (math.isfinite(options.batch_seconds) and options.batch_seconds > 0):
        raise ExtractError(f"--batch-seconds must be a positive number of seconds, got {options.batch_seconds}")
    if options.shard_size is not None and (isinstance(options.shard_size, bool) or
                                           not isinstance(options.shard_size, int) or options.shard_size < 1):
        raise ExtractError(f"--shard-size must be a positive number of clips, got {options.shard_size}")
    if isinstance(options.workers, bool) or not isinstance(options.workers, int) or options.workers < 0:
        raise ExtractError(f"--workers must be 0 (no background threads) or more, got {options.workers}")
    if options.save_dtype not in (None, *store.SAVE_DTYPES.values()):
        raise ExtractError(f"--save-dtype must be one of {', '.join(store.SAVE_DTYPES)}, got {options.save_dtype}")


def extract(options: ExtractOptions, timings=None) -> int:
    """Run the extraction; the exit status (0 all written, 1 some clip failed — on any rank under torchrun);
    ExtractError for a fault that would fail every clip. ``timings``: a dict to fill with the seconds spent per
    stage (benchmarks/bench_extract.py reads it)."""
    from .. import __version__

    started = time.perf_counter()
    job = Job.join(options.device, options.rank_timeout)  # under torchrun: this process's GPU; else one rank
    check_options(options)
    sharded = options.shard_size is not None
    store.check_output_folder(options.out)
    clips, failures = inputs.gather(options.inputs, options.list_file, options.manifest)
    if not clips and not failures:
        raise ExtractError(f"no audio files in {' '.join(options.inputs) or options.manifest or options.list_file} "
                           f"(looked for .wav, .flac, …)")
    store.check_layout(options.out, sharded)
    clips, failures = job.split(clips, failures)
    extractor = pipeline.feature_extractor(options.model)
    net, description = pipeline.load_model(options.model, job.device, options.dtype)
    pipeline.check_features(extractor, net, options.model)
    layer = pipeline.choose_layer(options.layer, net)
    settings = store.Settings(layer, options.dtype, pipeline.model_identity(options.model, net), options.save_dtype)
    work = pipeline.plan(clips, options.out, settings, net.config.hidden_size, options.overwrite, sharded)
    stored = "" if options.save_dtype in (None, options.dtype) else f", stored as {store.dtype_name(options.save_dtype)}"
    report_plan(work, len(clips) + len(failures), options.out,
                f"layer {layer} of {description} on {job.device.type}, {store.dtype_name(options.dtype)}{stored}"
                + (f"; {options.threads}" if options.threads else ""))
    failures += work.failed
    planned = time.perf_counter()
    encoder = pipeline.Encoder(extractor, net, layer, job.device, options.dtype, options.save_dtype)
    tag = store.run_tag()
    layout = pipeline.ShardLayout(options.out, tag, job.rank) if sharded else pipeline.ClipLayout(options.out, tag)
    run_metadata = {"settings": settings.metadata(), "run": {"model": description, "w2vbert_fast": __version__}}
    run = pipeline.Pipeline(encoder, layout, job, run_metadata, options.downmix, options.resample, options.workers)
    batches = pipeline.plan_batches(work.todo, options.batch_seconds, options.shard_size)
    done, failed, rows = run.run(batches, options.quiet, failed_before=len(failures))
    failures += failed
    report_end(done, work.skipped, failures, options.out)
    if timings is not None:
        timings.update(run.timings.seconds, setup=planned - started, loop=time.perf_counter() - planned,
                       clips=done)
    return job.finish(failures, options.out, work.rows + rows, layout.name)


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
