"""Turn pytest-benchmark JSON into the markdown tables of RESULTS.md.

    python benchmarks/tools/report.py benchmarks/results/*.json -o benchmarks/RESULTS.md

Files written by ``benchmarks/tools/compile_check.py`` (``compile-<triton version>.json``) become the "Compiled kernels"
section and the static cost model (``compile_report.py``, ``cost_model.py``). For the rest, reads what
``benchmarks/conftest.py``'s ``measure`` fixture records in each result's ``extra_info``:

* ``device``, ``commit``, ``torch``, ``triton``, ``cuda``: where and what ran. A result with ``cuda`` unset (or a
  device named ``cpu …``) is a CPU smoke run.
* ``case`` (one table per device and case) and ``contender`` (one row).
* ``role``: ``"reference"`` marks the contender the "vs reference" column divides by (transformers as a user runs
  it), ``"ceiling"`` a bound none should beat (SDPA without bias, a plain copy of the same bytes); other rows have
  none. "vs reference" is the speed-up, reference ms / row ms (> 1 = faster than the reference); "vs ceiling" is
  ceiling ms / row ms (1.00 = as fast as the ceiling).
* ``claim``: True for a measurement at real sizes (every GPU result; on a CPU, the cases that run the package's CPU
  path at real sizes). A CPU device's cases are split into a "CPU, real sizes" section (claims) and a "CPU smoke
  run" section (the rest, including every result recorded before the key existed).
* ``median_ms`` (CUDA-event median; pytest-benchmark's median when absent), ``tflops``, ``gbps``,
  ``peak_extra_bytes`` (peak GPU memory allocated during the calls, above what was allocated before them).
* optional, shown as columns when any row of the case has them: ``hours_audio_per_s``, ``mfu`` (over the measured
  matmul rate ``peak_tflops``), ``copy_fraction`` (over the measured copy bandwidth ``peak_gbps``), ``oom`` (ran out
  of GPU memory; ``error`` holds the allocator's message, shown under the table), ``peak_rss_bytes`` (the
  high-water resident set of a fresh process that ran only that case: CPU peak memory), ``longest_clip_s``. A CPU
  smoke run's tables leave ``mfu`` and ``copy_fraction`` out (``PEAK_FRACTIONS``); real-size claims keep them.

When the same (device, case, contender) appears in several files, the newest file (its ``datetime``) wins.
The output is generated: never edit RESULTS.md or the JSON under benchmarks/results/ by hand.
"""

import argparse
import json
import os
import sys
from collections import OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compile_report  # noqa: E402

NO_GPU_SENTENCE = (
    "No GPU results yet: nothing below says how fast the Triton kernels are. The CPU tables come in two kinds. "
    "Under *CPU, real sizes* are measurements of what the package runs on a CPU (the `auto` backend's PyTorch "
    "paths, at the model's real sizes, against transformers in the same run): those are claims. Under *CPU smoke "
    "run* the cases run at tiny sizes in fp32 to show that the benchmarks run; there \"ours\" is a PyTorch stand-in "
    "for a GPU kernel, and the figures are not speed claims. Run `python -m w2vbert_fast bench` on a GPU and commit "
    "the JSON it writes under benchmarks/results/."
)

OPTIONAL_COLUMNS = [  # (extra_info key, header, formatter)
    ("hours_audio_per_s", "h audio / s", lambda v: f"{v:,.1f}" if v >= 10 else f"{v:.3g}"),
    ("mfu", "MFU", lambda v: f"{100 * v:.1f} %"),
    ("copy_fraction", "of copy BW", lambda v: f"{100 * v:.0f} %"),
    ("peak_rss_bytes", "peak RSS (fresh process)", lambda v: fmt_bytes(v)),
    ("longest_clip_s", "longest clip", lambda v: f"{v / 60:.1f} min" if v >= 120 else f"{v:.0f} s"),
    # bench_cpu_peers.py: max |out − transformers fp32| / max |transformers fp32|; the first (compiling) call
    ("error_vs_transformers", "error vs transformers fp32", lambda v: f"{v:.1e}"),
    ("first_call_s", "first call", lambda v: f"{v:.1f} s"),
    ("load_average", "load (1 min)", lambda v: f"{v[0]:.1f}"),
]
# Fractions of a measured peak, left out of smoke runs: at their tiny sizes the peak (a large matmul, a large copy)
# and the case measure different things, and the quotient means nothing (issue 18 saw an MFU of 120.6 % and 528 % of
# copy bandwidth there).
PEAK_FRACTIONS = ("mfu", "copy_fraction")


def load(paths):
    """[(path, document)] with a ``datetime`` to order by."""
    documents = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            try:
                document = json.load(f)
            except json.JSONDecodeError as error:
                raise SystemExit(f"{path}: not JSON ({error})")
        if (compile_report.is_compile_document(document) or is_extract_document(document)
                or is_contention_document(document) or is_mask_cost_document(document)
                or is_bf16_isa_document(document)):
            # benchmarks/tools/compile_check.py output ("Compiled kernels"), benchmarks/bench_extract.py output
            # ("Extraction pipeline"), benchmarks/bench_cpu_contention.py output ("CPU under contention"),
            # benchmarks/tools/mask_cost.py output ("Cost of a key mask"), benchmarks/tools/cpu_bf16_isa.py output
            documents.append((path, document))
            continue
        if not isinstance(document, dict) or "benchmarks" not in document:
            raise SystemExit(f"{path}: not pytest-benchmark output (no 'benchmarks' list; run pytest with "
                             f"--benchmark-json=FILE) nor the output of benchmarks/tools/compile_check.py, "
                             f"benchmarks/bench_extract.py, benchmarks/bench_cpu_contention.py, "
                             f"benchmarks/tools/mask_cost.py or benchmarks/tools/cpu_bf16_isa.py")
        documents.append((path, document))
    return documents


def is_gpu(info) -> bool:
    return bool(info.get("cuda")) or not str(info.get("device", "cpu")).lower().startswith("cpu")


def median_ms(result):
    info = result["extra_info"]
    if info.get("oom"):
        return None
    if info.get("median_ms") is not None:
        return float(info["median_ms"])
    return float(result["stats"]["median"]) * 1e3


def collect(documents):
    """{device: {case: {contender: row}}} in first-seen order, the newest file winning on duplicates."""
    tables = OrderedDict()
    for path, document in sorted(documents, key=lambda item: item[1].get("datetime", "")):
        for result in document["benchmarks"]:
            info = result.get("extra_info") or {}
            if "case" not in info or "contender" not in info:
                continue  # not recorded through the measure fixture
            row = dict(info, median=median_ms(result), file=os.path.basename(path),
                       datetime=document.get("datetime", ""))
            device = info.get("device") or "unknown device"
            tables.setdefault(device, OrderedDict()).setdefault(info["case"], OrderedDict())[info["contender"]] = row
    return tables


def fmt_bytes(n):
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def fmt_ms(ms):
    if ms is None:
        return "OOM"
    return f"{ms:,.0f}" if ms >= 1000 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return "—"
    return f"{numerator / denominator:.2f}×"


def case_table(rows, smoke=False) -> list:
    """Markdown lines for one case; ``smoke``: a CPU smoke run's (no PEAK_FRACTIONS columns)."""
    reference = next((r for r in rows.values() if r.get("role") == "reference"), None)
    ceiling = next((r for r in rows.values() if r.get("role") == "ceiling"), None)
    columns = ["contender", "median ms", "vs reference", "vs ceiling", "TFLOP/s", "GB/s", "peak memory"]
    optional = [c for c in OPTIONAL_COLUMNS if any(r.get(c[0]) is not None for r in rows.values())
                and not (smoke and c[0] in PEAK_FRACTIONS)]
    has_oom = any(r.get("oom") for r in rows.values())
    if not any(r.get("tflops") is not None for r in rows.values()):
        columns.remove("TFLOP/s")
    if not any(r.get("gbps") is not None for r in rows.values()):
        columns.remove("GB/s")
    if ceiling is None:
        columns.remove("vs ceiling")
    header = columns + [c[1] for c in optional] + (["OOM"] if has_oom else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    notes = []
    for name, row in rows.items():
        label = name + (" (reference)" if row.get("role") == "reference" else
                        " (ceiling)" if row.get("role") == "ceiling" else "")
        ms = row["median"]
        cells = {
            "contender": label.replace("|", "\\|"),
            "median ms": fmt_ms(ms),
            "vs reference": ratio(reference["median"] if reference else None, ms),
            "vs ceiling": ratio(ceiling["median"] if ceiling else None, ms),
            "TFLOP/s": "—" if row.get("tflops") is None else f"{row['tflops']:.3g}",
            "GB/s": "—" if row.get("gbps") is None else f"{row['gbps']:.3g}",
            "peak memory": fmt_bytes(row.get("peak_extra_bytes")),
        }
        line = [cells[c] for c in columns]
        line += ["—" if row.get(key) is None else f(row[key]) for key, _, f in optional]
        if has_oom:
            line.append("**out of memory**" if row.get("oom") else "")
        lines.append("| " + " | ".join(line) + " |")
        if row.get("oom") and row.get("error"):
            notes.append(f"{name}: {row['error']}")
    if reference is None:
        lines.append("")
        lines.append("_No contender has role \"reference\" in this case: no speed-ups._")
    elif reference["median"] is None:
        lines.append("")
        lines.append("_The reference ran out of memory: no speed-ups._")
    for note in notes:
        lines.append("")
        lines.append(f"- {note}")
    return lines


def provenance(row) -> str:
    versions = ", ".join(f"{k} {row[k]}" for k in ("torch", "triton", "cuda", "transformers") if row.get(k))
    commit = (row.get("commit") or "unknown")[:12] + (" (dirty tree)" if row.get("dirty") else "")
    return f"{versions}; commit `{commit}`; recorded {row['datetime'][:19]} (`{row['file']}`)."


def device_section(device, kind, cases, smoke=False) -> list:
    """One ``## device (kind)`` section: where it ran, then a table per case; a case recorded by another run than
    the section's first says so under its heading. ``smoke``: a CPU smoke run (see ``case_table``)."""
    sample = next(iter(next(iter(cases.values())).values()))
    out = [f"## {device} ({kind})", "", provenance(sample), ""]
    for case, contenders in cases.items():
        out.append(f"### {case}")
        out.append("")
        runs = {provenance(r) for r in contenders.values()}
        if runs != {provenance(sample)}:
            out += [f"_{run}_" for run in sorted(runs)] + [""]
        out += case_table(contenders, smoke)
        out.append("")
    return out


def is_extract_document(document) -> bool:
    return isinstance(document, dict) and {"environment", "contenders", "clips"} <= set(document)


def extract_section(path, document):
    """benchmarks/bench_extract.py's run: one row per contender (the extract loop before, serial, pipelined)."""
    env = document["environment"]
    out = [f"## Extraction pipeline ({env.get('device', '?')}, `{os.path.basename(path)}`)", "",
           f"{document['clips']} clips, {document.get('audio_minutes', '?')} min of audio; commit `{env.get('commit')}`, "
           f"torch {env.get('torch')}, {env.get('cores', '?')} cores, load before the run "
           f"{document.get('load_before', '?')}. {document.get('note', '')}", "",
           "| contender | wall s | model forward s | clips / s | × real time | host work ms / clip |",
           "|---|---:|---:|---:|---:|---:|"]
    for name, row in document["contenders"].items():
        out.append(f"| {name} | {row['wall_s']:.2f} | {row['forward_s']:.2f} | {row['clips_per_s']:.1f} | "
                   f"{row['x_real_time']:.0f}× | {row['host_ms_per_clip']:.1f} |")
    return out + [""]


def is_contention_document(document) -> bool:
    return isinstance(document, dict) and {"environment", "conditions", "summary", "thread_counts"} <= set(document)


def contention_section(path, document):
    """benchmarks/bench_cpu_contention.py's run: one row per (condition, threads), median ms."""
    env = document["environment"]
    loads = "; ".join(f"{name}: {c['load_before'][0]:.1f} before, {c['load_after'][0]:.1f} after"
                      for name, c in document["conditions"].items())
    out = [f"## CPU under contention ({env.get('cores', '?')} cores, `{os.path.basename(path)}`)", "",
           f"Commit `{str(env.get('commit'))[:12]}`, torch {env.get('torch')}; 'before' is `{env.get('before')}`; "
           f"'loaded' = {document.get('busy_processes', '?')} busy-loop processes beside it; load average (1 min) "
           f"{loads}. Median ms; the encoder speed-up is transformers' time over ours, from the medians and (*per "
           f"round*, where the run alternated them) the median of each round's ratio. {document.get('note', '')}",
           "", "| condition, threads | FbankExtractor | FbankExtractor before | transformers extractor | encoder ours | "
               "encoder transformers sdpa | encoder speed-up | per round |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in document["summary"].items():
        cells = [row.get(key) for key in ("FbankExtractor", "FbankExtractor before", "transformers extractor",
                                          "encoder ours", "encoder transformers sdpa")]
        ratios = [row.get("encoder speed-up"), row.get("encoder speed-up, median per round")]
        out.append(f"| {name} | " + " | ".join("—" if c is None else fmt_ms(c) for c in cells) + " | " +
                   " | ".join("—" if r is None else f"{r:.2f}×" for r in ratios) + " |")
    return out + [""]


def is_mask_cost_document(document) -> bool:
    return isinstance(document, dict) and {"what", "shape", "results", "rounds"} <= set(document) \
        and "forward" in document.get("results", {})


def mask_cost_section(path, document):
    """benchmarks/tools/mask_cost.py's run: one row per (pass, mask form), median ms and the ratio to lengths."""
    shape = document["shape"]
    out = [f"## Cost of a key mask ({document.get('device')}, {document.get('dtype')}, `{os.path.basename(path)}`)",
           "", f"{document['what']}. Commit `{document.get('commit')}`, torch {document.get('torch')}, "
               f"{document.get('threads')} threads, {document['rounds']} alternating rounds; B={shape.get('batch')}, "
               f"L={shape.get('length')}, H={shape.get('heads')}, D={shape.get('head_dim')}, real frames "
               f"{shape.get('real_frames')}; load average (1 min) {document['load_average_before'][0]:.1f} before, "
               f"{document['load_average_after'][0]:.1f} after.", "",
           "| pass | mask form | median ms | min ms | vs lengths |", "|---|---|---:|---:|---:|"]
    for direction, forms in document["results"].items():
        for form, row in forms.items():
            out.append(f"| {direction} | {form} | {fmt_ms(row['median_ms'])} | {fmt_ms(row['min_ms'])} | "
                       f"{row['ratio_to_lengths']:.2f}× |")
    return out + [""]


def is_bf16_isa_document(document) -> bool:
    return isinstance(document, dict) and {"environment", "options", "caps", "caveat"} <= set(document)


def bf16_isa_section(path, document):
    """benchmarks/tools/cpu_bf16_isa.py's run: one row per instruction-set cap."""
    env, options = document["environment"], document["options"]
    out = [f"## bf16 on a CPU, by instruction set ({env.get('cores')} cores, `{os.path.basename(path)}`)", "",
           f"Commit `{str(env.get('commit'))[:12]}`, torch {env.get('torch')}, {env.get('threads')} threads; "
           f"{options['layers']} full-size layers, one {options['seconds']:g} s clip, {options['rounds']} alternating "
           f"rounds, median ms; *bf16 speed-up* = fp32 time / bf16 time; *error* = max |bf16 − transformers fp32| / "
           f"max |transformers fp32|. {document['caveat']}.", "",
           "| oneDNN cap | ours fp32 | ours bf16 | ours bf16 speed-up | transformers fp32 | transformers bf16 | "
           "transformers bf16 speed-up | error ours / transformers bf16 | oneDNN bf16 matmul | load before |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for cap, run in document["caps"].items():
        r = run["results"]
        kernels = "; ".join(line.split(",")[-1] for line in run.get("onednn", {}).get("bfloat16", [])) or "—"
        out.append(f"| {cap} | {fmt_ms(r['ours, fp32']['median_ms'])} | {fmt_ms(r['ours, bf16']['median_ms'])} | "
                   f"{run['speed_up_bf16']['ours']:.2f}× | {fmt_ms(r['transformers sdpa, fp32']['median_ms'])} | "
                   f"{fmt_ms(r['transformers sdpa, bf16']['median_ms'])} | "
                   f"{run['speed_up_bf16']['transformers sdpa']:.2f}× | "
                   f"{r['ours, bf16']['error_vs_transformers_fp32']:.2g} / "
                   f"{r['transformers sdpa, bf16']['error_vs_transformers_fp32']:.2g} | {kernels} | "
                   f"{run['load_before'][0]:.1f} |")
    return out + [""]


def render(documents) -> str:
    compiled = [d for _, d in documents if compile_report.is_compile_document(d)]
    extracts = [(p, d) for p, d in documents if is_extract_document(d)]
    contentions = [(p, d) for p, d in documents if is_contention_document(d)]
    mask_costs = [(p, d) for p, d in documents if is_mask_cost_document(d)]
    bf16_isas = [(p, d) for p, d in documents if is_bf16_isa_document(d)]
    documents = [(p, d) for p, d in documents if not compile_report.is_compile_document(d)
                 and not is_extract_document(d) and not is_contention_document(d) and not is_mask_cost_document(d)
                 and not is_bf16_isa_document(d)]
    tables = collect(documents)
    files = [os.path.basename(path) for path, _ in documents]
    rows = [row for cases in tables.values() for contenders in cases.values() for row in contenders.values()]
    commits = sorted({(r.get("commit") or "unknown")[:12] + (" (dirty tree)" if r.get("dirty") else "")
                      for r in rows})
    gpu_devices = [d for d, cases in tables.items()
                   if any(is_gpu(r) for c in cases.values() for r in c.values())]
    out = ["# Benchmark results", "",
           "_Generated by `benchmarks/tools/report.py` from pytest-benchmark JSON; do not edit by hand — rerun "
           "`python benchmarks/tools/report.py benchmarks/results/*.json -o benchmarks/RESULTS.md`._", ""]
    out.append(f"- files: {', '.join(f'`{f}`' for f in files) if files else 'none'}")
    out.append(f"- commits: {', '.join(f'`{c}`' for c in commits) if commits else 'none'}")
    out.append(f"- devices: {', '.join(tables) if tables else 'none'}")
    out.append("")
    if not gpu_devices:
        out += [NO_GPU_SENTENCE, ""]
    out += ["How to read: *median ms* is the median of many timed calls (CUDA events on a GPU), warmed up, inputs "
            "rotated; *vs reference* = reference ms / contender ms (the speed-up over the row marked reference, "
            "transformers as a user runs it); *vs ceiling* = ceiling ms / contender ms (1.00× = as fast as a bound "
            "no implementation should beat); *peak memory* = GPU memory allocated at the peak of the calls, above "
            "what was allocated before (weights and inputs excluded); *MFU* = model FLOPs / time / the measured "
            "dense matmul rate of the same device in the same dtype (not shown for smoke runs, nor is the fraction "
            "of copy bandwidth: at their sizes neither measures anything); *h audio / s* = hours of audio encoded per "
            "second; *peak RSS (fresh process)* = the most resident memory of a process that ran only that case "
            "(CPU).", ""]
    for device, cases in sorted(tables.items(), key=lambda item: (item[0] not in gpu_devices, item[0])):
        if device in gpu_devices:
            sections = [("GPU", cases, False)]
        else:
            claims = OrderedDict((c, rows) for c, rows in cases.items() if any(r.get("claim") for r in rows.values()))
            smoke = OrderedDict((c, rows) for c, rows in cases.items() if c not in claims)
            sections = [("CPU, real sizes: measurements of the CPU path", claims, False),
                        ("CPU smoke run, not a speed claim", smoke, True)]
        for kind, section, is_smoke in sections:
            if section:
                out += device_section(device, kind, section, is_smoke)
    for path, document in extracts:
        out += extract_section(path, document)
    for path, document in contentions:
        out += contention_section(path, document)
    for path, document in bf16_isas:
        out += bf16_isa_section(path, document)
    for path, document in mask_costs:
        out += mask_cost_section(path, document)
    out += compile_report.render_section(compiled)
    return "\n".join(out).rstrip() + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description="pytest-benchmark JSON → RESULTS.md (markdown tables)")
    parser.add_argument("files", nargs="*", help="--benchmark-json outputs (e.g. benchmarks/results/*.json)")
    parser.add_argument("-o", "--output", help="write here (default: stdout)")
    args = parser.parse_args(argv)
    text = render(load(args.files))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
