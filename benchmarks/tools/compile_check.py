"""Compile every Triton kernel of ``w2vbert_fast.ops`` ahead of time, with no GPU, for Hopper (sm_90a), Ampere (sm_80,
sm_86), Ada (sm_89) and Turing (sm_75), and check what only the compiler sees: compile errors, spills, shared memory;
record registers, occupancy and the machine code's instruction mix.

    python benchmarks/tools/compile_check.py                  # full plan → benchmarks/results/compile-<triton>.json
    python benchmarks/tools/compile_check.py --plan ci --out F  # the subset CI runs (tests/test_kernel_compile.py)

What to compile comes from each op file's ``LAUNCH_META`` ({key: ``_backend.KernelLaunch``}, the key a kernel's
function name, or ``name+variant`` for a kernel launched more than one way): the kernel, its example arguments (made
by the op's own launcher code, so this file holds no copy of any launch logic), its configs per input dtype and the
machine-code expectations. This file holds only the shapes and the targets.

How: a stand-in driver whose current target is ``GPUTarget("cuda", 90, 80, 86, 89 or 75, 32)`` is made active, and each kernel
is compiled through its real launch path, ``JITFunction.warmup`` (the arguments' dtypes, integer specialisation and
alignment as a launch would see them; pointers are ``MockTensor``s, 16-byte aligned like torch's allocations). ptxas
runs for every compile (``knobs.compilation.always_compile``, an empty cache directory per run) and its ``-v`` report
gives registers, spill stores/loads and the stack frame; the cubin's SASS (``nvdisasm --print-line-info``) gives the
instruction mix per source line. One compile per task in a process pool.

A check fails on: a compile error; any spill store or load in a config the autotuner may pick (or the one the
launcher uses); fewer than 12 warps resident per SM (``MIN_WARPS_PER_SM``); shared memory over the target's
per-block limit; a kernel in ``w2vbert_fast/ops`` without a ``LAUNCH_META`` entry, or an entry whose arguments no
longer match its kernel. The machine-code expectations each entry declares (tensor cores on every ``tl.dot`` in half
precision, no fp64 arithmetic, no local memory) fail it too. Never relax a check to make it pass: fix the kernel or
drop the config.

Routing: ``auto`` runs an op's kernels only on the (arch, dtype) pairs of ``w2vbert_fast.ops._backend.TRITON_TABLE``;
elsewhere it runs the op's portable PyTorch path. A compile for a pair the table routes elsewhere is recorded with
``"routed": "portable"``, and its problems are listed under ``"routed_elsewhere"``, not ``"failures"``: what the
table dispatches must pass, what it does not is shown (benchmarks/RESULTS.md) but does not fail the check.
"""

import argparse
import concurrent.futures
import contextlib
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# ------------------------------------------------------------------------------------------------- targets
# Per SM: warps, blocks, shared memory (bytes); per block: the most shared memory a kernel may ask for, and what the
# driver reserves of it per resident block (CUDA C Programming Guide, "Compute Capabilities", table 23 and the
# per-arch tuning guides):
#   sm_90a (H100/H200): 64 warps (2048 threads), 32 blocks, 228 KB per SM, 227 KB per block, 1 KB reserved
#   sm_80  (A100):      64 warps, 32 blocks, 164 KB / 163 KB, 1 KB reserved
#   sm_86  (A10, A40, RTX 30xx): 48 warps (1536 threads), 16 blocks, 100 KB / 99 KB, 1 KB reserved
#   sm_89  (L4, L40, RTX 40xx):  48 warps, 24 blocks, 100 KB / 99 KB, 1 KB reserved
#   sm_75  (T4, RTX 20xx): 32 warps (1024 threads), 16 blocks, 64 KB / 64 KB, none reserved
# Every one has 65,536 32-bit registers per SM, at most 255 per thread.
TARGETS = {
    "sm_90a": dict(capability=90, smem_per_sm=228 * 1024, smem_per_block=227 * 1024, max_warps_per_sm=64,
                   max_blocks_per_sm=32, smem_reserved_per_block=1024),
    "sm_80": dict(capability=80, smem_per_sm=164 * 1024, smem_per_block=163 * 1024, max_warps_per_sm=64,
                  max_blocks_per_sm=32, smem_reserved_per_block=1024),
    "sm_86": dict(capability=86, smem_per_sm=100 * 1024, smem_per_block=99 * 1024, max_warps_per_sm=48,
                  max_blocks_per_sm=16, smem_reserved_per_block=1024),
    "sm_89": dict(capability=89, smem_per_sm=100 * 1024, smem_per_block=99 * 1024, max_warps_per_sm=48,
                  max_blocks_per_sm=24, smem_reserved_per_block=1024),
    "sm_75": dict(capability=75, smem_per_sm=64 * 1024, smem_per_block=64 * 1024, max_warps_per_sm=32,
                  max_blocks_per_sm=16, smem_reserved_per_block=0),
}
# The targets the first compile tables covered; the others are new in issue 20 (the CI plan covers them lightly).
PRIMARY_TARGETS = ("sm_90a", "sm_80")
REGISTERS_PER_SM = 65536
REGISTER_PARTITIONS = 4  # the register file is split between the SM's four warp schedulers
REGISTER_ALLOCATION_UNIT = 256  # registers per warp are allocated in units of 256 (8 per thread)
# The fewest resident warps per SM a config may allow: with fewer, one warp's memory or MMA latency has too few others
# to hide behind (issue 13 sets 12 for attention; every kernel meets it).
MIN_WARPS_PER_SM = 12

# ------------------------------------------------------------------------------------------------- shapes
# "w2v-bert-2.0": the model's own sizes (30 s of audio: 3000 fbank frames, 1500 encoder frames, batch 8).
# "odd": nothing a power of two or a multiple of 16, to reach the masked and ragged paths' code generation.
SHAPES = {
    "w2v-bert-2.0": dict(batch=8, length=1500, heads=16, head_dim=64, left=64, right=8, kernel_size=31,
                         samples=30 * 16000),
    "odd": dict(batch=3, length=37, heads=3, head_dim=24, left=5, right=2, kernel_size=5, samples=16000 + 123),
}
DTYPES = ("bfloat16", "float16", "float32")


# --------------------------------------------------------------------------------------- kernels and configs
DEFAULT_EXPECT = ("no_local",)  # a record whose kernel has no LAUNCH_META entry (a test's, an old table's)


class RegistryError(Exception):
    """LAUNCH_META and the kernels disagree (a new kernel, a renamed or changed argument)."""


def _ops_modules():
    """Every module of w2vbert_fast.ops (new kernel files are found without editing this file)."""
    import pkgutil

    import w2vbert_fast.ops as ops

    names = [f"w2vbert_fast.ops.{m.name}" for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith("__")]
    return [importlib.import_module(name) for name in sorted(names)]


def _jit_function(obj):
    """The JITFunction behind an autotuner / heuristics wrapper, or None."""
    from triton.runtime.jit import JITFunction

    while obj is not None and not isinstance(obj, JITFunction):
        obj = getattr(obj, "fn", None)
    return obj


def _names_in(source):
    """The names a function's code uses (strings and comments left out): a JIT function another one calls, or hands
    on as an argument (a per-block step given to a loop helper), is a helper."""
    import tokenize

    return {t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME}


def _jit_functions(module):
    """{function name: JITFunction} defined in ``module``."""
    out = {}
    for obj in vars(module).values():
        fn = _jit_function(obj)
        if fn is not None and fn.module == module.__name__:
            out[fn.fn.__name__] = fn
    return out


def discover_kernels():
    """{"module:function name": JITFunction} of every @triton.jit function of w2vbert_fast.ops that no other one uses:
    the kernels, not their helpers."""
    found = {f"{module.__name__}:{name}": fn for module in _ops_modules()
             for name, fn in _jit_functions(module).items()}
    used = {key: _names_in(fn.src) - {fn.fn.__name__} for key, fn in found.items()}
    return {key: fn for key, fn in found.items()
            if not any(key.split(":")[1] in names for other, names in used.items() if other != key)}


def launches():
    """{"module:key": KernelLaunch} of every ops module's LAUNCH_META."""
    return {f"{module.__name__}:{key}": launch for module in _ops_modules()
            for key, launch in getattr(module, "LAUNCH_META", {}).items()}


def kernel_name(key):
    """The kernel function a LAUNCH_META key names ("module:name" or "module:name+variant" → name)."""
    return key.split(":")[-1].split("+")[0]


LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def configs_for(key, dtype, launch=None):
    """[config dict: meta-parameters + num_warps/num_stages (+ num_ctas, maxnreg)] the kernel may run with on a GPU
    for inputs of ``dtype``: its LAUNCH_META entry's configs, as the JSON records them."""
    launch = launch if launch is not None else launches()[key]
    configs = launch.configs(dtype)
    if not isinstance(configs, (list, tuple)) or not all(hasattr(c, "all_kwargs") for c in configs) or not configs:
        raise RegistryError(f"{key}: LAUNCH_META configs({dtype!r}) must be a non-empty list of triton.Config, got "
                            f"{configs!r}")
    out = []
    for c in configs:
        d = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        if getattr(c, "num_ctas", 1) != 1:
            d["num_ctas"] = c.num_ctas
        if getattr(c, "maxnreg", None):
            d["maxnreg"] = c.maxnreg
        out.append(d)
    return out


def check_registry(kernels=None):
    """{key: problem} between LAUNCH_META and the kernels as they are now."""
    problems = {}
    found = discover_kernels()
    entries = launches()
    selected = lambda key: not kernels or any(k in key for k in kernels)  # noqa: E731
    described = {f"{key.split(':')[0]}:{kernel_name(key)}" for key in entries}
    for key in found:
        if key not in described and selected(key):
            module = key.split(":")[0]
            problems[key] = f"{key}: a kernel with no entry in {module}'s LAUNCH_META (add one)"
    for key, launch in entries.items():
        if not selected(key):
            continue
        fn = _jit_function(launch.kernel)
        name = f"{key.split(':')[0]}:{kernel_name(key)}"
        if name not in found or fn is not found[name]:
            problems[key] = (f"{key}: in LAUNCH_META but no such kernel, or its entry launches another one "
                             f"({fn.fn.__name__ if fn else launch.kernel!r}; renamed or removed? update LAUNCH_META)")
            continue
        try:
            configs = [c for dtype in launch.dtypes for c in configs_for(key, dtype, launch)]
        except RegistryError as error:
            problems[key] = str(error)
            continue
        for config in configs:
            meta = {k for k in config if k not in LAUNCH_OPTIONS}
            given = set(launch.args(SHAPES["odd"], launch.dtypes[0])) | meta
            missing, unknown = set(fn.arg_names) - given, given - set(fn.arg_names)
            if missing or unknown:
                problems[key] = (f"{key}: LAUNCH_META entry out of date: missing {sorted(missing)}, unknown "
                                 f"{sorted(unknown)} (the kernel takes {fn.arg_names})")
                break
    return problems


# ------------------------------------------------------------------------------------------------ compile
class _TargetDriver:
    """The active driver for ahead-of-time compiles: a current target, no device behind it."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return f"aot-{self.target.backend}-{self.target.arch}"

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _tool(name):
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
TENSOR_CORE_OPS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "BGMMA", "DMMA")
FP64_ARITHMETIC = ("DADD", "DMUL", "DFMA", "DSETP", "DMNMX", "DMMA")
LOCAL_MEMORY = ("LDL", "STL")


def parse_ptxas_log(log):
    used, spill = _PTXAS_USED.search(log), _PTXAS_SPILL.search(log)
    if used is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v report:\n{log}")
    smem = _PTXAS_SMEM.search(log)
    return dict(registers=int(used.group(1)), stack_bytes=int(spill.group(1)), spill_stores=int(spill.group(2)),
                spill_loads=int(spill.group(3)), static_smem=int(smem.group(1)) if smem else 0)


def sass_by_line(cubin):
    """[(source file, line, opcode)] of every SASS instruction (nvdisasm with line info)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        text = subprocess.run([_tool("nvdisasm"), "--print-line-info", "-c", f.name], check=True,
                              capture_output=True, text=True).stdout
    finally:
        os.remove(f.name)
    out, where = [], (None, None)
    for line in text.splitlines():
        marker = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if marker:
            where = (os.path.basename(marker.group(1)), int(marker.group(2)))
            continue
        ins = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_x]+)*)", line)
        if ins:
            out.append((where[0], where[1], ins.group(1)))
    return out


def _source_lines(fn):
    """{(file basename, line number): text} of a JIT function and of the JIT helpers it calls (transitively)."""
    import inspect

    by_name = _jit_functions(sys.modules[fn.module])
    todo, seen = [fn], {}
    while todo:
        f = todo.pop()
        if f.fn.__name__ in seen:
            continue
        seen[f.fn.__name__] = f
        todo += [h for name, h in by_name.items() if name in _names_in(f.src)]
    lines = {}
    for f in seen.values():
        source, start = inspect.getsourcelines(f.fn)
        for offset, text in enumerate(source):
            lines[(os.path.basename(inspect.getsourcefile(f.fn)), start + offset)] = text.strip()
    return lines


def instruction_facts(fn, cubin, dtype):
    sass = sass_by_line(cubin)
    source = _source_lines(fn)
    base = lambda op: op.split(".")[0]  # noqa: E731
    mma = {}
    fp64 = {}
    local = 0
    per_line_mma = {}
    fp64_lines = set()
    for file, line, op in sass:
        if base(op) in TENSOR_CORE_OPS:
            mma[op] = mma.get(op, 0) + 1
            per_line_mma.setdefault((file, line), set()).add(op)
        if base(op) in FP64_ARITHMETIC:
            fp64[base(op)] = fp64.get(base(op), 0) + 1
            if (file, line) in source:
                fp64_lines.add(f"{line}: {source[(file, line)]}")
        if base(op) in LOCAL_MEMORY:
            local += 1
    dots = []
    for (file, line), text in sorted(source.items()):
        if "tl.dot(" in text:
            dots.append(dict(line=line, source=text, mma=sorted(per_line_mma.get((file, line), ()))))
    return dict(instructions=len(sass), tensor_core=mma, fp64_arithmetic=fp64, fp64_lines=sorted(fp64_lines),
                local_memory_instructions=local, dots=dots)


def occupancy(registers, smem_bytes, num_warps, target):
    """Resident blocks and warps per SM the registers, shared memory and warps allow, and what limits it."""
    spec = TARGETS[target]
    regs_per_warp = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    warps_by_regs = REGISTER_PARTITIONS * ((REGISTERS_PER_SM // REGISTER_PARTITIONS) // regs_per_warp)
    limits = {
        "registers": warps_by_regs // num_warps,
        "warps": spec["max_warps_per_sm"] // num_warps,
        "shared memory": spec["smem_per_sm"] // max(smem_bytes + spec["smem_reserved_per_block"], 1),
        "blocks": spec["max_blocks_per_sm"],
    }
    blocks = min(limits.values())
    limited_by = [name for name, value in limits.items() if value == blocks]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * num_warps, limited_by=limited_by)


def _worker_init():
    """Import torch, triton and the kernel modules once per worker, so compile_s times the compile alone."""
    _ops_modules()


def _compile_one(task):
    """Worker: compile one (kernel, target, dtype, shape, config); never raises."""
    key, target, dtype, shape, config = task
    record = dict(kernel=key.split(":")[1], module=key.split(":")[0], target=target, dtype=dtype, shape=shape,
                  config=config)
    started = time.perf_counter()
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver

        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        driver.set_active(_TargetDriver(GPUTarget("cuda", TARGETS[target]["capability"], 32)))
        module_name, name = key.split(":")
        launch = importlib.import_module(module_name).LAUNCH_META[name]
        fn = _jit_function(launch.kernel)
        fn.device_caches.clear()  # this worker may have compiled the same specialisation already: ptxas must run
        args = launch.args(SHAPES[shape], dtype)
        args.update(config)
        ordered = [args.pop(n) for n in fn.arg_names]
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = fn.warmup(*ordered, grid=(1,), **args)
        if hasattr(compiled, "result"):
            compiled = compiled.result()
        ptxas = parse_ptxas_log(log.getvalue())
        smem = int(compiled.metadata.shared) + ptxas.pop("static_smem")
        record.update(ok=True, **ptxas, shared_bytes=smem, num_warps=int(compiled.metadata.num_warps),
                      occupancy=occupancy(ptxas["registers"], smem, int(compiled.metadata.num_warps), target),
                      sass=instruction_facts(fn, compiled.asm["cubin"], dtype))
    except Exception as error:  # a compile error is a result, not a crash of the check
        record.update(ok=False, error=f"{type(error).__name__}: {str(error).strip()[-2000:]}")
    record["compile_s"] = round(time.perf_counter() - started, 2)
    return record


def _expectations(record):
    """The machine-code expectations of the record's LAUNCH_META entry (DEFAULT_EXPECT without one)."""
    try:
        launch = importlib.import_module(record["module"]).LAUNCH_META[record["kernel"]]
    except (ImportError, AttributeError, KeyError):
        return DEFAULT_EXPECT
    return launch.expect


def failures(record):
    """Why a record fails the check ([] if it passes)."""
    if not record["ok"]:
        return [f"compile error: {record['error'].splitlines()[0][:300]}"]
    out = []
    if record["spill_stores"] or record["spill_loads"]:
        out.append(f"spills {record['spill_stores']} B stored, {record['spill_loads']} B loaded per thread")
    if record["occupancy"]["warps_per_sm"] < MIN_WARPS_PER_SM:
        out.append(f"{record['occupancy']['warps_per_sm']} warps resident per SM < {MIN_WARPS_PER_SM} "
                   f"({record['registers']} registers × {record['num_warps']} warps, limited by "
                   f"{' and '.join(record['occupancy']['limited_by'])})")
    limit = TARGETS[record["target"]]["smem_per_block"]
    if record["shared_bytes"] > limit:
        out.append(f"shared memory {record['shared_bytes']} B > {limit} B per block on {record['target']}")
    expect = _expectations(record)
    sass = record["sass"]
    if (("mma_in_half" in expect and record["dtype"] in ("bfloat16", "float16"))
            or ("mma_in_fp32" in expect and record["dtype"] == "float32")):
        missing = [d["line"] for d in sass["dots"] if not d["mma"]]
        if missing:
            out.append(f"tl.dot without tensor-core MMA at lines {missing}")
    if "no_fp64" in expect and sass["fp64_arithmetic"]:
        out.append(f"fp64 arithmetic {sass['fp64_arithmetic']} at {sass['fp64_lines']}")
    if "no_local" in expect and sass["local_memory_instructions"]:
        out.append(f"{sass['local_memory_instructions']} local-memory instructions (LDL/STL)")
    return out


# ------------------------------------------------------------------------------------------------- routing
def table_arch(target):
    """The dispatch table's name for a compile target ("sm_90a" → "sm_90": the same GPUs)."""
    return target[:-1] if target.endswith("a") else target


def dispatched(module, target, dtype):
    """Whether ``auto`` runs the kernels of ``module`` (a w2vbert_fast.ops module name) on ``target`` for inputs of
    ``dtype`` (ops/_backend.py's TRITON_TABLE). A module the table does not know (a test's) counts as dispatched: the
    check applies in full."""
    from w2vbert_fast.ops import _backend

    table = _backend.TRITON_TABLE.get(module.rsplit(".", 1)[-1])
    return table is None or dtype in table.get(table_arch(target), ())


def triage(records):
    """(failures, routed_elsewhere): the lines of the records' problems (``record["failures"]``), those of compiles the
    dispatch table sends to the kernels first, those it routes to the portable path apart (each record gets
    ``"routed"``: None or "portable")."""
    failed, routed = [], []
    for record in records:
        record["routed"] = None if dispatched(record["module"], record["target"], record["dtype"]) else "portable"
        for why in record["failures"]:
            line = (f"{record['kernel']} {record['target']} {record['dtype']} {record['shape']} "
                    f"{_config_label(record['config'])}: {why}")
            (routed if record["routed"] else failed).append(line)
    return failed, routed


# --------------------------------------------------------------------------------------------------- plans
def plan(name, kernels=None, skip=()):
    """[(kernel, target, dtype, shape, config)].

    Configs are per dtype (``configs_for``): a kernel tuned per precision compiles each dtype with its own.
    full (the committed tables): at the model's shapes every config × dtype × target; at the odd shape the first
    config in fp16 and in fp32 on sm_90a (code generation for masks and odd sizes, not a new register budget).
    ci (what CI runs per triton version on 2 cores; the reasons are in tests/test_kernel_compile.py): every config
    in the serving dtype (bf16, or the kernel's one dtype) on sm_90a at the model's shapes; the first config in
    fp32 there; the first config in the serving dtype on sm_80; the first config in fp16 at the odd shape on sm_90a;
    on each of the other targets, for the kernels' base builds (no ``+variant``) the dispatch table sends there, the
    first config in the first dtype it sends (bf16, else fp16, else fp32) at the model's shapes.
    """
    out = []
    for key, launch in launches().items():
        if (kernels and not any(k in key for k in kernels)) or key in skip:
            continue
        serving = "bfloat16" if "bfloat16" in launch.dtypes else launch.dtypes[0]
        module = key.split(":")[0]
        for dtype in launch.dtypes:
            for index, config in enumerate(configs_for(key, dtype, launch)):
                for target in TARGETS:
                    for shape in SHAPES:
                        if target not in PRIMARY_TARGETS:
                            if name == "ci" and not (index == 0 and shape == "w2v-bert-2.0" and "+" not in key
                                                     and dtype == _ci_dtype(module, target, launch.dtypes)):
                                continue
                            if name == "full" and shape != "w2v-bert-2.0":
                                continue
                            out.append((key, target, dtype, shape, config))
                            continue
                        if name == "ci" and not _in_ci(index, target, shape, dtype, serving, launch.dtypes):
                            continue
                        if name == "full" and shape != "w2v-bert-2.0" and not _in_ci(
                                index, target, shape, dtype, serving, launch.dtypes, odd_fp32=True):
                            continue
                        out.append((key, target, dtype, shape, config))
    return out


def _ci_dtype(module, target, dtypes):
    """The dtype CI compiles a kernel in on a non-primary target: the first of bf16, fp16, fp32 the dispatch table
    sends there (None: the table routes the op elsewhere on that target in every dtype)."""
    return next((d for d in ("bfloat16", "float16", "float32") if d in dtypes and dispatched(module, target, d)), None)


def _in_ci(index, target, shape, dtype, serving, dtypes, odd_fp32=False):
    """``index``: the config's place among those for ``dtype``. ``odd_fp32``: the odd shape in fp32 too (full plan)."""
    if target == "sm_90a" and shape == "w2v-bert-2.0":
        return dtype == serving or (index == 0 and dtype == "float32")
    if index != 0:
        return False
    if target == "sm_80" and shape == "w2v-bert-2.0":
        return dtype == serving
    if target == "sm_90a" and shape == "odd":
        return dtype == ("float16" if "float16" in dtypes else serving) or (odd_fp32 and dtype == "float32")
    return False


def run(tasks, jobs):
    """Compile every task in a pool of ``jobs`` processes, nothing cached across runs; records in task order."""
    cache = tempfile.mkdtemp(prefix="compile-check-cache-")
    env = {"TRITON_CACHE_DIR": cache, "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        context = multiprocessing.get_context("spawn")
        records = []
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
            for record in pool.map(_compile_one, tasks):
                records.append(record)
                print(f"[{len(records)}/{len(tasks)}] {record['kernel']} {record['target']} {record['dtype']} "
                      f"{record['shape']} {_config_label(record['config'])}: "
                      + (f"{record['registers']} regs, spill {record['spill_stores']}/{record['spill_loads']} B, "
                         f"smem {record['shared_bytes'] / 1024:.1f} KB" if record["ok"] else "compile error")
                      + f" ({record['compile_s']} s)", file=sys.stderr, flush=True)
        return records
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(cache, ignore_errors=True)


def versions():
    import triton

    return dict(triton=triton.__version__, python=sys.version.split()[0])


def _commit():
    """HEAD's short hash; in a ``git archive`` snapshot (no .git: how a long check is kept clear of edits made while
    it runs), the hash git archive wrote into ``archive_commit`` (``export-subst`` in .gitattributes)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        with open(os.path.join(ROOT, "benchmarks", "tools", "archive_commit")) as f:
            stamped = f.read().strip()
    except OSError:
        return None
    return stamped[:7] if stamped and not stamped.startswith("$Format") else None


def _sources():
    """{module file: sha1} of every kernel file, and whether any differs from the commit (a check of a dirty tree)."""
    import hashlib

    out = {}
    for module in _ops_modules():
        with open(module.__file__, "rb") as f:
            out[os.path.relpath(module.__file__, ROOT)] = hashlib.sha1(f.read()).hexdigest()[:12]
    try:
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", *out], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        dirty = None
    return out, dirty


def check(plan_name="full", jobs=None, kernels=None, previous=None):
    """The whole check: {"compile_check": ..., "records": [...], "failures": [...]}. ``previous``: an earlier
    result whose records of the kernels not selected by ``kernels`` are kept (rerun only what changed)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("the compile check needs the real compiler: unset TRITON_INTERPRET")
    started = time.perf_counter()
    problems = check_registry(kernels)
    tasks = plan(plan_name, kernels, skip=problems)
    records = run(tasks, jobs or os.cpu_count() or 1) if tasks else []
    if previous is not None:
        rerun = {(t[0].split(":")[1]) for t in tasks} | {k.split(":")[1] for k in problems}
        live = {k.split(":")[1] for k in launches()}
        records = [r for r in previous["records"] if r["kernel"] not in rerun and r["kernel"] in live] + records
    for record in records:
        record["failures"] = failures(record)
    failed, routed = triage(records)
    sources, dirty = _sources()
    return {
        "compile_check": dict(plan=plan_name, commit=_commit(), dirty=dirty, sources=sources, **versions(),
                              shapes=SHAPES, targets=TARGETS, wall_s=round(time.perf_counter() - started, 1)),
        "records": records,
        "failures": list(problems.values()) + failed,
        "routed_elsewhere": routed,
    }


def _config_label(config):
    meta = ", ".join(f"{k}={v}" for k, v in config.items() if k not in LAUNCH_OPTIONS)
    return f"({meta}; {config.get('num_warps')} warps, {config.get('num_stages', '-')} stages)"


def summary(result):
    lines = []
    for r in result["records"]:
        head = (f"{r['kernel'][:28]:28} {r['target']:7} {r['dtype']:8} {r['shape']:12} {_config_label(r['config'])}"
                + (" [routed: portable]" if r.get("routed") else ""))
        if r["ok"]:
            occ = r["occupancy"]
            lines.append(f"{head}: {r['registers']} regs, spill {r['spill_stores']}/{r['spill_loads']} B, smem "
                         f"{r['shared_bytes'] / 1024:.1f} KB, {occ['warps_per_sm']} warps/SM  [{r['compile_s']} s]")
        else:
            lines.append(f"{head}: COMPILE ERROR")
    routed = result.get("routed_elsewhere", [])
    lines.append(f"{len(result['records'])} compiles, {len(result['failures'])} failures, {len(routed)} problems "
                 f"where the dispatch table runs the portable path, {result['compile_check']['wall_s']} s")
    lines += [f"ROUTED (portable) {f}" for f in routed]
    lines += [f"FAIL {f}" for f in result["failures"]]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", choices=("full", "ci"), default="full")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--kernels", nargs="*", help="only kernels whose 'module:name' contains one of these")
    parser.add_argument("--out", help="JSON output (default: benchmarks/results/compile-<triton version>.json)")
    parser.add_argument("--update", action="store_true",
                        help="keep the records of the kernels not selected by --kernels from the existing --out file")
    args = parser.parse_args(argv)
    previous = None
    if args.update and not args.kernels:
        parser.error("--update reruns the kernels named by --kernels: name some")
    if args.update:
        import triton

        path = args.out or os.path.join(ROOT, "benchmarks", "results", f"compile-{triton.__version__}.json")
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    result = check(args.plan, args.jobs, args.kernels, previous)
    if previous is not None:
        result["compile_check"]["plan"] = (f"{previous['compile_check']['plan']}; {args.plan} for "
                                           f"{', '.join(args.kernels)} (rerun at {result['compile_check']['commit']})")
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"compile-{result['compile_check']['triton']}.json")
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(summary(result))
    print(f"wrote {out}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
