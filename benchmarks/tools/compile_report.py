"""The "Compiled kernels" section of RESULTS.md, from benchmarks/tools/compile_check.py's JSON (one document per
triton version): which path each GPU arch gets (the dispatch table, ops/_backend.py), the compile tables per kernel,
and the static cost model (benchmarks/tools/cost_model.py) beside them."""

from collections import OrderedDict

import cost_model

MODEL_SHAPE = "w2v-bert-2.0"
TARGET_ORDER = ("sm_90a", "sm_80", "sm_86", "sm_89", "sm_75")  # the compile check's, newest first
GPUS = {"sm_90a": "H100, H200", "sm_80": "A100, A30", "sm_86": "A10, A40, RTX 30xx", "sm_89": "L4, L40, RTX 40xx",
        "sm_75": "T4, RTX 20xx"}
DTYPE_SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def is_compile_document(document) -> bool:
    return isinstance(document, dict) and "compile_check" in document and "records" in document


def _config_label(config):
    meta = ", ".join(f"{k}={v}" for k, v in config.items() if k not in ("num_warps", "num_stages", "num_ctas",
                                                                         "maxnreg"))
    stages = f", {config['num_stages']} st" if "num_stages" in config else ""
    cap = f", ≤ {config['maxnreg']} regs" if config.get("maxnreg") else ""
    return f"{meta}; {config.get('num_warps')} w{stages}{cap}"


def _cell(record):
    if record is None:
        return "—"
    if not record["ok"]:
        return "**compile error**"
    spill = record["spill_stores"] or record["spill_loads"]
    text = (f"{record['registers']} · {record['shared_bytes'] / 1024:.0f} KB · {record['occupancy']['warps_per_sm']}"
            + (f" · **spill {record['spill_stores']}/{record['spill_loads']} B**" if spill else ""))
    text += " ✗" if record.get("failures") and not spill else ""
    return text + (" → portable" if record.get("routed") else "")


def _targets(documents):
    """The targets the documents compiled for, in TARGET_ORDER (sm_90a and sm_80 always: the first tables')."""
    seen = {r["target"] for d in documents for r in d["records"]} | {"sm_90a", "sm_80"}
    return [t for t in TARGET_ORDER if t in seen] + sorted(seen - set(TARGET_ORDER))


def _columns(documents):
    """[(label, triton version, target)] in a stable order: newest triton first, then TARGET_ORDER."""
    versions = sorted({d["compile_check"]["triton"] for d in documents}, key=_version_key, reverse=True)
    return [(f"triton {v}, {t}", v, t) for v in versions for t in _targets(documents)]


def _version_key(version):
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def _index(documents):
    """{(triton, kernel, target, dtype, shape, config label): record} and the kernels in first-seen order."""
    index, kernels = {}, OrderedDict()
    for document in documents:
        version = document["compile_check"]["triton"]
        for r in document["records"]:
            label = _config_label(r["config"])
            index[(version, r["kernel"], r["target"], r["dtype"], r["shape"], label)] = r
            kernels.setdefault(r["kernel"], OrderedDict())[(label, r["dtype"])] = r["module"]
    return index, kernels


def _instruction_facts(records):
    """[(target and dtype, sentence on the machine code)] of one kernel's compiles at the model's shapes."""
    lines = []
    ok = [r for r in records if r["ok"]]
    by = OrderedDict()
    for r in ok:
        by.setdefault((r["target"], r["dtype"]), []).append(r)
    for (target, dtype), group in by.items():
        ops = sorted({op for r in group for op in r["sass"]["tensor_core"]})
        dots = OrderedDict()
        for r in group:
            for dot in r["sass"]["dots"]:
                entry = dots.setdefault(dot["line"], [dot["source"], 0, 0])
                entry[1 if dot["mma"] else 2] += 1
        fp64 = sorted({line for r in group for line in r["sass"]["fp64_lines"]})
        fp64_count = sum(sum(r["sass"]["fp64_arithmetic"].values()) for r in group)
        local = sum(r["sass"]["local_memory_instructions"] for r in group)
        parts = []
        if dots:
            on = [f"line {line}" for line, (_, yes, no) in dots.items() if yes and not no]
            off = [f"line {line} (`{src[:60]}`)" for line, (src, yes, no) in dots.items() if no]
            if on:
                parts.append(f"tl.dot on tensor cores in every config at {', '.join(on)}")
            flagged = any("without tensor-core MMA" in why for r in group for why in r.get("failures", []))
            if off and dtype == "float32" and not flagged:
                parts.append(f"tl.dot as FMA (fp32, \"ieee\" precision by design) at {', '.join(off)}")
            elif off:
                parts.append(f"tl.dot **not** on tensor cores at {', '.join(off)}")
        parts.append(f"tensor-core ops {', '.join(f'`{o}`' for o in ops)}" if ops else "no tensor-core ops")
        parts.append(f"fp64 arithmetic: {fp64_count} SASS instructions over {len(group)} configs"
                     + (f", at {'; '.join(f'`{x[:70]}`' for x in fp64[:4])}" if fp64 else "")
                     if fp64_count else "no fp64 arithmetic")
        parts.append(f"**{local} local-memory instructions**" if local else "no local memory (LDL/STL)")
        lines.append((f"{target} {DTYPE_SHORT.get(dtype, dtype)}", "; ".join(parts) + "."))
    return lines


def render_section(documents):
    """Markdown lines: the compile table per kernel, the machine-code facts, the failures, the cost model."""
    if not documents:
        return []
    documents = sorted(documents, key=lambda d: _version_key(d["compile_check"]["triton"]), reverse=True)
    columns = _columns(documents)
    index, kernels = _index(documents)
    out = ["## Compiled kernels (ahead of time, no GPU)", "",
           "_Generated from `benchmarks/results/compile-<triton version>.json`, written by "
           "`python benchmarks/tools/compile_check.py` (ptxas `-v` and the SASS of each compile; no GPU "
           "involved)._", ""]
    out += dispatch_section(documents)
    for d in documents:
        info = d["compile_check"]
        failed = len(d["failures"])
        out.append(f"- triton {info['triton']}: {len(d['records'])} compiles (plan `{info['plan']}`), commit "
                   f"`{info.get('commit') or 'unknown'}`, **{failed} failing**" if failed else
                   f"- triton {info['triton']}: {len(d['records'])} compiles (plan `{info['plan']}`), commit "
                   f"`{info.get('commit') or 'unknown'}`, all pass (no compile error, no spill, at least 12 warps "
                   f"resident per SM, shared memory within the limit, the machine-code expectations met)")
    out += ["", "Each cell: registers per thread · shared memory per block · warps resident per SM (the occupancy "
            "registers, shared memory and warps allow: 65,536 registers in 4 partitions allocated per warp in units of "
            "256; per SM 64 warps, 32 blocks and 228 KB (sm_90a) / 164 KB (sm_80) of shared memory, 48 warps, 16 / 24 "
            "blocks and 100 KB (sm_86 / sm_89), 32 warps, 16 blocks and 64 KB (sm_75); 1 KB reserved per block from "
            "sm_80). Spills are shown in bold as stored/loaded bytes per thread; ✗ marks another failure (listed "
            "below), e.g. fewer than 12 resident warps; \"→ portable\": the dispatch table runs the op's portable "
            "path there, so the compile is shown, not required to pass. \"≤ N regs\": the config caps registers "
            "(`maxnreg`). fp32 "
            "attention has configs of its own (its tf32x3 dots hold twice the operands). Shapes: head_dim 64, 16 "
            "heads, left 64 / right 8, 1024 channels, conv kernel 31, 30 s clips; "
            "every config the autotuner may pick (or the launcher uses).", ""]
    for kernel, rows in kernels.items():
        out.append(f"### `{kernel}`")
        out.append("")
        out.append("| config | dtype | " + " | ".join(c[0] for c in columns) + " |")
        out.append("|---|---|" + "---:|" * len(columns))
        for (label, dtype), _ in rows.items():
            cells = [_cell(index.get((v, kernel, t, dtype, MODEL_SHAPE, label))) for _, v, t in columns]
            if all(c == "—" for c in cells):
                continue
            out.append(f"| {label} | {DTYPE_SHORT.get(dtype, dtype)} | " + " | ".join(cells) + " |")
        out.append("")
        odd = [r for k, r in index.items() if k[1] == kernel and k[4] != MODEL_SHAPE]
        if odd:
            bad = [r for r in odd if r.get("failures")]
            out.append(f"At the odd shape (length 37, 3 heads of 24, conv kernel 5, a 1 s + 123-sample clip): "
                       f"{len(odd)} compiles, " + (f"**{len(bad)} failing**." if bad else "all pass."))
            out.append("")
        out.append("Machine code (SASS):")
        grouped = OrderedDict()  # the same facts on several versions / targets / dtypes: one line
        for d in documents:
            records = [r for r in d["records"] if r["kernel"] == kernel and r["shape"] == MODEL_SHAPE]
            for where, fact in _instruction_facts(records):
                grouped.setdefault(fact, []).append(f"{d['compile_check']['triton']} {where}")
        for fact, where in grouped.items():
            out.append(f"- triton {', '.join(where)}: {fact}")
        out.append("")
    failures = [(d["compile_check"]["triton"], f) for d in documents for f in d["failures"]]
    if failures:
        out += ["### Failures", ""]
        out += [f"- triton {v}: {f}" for v, f in failures]
        out.append("")
    routed = [(d["compile_check"]["triton"], f) for d in documents for f in d.get("routed_elsewhere", [])]
    if routed:
        out += ["### Routed to the portable path (not failures)", "",
                "What the compiler finds where the dispatch table does not send the kernels:", ""]
        out += [f"- triton {v}: {f}" for v, f in routed]
        out.append("")
    out += cost_section(documents)
    return out


def dispatch_section(documents):
    """What ``auto`` runs on each GPU arch the documents compiled for, per op and dtype, from the dispatch table as it
    is now (ops/_backend.py), with the compile results behind each Triton entry."""
    from w2vbert_fast.ops import _backend

    ops = list(_backend.TRITON_TABLE)
    out = ["### Which path each GPU gets (`auto`)", "",
           "_From the dispatch table `TRITON_TABLE` in `w2vbert_fast/ops/_backend.py`: the Triton kernels where every "
           "config compiled for that arch and dtype passes the check below, the op's portable PyTorch path elsewhere "
           "(attention: band-decomposed over PyTorch's CUDA attention kernels; conv module: PyTorch ops; fbank: the "
           "CPU fbank). No GPU has timed either path yet: which is faster on a card is unmeasured._", "",
           "| arch (GPUs) | " + " | ".join(f"`{op}`" for op in ops) + " |", "|---|" + "---|" * len(ops)]
    for target in _targets(documents):
        arch = target[:-1] if target.endswith("a") else target
        capability = next((c for c, name in _backend.ARCHS.items() if name == arch), None)
        cells = []
        for op in ops:
            on = _backend.TRITON_TABLE[op].get(arch, ())
            kernels = ", ".join(DTYPE_SHORT.get(d, d) for d in ("float16", "bfloat16", "float32") if d in on)
            rest = [DTYPE_SHORT[d] for d in ("float16", "bfloat16", "float32") if d not in on]
            refused = [DTYPE_SHORT[str(dt).replace("torch.", "")] for dt, need in _backend.DTYPE_MIN_CAPABILITY.items()
                       if capability is not None and capability < need and op in _backend._DTYPE_BOUND_OPS]
            portable = [d for d in rest if d not in refused]
            parts = ([f"Triton ({kernels})"] if kernels else []) + ([f"portable ({', '.join(portable)})"]
                                                                    if portable else [])
            parts += [f"{', '.join(refused)} refused"] if refused else []
            cells.append("; ".join(parts))
        out.append(f"| {target} ({GPUS.get(target, '?')}) | " + " | ".join(cells) + " |")
    out.append("")
    return out


def _fmt_count(n):
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.3g}"


def _fmt_us(seconds):
    return f"{seconds * 1e6:,.1f}"


def cost_section(documents):
    """The static model's table and what the compiles (newest triton, sm_90a, bf16) suggest."""
    s = cost_model.SHAPES
    out = ["## Static cost model (model, not measurement)", "",
           f"_What each kernel must do at the benchmark shapes ({s['batch']} clips × {s['seconds']} s: "
           f"{s['length']} encoder frames, {s['heads']} heads × {s['head_dim']}, {s['channels']} channels, kernel "
           f"{s['kernel_size']}; bf16 activations) and the time floors an H100 SXM's datasheet peaks imply "
           "(989 TFLOP/s dense bf16 tensor core, 67 TFLOP/s fp32 and 34 TFLOP/s fp64 CUDA cores, 3.35 TB/s HBM; "
           "exponentials at 16 a clock per SM). Bytes are what must cross HBM at least once. No GPU has run these "
           "kernels: these are bounds, not results (see `benchmarks/tools/cost_model.py`)._", "",
           "| kernel | work | HBM bytes | compute floors µs | HBM floor µs | roofline µs (bound by) |",
           "|---|---|---:|---|---:|---:|"]
    newest = documents[0] if documents else None
    suggestions = []
    for row in cost_model.rows():
        work = ", ".join(f"{_fmt_count(n)} {unit.split(' (')[0]}" for unit, n in row["operations"].items())
        compute = ", ".join(f"{_fmt_us(t)} {u.split(' (')[0]}" for u, t in row["floors_s"].items() if u != "HBM")
        out.append(f"| `{row['kernel']}` ({row['case']}) | {work} | {_fmt_count(row['bytes'])}B | "
                   f"{compute} | {_fmt_us(row['floors_s']['HBM'])} | "
                   f"{_fmt_us(row['bound_s'])} ({row['bound']}) |")
        if newest is not None:
            suggestions.append(_suggestion(row, newest))
    out.append("")
    if suggestions:
        out.append(f"What the compiles (triton {newest['compile_check']['triton']}, sm_90a, the serving dtype, "
                   "model shapes) suggest about reaching the floor — inference from the table above, not timing:")
        out += [s for s in suggestions if s]
        out.append("")
    return out


def _suggestion(row, document):
    records = [r for r in document["records"] if r["kernel"] == row["kernel"] and r["ok"]
               and r["target"] == "sm_90a" and r["shape"] == MODEL_SHAPE and r["dtype"] in ("bfloat16",)]
    if not records:
        records = [r for r in document["records"] if r["kernel"] == row["kernel"] and r["ok"]
                   and r["target"] == "sm_90a" and r["shape"] == MODEL_SHAPE]
    if not records:
        return f"- `{row['kernel']}`: no compile recorded."
    warps = sorted({r["occupancy"]["warps_per_sm"] for r in records})
    limits = sorted({lim for r in records for lim in r["occupancy"]["limited_by"]})
    mma = any(r["sass"]["tensor_core"] for r in records)
    ops = {op.split(".")[0] for r in records for op in r["sass"]["tensor_core"]}
    span = f"{warps[0]}" if warps[0] == warps[-1] else f"{warps[0]}–{warps[-1]}"
    text = (f"- `{row['kernel']}`: {span} warps resident per SM across its {len(records)} "
            f"config{'s' if len(records) > 1 else ''} (limited by {', '.join(limits)}); ")
    if ops and "HGMMA" not in ops:
        text += ("its dots issue `HMMA` (mma.sync) on sm_90a, not the warpgroup `HGMMA` (wgmma) the dense bf16 peak "
                 "is quoted for, so the tensor-core floor is optimistic for these configs; ")
    if row["bound"] == "HBM":
        text += ("bound by HBM traffic: it needs enough loads in flight, which "
                 + ("this occupancy (≥ 16 warps) should allow." if warps[-1] >= 16 else
                    "few resident warps make hard: expect well under the HBM floor's bandwidth."))
    elif row["bound"] == "ex2 (MUFU)" or row["floors_s"].get("ex2 (MUFU)", 0) >= 0.9 * row["bound_s"]:
        text += ("the exponentials set the floor (at head_dim 64 a (query, key) pair's 256 MMA FLOPs take about as "
                 "long as its one exp2): "
                 + ("the matmuls run on tensor cores, so the softmax's exp2 and the " if mma else
                    "**no tensor-core instructions were found**, so the matmuls, not the ")
                 + "per-element work around it decide how close a config gets.")
    else:
        text += (f"bound by {row['bound']}" + ("; on tensor cores." if mma and "tensor" in row["bound"] else "."))
    return text
