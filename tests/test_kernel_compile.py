"""Every Triton kernel compiles for Hopper (sm_90a) and Ampere (sm_80) with no GPU, on the triton this environment
installs and on triton 3.6.0 (what the GPU machines run), with no spill and shared memory within the target's limit
(benchmarks/tools/compile_check.py; its "ci" plan); and so does each kernel the dispatch table
(``ops._backend.TRITON_TABLE``) sends to sm_86 (A10, RTX 30), sm_89 (L4, RTX 40) and sm_75 (T4).

Why the "ci" plan is a subset: CI has 2 cores and each compile takes 2-6 s, so the full plan (every config × dtype ×
target × shape, several hundred compiles a triton version) is run by hand and committed as
benchmarks/results/compile-<triton version>.json. CI compiles, per triton version, every config of every kernel in
bf16 (the dtype the model is served in) at the model's shapes on sm_90a (an H100) — registers and spills are a
property of the config; fp16 compiles to the same registers as bf16, ±2, in the committed tables — plus every kernel's
first config (the autotuner's first choice) in fp32 on sm_90a (fp32 takes another dot precision, a different register
budget, and for attention configs of its own), in bf16 on sm_80 and in fp16 at the odd shape on sm_90a (masking and
non-power-of-two code generation). On sm_86, sm_89 and sm_75, lightly: each kernel's base build (no key or frame
mask) in its first config and the first dtype the table sends there (the full plan compiles every config; compiles the
table routes to the portable path are listed, not failed). See ``compile_check.plan``. A config fails on a compile
error, a spill, shared memory over the limit, or fewer than 12 warps resident per SM.

The check runs in a subprocess: it needs the real compiler, and this test session runs Triton's interpreter.
"""

import json
import os
import subprocess
import sys
import types

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tools"))
import compile_check  # noqa: E402  (stdlib only at import: safe under the interpreter)

TRITON36 = os.environ.get("W2VBERT_FAST_TRITON36_PYTHON", os.path.join(ROOT, ".venv-triton36", "bin", "python"))


def compiler_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_check(python, tmp_path):
    out = tmp_path / "compile.json"
    result = subprocess.run([python, os.path.join(ROOT, "benchmarks", "tools", "compile_check.py"), "--plan", "ci",
                             "--out", str(out)], cwd=ROOT, env=compiler_env(), capture_output=True, text=True,
                            timeout=900)
    print(result.stdout[-20000:])
    assert out.exists(), f"the check wrote nothing:\n{result.stderr[-5000:]}"
    with open(out) as f:
        return result.returncode, json.load(f)


def assert_passes(returncode, document):
    records = document["records"]
    assert records, "no kernel was compiled"
    assert not document["failures"], "\n".join(document["failures"])
    assert returncode == 0
    # every kernel of every op's LAUNCH_META reached sm_90a and sm_80, its base build every other target the dispatch
    # table sends it to, and each record carries what the check reads
    seen = {(r["kernel"], r["target"]) for r in records}
    for key in compile_check.launches():
        module, name = key.split(":")
        for target in compile_check.TARGETS:
            sent = any(compile_check.dispatched(module, target, d) for d in ("bfloat16", "float16", "float32"))
            if target in compile_check.PRIMARY_TARGETS or ("+" not in name and sent):
                assert (name, target) in seen, f"{key} was not compiled for {target}"
    assert {r["target"] for r in records} == set(compile_check.TARGETS)
    for r in records:
        assert r["registers"] > 0 and r["num_warps"] > 0 and r["occupancy"]["warps_per_sm"] > 0
        assert r["sass"]["instructions"] > 0


def test_every_kernel_compiles_without_spills_on_this_triton(tmp_path):
    returncode, document = run_check(sys.executable, tmp_path)
    import triton

    assert document["compile_check"]["triton"] == triton.__version__
    assert_passes(returncode, document)


def test_every_kernel_compiles_without_spills_on_triton_3_6(tmp_path):
    if not os.path.exists(TRITON36):
        if os.environ.get("W2VBERT_FAST_CI"):
            pytest.fail(f"CI builds the triton 3.6 environment (.ci/run); {TRITON36} is missing")
        pytest.skip(f"no triton 3.6 environment at {TRITON36} (.ci/run builds one; or set "
                    "W2VBERT_FAST_TRITON36_PYTHON)")
    returncode, document = run_check(TRITON36, tmp_path)
    assert document["compile_check"]["triton"] == "3.6.0"
    assert_passes(returncode, document)


# ------------------------------------------------------------------------- the check's own arithmetic and rules
PTXAS_SPILLING = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    904 bytes stack frame, 1068 bytes spill stores, 1288 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 904 bytes cumulative stack size
"""


def test_ptxas_report_is_read():
    assert compile_check.parse_ptxas_log(PTXAS_SPILLING) == dict(
        registers=255, stack_bytes=904, spill_stores=1068, spill_loads=1288, static_smem=0)
    with pytest.raises(RuntimeError, match="unexpected ptxas"):
        compile_check.parse_ptxas_log("nothing here")


@pytest.mark.parametrize("registers, smem, warps, target, blocks, limited_by", [
    (255, 1024, 4, "sm_90a", 2, "registers"),  # 8 warps: 2 warps of 255 registers per scheduler partition
    (168, 1024, 4, "sm_90a", 3, "registers"),  # 12 warps, the floor issue 13 asks of attention
    (32, 1024, 4, "sm_90a", 16, "warps"),  # 64 warps per SM (32 registers allow 64 too)
    (64, 1024, 4, "sm_90a", 8, "registers"),  # 64 registers: 32 warps
    (32, 0, 1, "sm_90a", 32, "blocks"),  # 32 blocks per SM
    (64, 100 * 1024, 4, "sm_90a", 2, "shared memory"),  # 228 KB / (100 + 1) KB
    (64, 100 * 1024, 4, "sm_80", 1, "shared memory"),  # 164 KB / (100 + 1) KB
    (32, 1024, 4, "sm_86", 12, "warps"),  # 48 warps per SM on sm_86 (1536 threads)
    (32, 0, 1, "sm_86", 16, "blocks"),  # 16 blocks per SM on sm_86
    (32, 0, 1, "sm_89", 24, "blocks"),  # 24 on sm_89
    (64, 52 * 1024, 8, "sm_89", 1, "shared memory"),  # 100 KB / (52 + 1) KB: 8 warps
    (32, 1024, 4, "sm_75", 8, "warps"),  # 32 warps per SM on sm_75 (1024 threads)
    (64, 32 * 1024, 4, "sm_75", 2, "shared memory"),  # 64 KB / 32 KB: nothing reserved per block on Turing
])
def test_occupancy(registers, smem, warps, target, blocks, limited_by):
    occ = compile_check.occupancy(registers, smem, warps, target)
    assert occ["blocks_per_sm"] == blocks and occ["warps_per_sm"] == blocks * warps
    assert limited_by in occ["limited_by"]


def clean_record(**changes):
    record = dict(ok=True, kernel="_forward_kernel", module="w2vbert_fast.ops.rel_key_attention", target="sm_90a",
                  dtype="bfloat16", shape="w2v-bert-2.0", config={}, registers=128, spill_stores=0, spill_loads=0,
                  shared_bytes=64 * 1024, num_warps=4,
                  occupancy=dict(blocks_per_sm=3, warps_per_sm=12, limited_by=["shared memory"]),
                  sass=dict(dots=[dict(line=1, source="tl.dot(q, k)", mma=["HGMMA.64x64x16.F32.BF16"])],
                            fp64_arithmetic={}, fp64_lines=[], local_memory_instructions=0))
    record.update(changes)
    return record


def test_a_clean_compile_passes():
    assert compile_check.failures(clean_record()) == []


@pytest.mark.parametrize("changes, reason", [
    (dict(ok=False, error="CompilationError: at 10:4: unsupported"), "compile error"),
    (dict(spill_stores=8, spill_loads=8), "spills"),
    (dict(spill_loads=4), "spills"),
    (dict(registers=214, occupancy=dict(blocks_per_sm=2, warps_per_sm=8, limited_by=["registers"])),
     "8 warps resident per SM < 12"),
    (dict(shared_bytes=228 * 1024), "shared memory"),
    (dict(target="sm_80", shared_bytes=164 * 1024), "shared memory"),
    (dict(target="sm_86", shared_bytes=100 * 1024), "shared memory"),
    (dict(sass=dict(dots=[dict(line=7, source="tl.dot(p, v)", mma=[])], fp64_arithmetic={}, fp64_lines=[],
                    local_memory_instructions=0)), "without tensor-core MMA at lines [7]"),
    (dict(sass=dict(dots=[], fp64_arithmetic={"DFMA": 2}, fp64_lines=["9: x = y * z"],
                    local_memory_instructions=0)), "fp64 arithmetic"),
    (dict(sass=dict(dots=[], fp64_arithmetic={}, fp64_lines=[], local_memory_instructions=3)), "local-memory"),
], ids=["compile-error", "spill", "spill-loads-only", "under-12-warps", "smem-sm90", "smem-sm80", "smem-sm86",
        "dot-off-tensor-cores", "fp64", "local-memory"])
def test_what_fails_the_check(changes, reason):
    assert any(reason in why for why in compile_check.failures(clean_record(**changes)))


FMA_DOT = dict(dots=[dict(line=7, source="tl.dot(p, v)", mma=[])], fp64_arithmetic={}, fp64_lines=[],
               local_memory_instructions=0)


def test_an_arch_the_dispatch_table_routes_elsewhere_is_listed_not_failed():
    """Attention on a T4 runs the portable path (ops/_backend.py): its sm_75 compiles' problems (no tensor cores,
    spills) are listed apart; the same problem on an arch the table sends the kernels to fails the check."""
    on_t4 = clean_record(target="sm_75", dtype="float16", sass=FMA_DOT)
    on_a100 = clean_record(target="sm_80", dtype="bfloat16", sass=FMA_DOT)
    for record in (on_t4, on_a100):
        record["failures"] = compile_check.failures(record)
        assert record["failures"]
    failed, routed = compile_check.triage([on_t4, on_a100])
    assert on_t4["routed"] == "portable" and on_a100["routed"] is None
    assert [line.split()[1] for line in routed] == ["sm_75"] and [line.split()[1] for line in failed] == ["sm_80"]
    assert compile_check.table_arch("sm_90a") == "sm_90" and compile_check.dispatched(
        "w2vbert_fast.ops.rel_key_attention", "sm_90a", "float32")


def test_an_fp32_dot_may_run_as_fma_where_the_kernel_chose_ieee_precision():
    """The fbank's mel sum is an fp32 "ieee" dot on purpose (the weak mel bins need it)."""
    record = clean_record(kernel="_log_mel_kernel", module="w2vbert_fast.ops.log_mel_fbank", dtype="float32",
                          sass=FMA_DOT)
    assert compile_check.failures(record) == []


def test_attention_fp32_dots_must_stay_on_tensor_cores():
    """Attention's fp32 dots are three tf32 products: an FMA dot there is ~15x slower and fails the check."""
    record = clean_record(dtype="float32", sass=FMA_DOT)
    assert any("without tensor-core MMA" in why for why in compile_check.failures(record))


# --------------------------------------------------------------------------------------- the registry: LAUNCH_META
def _fake_helper(n):
    return n + 1


def _fake_step(n):
    return n * 2


def _fake_loop(STEP, n):
    return STEP(n)


def _fake_kernel(x_ptr, n, BLOCK):
    _fake_loop(_fake_step, _fake_helper(n))


def fake_ops_module(launch_meta=None):
    """A stand-in ops module: one kernel, a helper it calls, a loop helper and the step it hands that one by name."""
    from triton.runtime.jit import JITFunction

    module = types.ModuleType("fake_ops")
    for fn in (_fake_helper, _fake_step, _fake_loop, _fake_kernel):
        copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__)
        copy.__module__ = module.__name__
        setattr(module, fn.__name__, JITFunction(copy))
    if launch_meta is not None:
        module.LAUNCH_META = launch_meta(module)
    return module


def fake_launch(module, args):
    import triton

    from w2vbert_fast.ops._backend import KernelLaunch

    return KernelLaunch(module._fake_kernel, lambda shape, dtype: dict(args), lambda dtype: [
        triton.Config({"BLOCK": 64}, num_warps=4)], dtypes=("float32",))


@pytest.mark.parametrize("launch_meta, problem", [
    (None, "fake_ops:_fake_kernel: a kernel with no entry in fake_ops's LAUNCH_META (add one)"),
    (lambda m: {}, "fake_ops:_fake_kernel: a kernel with no entry in fake_ops's LAUNCH_META (add one)"),
    (lambda m: {"_fake_kernel": fake_launch(m, dict(x_ptr="fp32"))}, "LAUNCH_META entry out of date: missing ['n']"),
    (lambda m: {"_fake_kernel": fake_launch(m, dict(x_ptr="fp32", n=3, m=1))}, "unknown ['m']"),
    (lambda m: {"_renamed_kernel": fake_launch(m, dict(x_ptr="fp32", n=3))}, "in LAUNCH_META but no such kernel"),
    (lambda m: {"_fake_kernel": fake_launch(m, dict(x_ptr="fp32", n=3))}, None),
    (lambda m: {"_fake_kernel": fake_launch(m, dict(x_ptr="fp32", n=3)),
                "_fake_kernel+variant": fake_launch(m, dict(x_ptr="fp32", n=3))}, None),
], ids=["no-launch-meta", "no-entry", "missing-argument", "unknown-argument", "renamed", "complete", "variant"])
def test_the_registry_is_each_op_files_launch_meta(monkeypatch, launch_meta, problem):
    """A kernel (a JIT function no other one uses: helpers called or handed on by name are not kernels) needs a
    LAUNCH_META entry whose example arguments name exactly its parameters (with a config's meta-parameters)."""
    module = fake_ops_module(launch_meta)
    monkeypatch.setattr(compile_check, "_ops_modules", lambda: [module])
    assert sorted(compile_check.discover_kernels()) == ["fake_ops:_fake_kernel"]
    problems = compile_check.check_registry()
    if problem is None:
        assert problems == {}
    else:
        assert any(problem in why for why in problems.values()), problems


def test_the_report_says_which_path_each_arch_gets_and_lists_routed_compiles_apart():
    """RESULTS.md's compile section (compile_report.py): the dispatch table per arch, a routed compile's cell marked
    and its problems under their own heading, not under Failures."""
    import compile_report

    on_t4 = clean_record(target="sm_75", dtype="float16", sass=dict(FMA_DOT, tensor_core={}),
                         config=dict(BLOCK_M=32, num_warps=4))
    on_h100 = clean_record(config=dict(BLOCK_M=32, num_warps=4))
    on_h100["sass"]["tensor_core"] = {"HGMMA.64x64x16.F32.BF16": 4}
    for record in (on_t4, on_h100):
        record["failures"] = compile_check.failures(record)
    failed, routed = compile_check.triage([on_t4, on_h100])
    document = {"compile_check": dict(plan="full", commit="abc1234", triton="3.9.0"), "records": [on_h100, on_t4],
                "failures": failed, "routed_elsewhere": routed}
    lines = compile_report.render_section([document])
    text = "\n".join(lines)
    assert "| sm_75 (T4, RTX 20xx) | portable (fp16, fp32); bf16 refused | Triton (fp16, fp32); bf16 refused | " \
           "Triton (fp16, bf16, fp32) |" in lines
    assert "| sm_90a (H100, H200) | Triton (fp16, bf16, fp32) | Triton (fp16, bf16, fp32) |" in text
    header = next(line for line in lines if line.startswith("| config | dtype |"))
    assert header.endswith("| triton 3.9.0, sm_90a | triton 3.9.0, sm_80 | triton 3.9.0, sm_75 |")
    row = next(line for line in lines if line.startswith("| BLOCK_M=32; 4 w | fp16 |"))
    assert row.endswith("| 128 · 64 KB · 12 ✗ → portable |")
    assert "all pass" in text and "### Failures" not in text
    assert "### Routed to the portable path (not failures)" in text and "without tensor-core MMA" in text


def test_a_git_archive_snapshot_records_the_commit_git_archive_stamped(tmp_path, monkeypatch):
    """The long check runs from ``git archive HEAD | tar -x`` (no .git): the commit comes from the export-subst file."""
    stamp = tmp_path / "benchmarks" / "tools" / "archive_commit"
    stamp.parent.mkdir(parents=True)
    monkeypatch.setattr(compile_check, "ROOT", str(tmp_path))
    stamp.write_text("$Format:%H$\n")  # a checkout, not an archive: nothing stamped
    assert compile_check._commit() is None
    stamp.write_text("50c521c0123456789abcdef0123456789abcdef0\n")
    assert compile_check._commit() == "50c521c"


def test_git_archive_stamps_the_commit_file():
    archive = subprocess.run(["git", "-C", ROOT, "archive", "HEAD", "benchmarks/tools/archive_commit"],
                             capture_output=True, check=True).stdout
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        stamped = tar.extractfile("benchmarks/tools/archive_commit").read().decode().strip()
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert stamped == head
