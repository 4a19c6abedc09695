"""The one-call GPU campaign (benchmarks/tools/campaign.py) as a CPU smoke test: the budget holds, a timed-out case
keeps the results of the tests it finished, and the merged JSON is what benchmarks/tools/report.py reads."""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    path = os.path.join(REPO, "benchmarks", "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"w2vbert_fast_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


SLOW_SUITE = '''
import time


def test_first(benchmark):
    benchmark.extra_info.update(case="smoke", contender="first", median_ms=1.0, role="reference")
    benchmark.pedantic(lambda: None, rounds=1)


def test_second(benchmark):
    benchmark.extra_info.update(case="smoke", contender="second", median_ms=0.5)
    benchmark.pedantic(lambda: None, rounds=1)


def test_hangs():
    time.sleep(600)
'''


def test_a_case_past_its_timeout_is_killed_and_keeps_what_it_finished(tmp_path):
    campaign = load("campaign")
    suite = tmp_path / "bench_smoke.py"
    suite.write_text(SLOW_SUITE)
    out = tmp_path / "out"
    out.mkdir()
    case = campaign.Case("smoke", [str(suite), "-p", "no:randomly"], cap_s=60, what="a suite whose last test hangs")
    timeout = 25.0
    start = time.monotonic()
    status = campaign.run_case(case, 1, str(out), timeout, campaign.case_environment(2))
    wall = time.monotonic() - start
    assert status["status"] == "timeout" and status["rc"] is None
    assert status["killed_in"].endswith("::test_hangs")
    assert wall < timeout + 10, f"the case ran {wall:.0f} s past a {timeout:.0f} s timeout"
    records = campaign.read_jsonl(str(out / "01-smoke.jsonl"))
    tests = [r["nodeid"].split("::")[-1] for r in records if r["type"] == "test"]
    assert tests == ["test_first", "test_second"]
    document = campaign.merged_document(str(out), {"device": "cpu (test)", "commit": None})
    assert [b["extra_info"]["contender"] for b in document["benchmarks"]] == ["first", "second"]
    assert all(b["stats"]["rounds"] == 1 for b in document["benchmarks"])


def test_campaign_command_respects_its_budget_and_writes_json_report_py_reads(tmp_path):
    budget = 40
    out = tmp_path / "campaign"
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "w2vbert_fast", "bench", "--budget-s", str(budget), "--out", str(out),
         "--cases", "conv,fbank,encoder"],
        cwd=REPO, capture_output=True, text=True, timeout=budget + 120,
        env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"),
    )
    wall = time.monotonic() - start
    # the campaign itself, started after python and torch imported, must end inside the budget; the slack is
    # for the interpreter's start and the last case's kill
    assert wall < budget + 20, f"{wall:.0f} s for a {budget} s budget\n{result.stdout}\n{result.stderr}"
    assert result.returncode in (0, 1), result.stderr
    statuses = [json.loads(line) for line in (out / "campaign.jsonl").read_text().splitlines()]
    assert [s["case"] for s in statuses] == ["conv", "fbank", "encoder"]
    allowed = {"passed", "failed", "timeout", "skipped (budget)", "nothing-selected"}
    assert {s["status"] for s in statuses} <= allowed
    assert "issue" in (out / "summary.txt").read_text() and "issue" in result.stdout
    report = load("report")
    documents = report.load([str(out / "campaign-results.json")])
    finished = [s for s in statuses if s.get("tests", {}).get("passed")]
    if finished:  # every benchmark a finished case ran is in the merged file
        assert documents[0][1]["benchmarks"]
        assert "| contender |" in report.render(documents)


def test_unknown_case_is_a_usage_error():
    campaign = load("campaign")
    with pytest.raises(SystemExit):
        campaign.main(["--budget-s", "5", "--cases", "nonsense"])


def test_summary_judges_each_target_from_the_rows_it_names():
    campaign = load("campaign")

    def row(case, contender, ms, **extra):
        return {"extra_info": dict(case=case, contender=contender, median_ms=ms, **extra), "stats": {"median": ms}}

    attention = "rel_key_attention core B16-L1500"
    document = {"benchmarks": [
        row(attention, "ours", 1.0),
        row(attention, "transformers bias + sdpa", 5.0),  # 5x: met (>= 4)
        row(attention, "sdpa, no bias (ceiling)", 0.5),  # 0.5x: missed (>= 0.8)
        row("encoder B8 x 30 s", "ours + CUDA graph", 90.0),  # listed first: "ours" must still find "ours"
        row("encoder B8 x 30 s", "ours", 100.0, mfu=0.55),
        row("long audio 60 min", "ours", 20000.0),  # 20 s: missed (<= 15 s)
    ]}
    verdicts = {}
    for _, name, value, bound, higher, _ in campaign.targets(campaign.rows_by_case(document)):
        verdicts[name] = (value, None if value is None else (value >= bound if higher else value <= bound))
    assert verdicts["attention L=1500 vs transformers bias + sdpa"] == (5.0, True)
    assert verdicts["attention L=1500 vs SDPA without bias (ceiling)"] == (0.5, False)
    assert verdicts["attention L=1500 vs FlexAttention"] == (None, None)
    assert verdicts["encoder MFU"] == (0.55, True)
    assert verdicts["encoder: ours + CUDA graph vs ours"] == (100.0 / 90.0, True)
    assert verdicts["long audio, 60 min in seconds"] == (20.0, False)
    text = campaign.summary([], document, 480, 100, {"device": "test"})
    assert "MISSED" in text and "not measured" in text


def test_the_autotune_cap_keeps_each_precisions_own_first_configs():
    """Attention's autotuners list every precision's configs and prune to the launch's own: a cap that cut the
    list itself would leave fp32 launches with none."""
    import types

    plugin = load("campaign_plugin")
    attention = importlib.import_module("w2vbert_fast.ops.rel_key_attention")
    tables = attention.FORWARD_CONFIGS
    tuner = types.SimpleNamespace(configs=attention._configs(tables, interpreted=False),
                                  early_config_prune=attention._pruner(tables))
    assert plugin.cap_autotuner(tuner, 1)
    for dot_precision, precision in (("tf32", "half"), ("tf32x3", "fp32")):
        kept = tuner.early_config_prune(tuner.configs, {}, DOT_PRECISION=dot_precision)
        assert [c.all_kwargs() for c in kept] == [c.all_kwargs() for c in tables[precision][:1]]

    plain = types.SimpleNamespace(configs=["a", "b", "c"], early_config_prune=None)
    assert plugin.cap_autotuner(plain, 2) and plain.configs == ["a", "b"]
    assert not plugin.cap_autotuner(plain, 2)
