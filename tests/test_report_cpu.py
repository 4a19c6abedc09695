"""benchmarks/tools/report.py on the CPU benchmarks' documents: bench_cpu_contention.py's JSON gets a section of its
own, and bench_cpu_peers.py's rows show their parity error, first call and load."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "tools"))
import report  # noqa: E402


def contention_document():
    row = {"FbankExtractor": 30.5, "FbankExtractor before": 850.0, "transformers extractor": 1133.0,
           "encoder ours": 1539.4, "encoder transformers sdpa": 1502.1, "encoder speed-up": 0.976}
    condition = dict(load_before=[0.2, 0.1, 0.1], load_started=[0.2, 0.1, 0.1], load_after=[2.1, 1.0, 0.5], runs={})
    return {"environment": {"commit": "b" * 40, "torch": "2.13.0", "cores": 2, "before": "0575987"},
            "thread_counts": [1, 2], "busy_processes": 2, "conditions": {"quiet": condition, "loaded": condition},
            "summary": {"loaded, 2 threads": row}, "note": "shared machine"}


def test_a_contention_run_gets_its_own_section_with_one_row_per_condition():
    text = report.render([("/x/cpu-contention-b.json", contention_document())])
    assert "## CPU under contention (2 cores, `cpu-contention-b.json`)" in text
    assert "quiet: 0.2 before, 2.1 after" in text
    rows = [line for line in text.splitlines() if line.startswith("| loaded, 2 threads |")]
    assert rows == ["| loaded, 2 threads | 30.5 | 850.0 | 1,133 | 1,539 | 1,502 | 0.98× | — |"]


def test_a_contention_run_with_alternating_rounds_shows_the_median_per_round_ratio():
    document = contention_document()
    document["summary"]["loaded, 2 threads"]["encoder speed-up, median per round"] = 1.041
    text = report.render([("/x/cpu-contention-b.json", document)])
    rows = [line for line in text.splitlines() if line.startswith("| loaded, 2 threads |")]
    assert rows == ["| loaded, 2 threads | 30.5 | 850.0 | 1,133 | 1,539 | 1,502 | 0.98× | 1.04× |"]


def test_a_contention_document_is_not_taken_for_pytest_benchmark_output(tmp_path):
    import json

    path = tmp_path / "cpu-contention.json"
    path.write_text(json.dumps(contention_document()))
    assert report.load([str(path)])[0][1]["busy_processes"] == 2


def test_peer_rows_show_their_error_first_call_and_load():
    info = dict(device="cpu (x86_64, 2 cores)", torch="2.13.0", commit="c" * 40, case="CPU peers, 1 layer + adapter, 2 s",
                claim=False, error_vs_transformers=0.0104, first_call_s=42.8, load_average=[3.4, 2.0, 1.0])
    document = {"datetime": "2030-01-01T00:00:00", "benchmarks": [
        {"name": "a", "stats": {"median": 0.2}, "extra_info": dict(info, contender="transformers sdpa",
                                                                  role="reference", median_ms=200.0)},
        {"name": "b", "stats": {"median": 0.1}, "extra_info": dict(info, contender="ours, bf16", median_ms=100.0)}]}
    from test_report import table_rows

    row = table_rows(report.render([("/x/peers.json", document)]), "CPU peers, 1 layer + adapter, 2 s")["ours, bf16"]
    assert row["vs reference"] == "2.00×"
    assert row["error vs transformers fp32"] == "1.0e-02"
    assert row["first call"] == "42.8 s" and row["load (1 min)"] == "3.4"


def test_a_mask_cost_run_gets_a_row_per_pass_and_mask_form():
    document = {"what": "ops.rel_key_attention: cost of a key mask", "device": "cpu", "dtype": "float32",
                "shape": {"batch": 2, "length": 1000, "heads": 16, "head_dim": 64, "real_frames": [1000, 700]},
                "torch": "2.13.0", "threads": 2, "commit": "17163c7", "rounds": 11,
                "load_average_before": [1.3, 1.7, 2.5], "load_average_after": [1.6, 1.8, 2.5],
                "results": {"forward": {"lengths": {"median_ms": 155.1, "min_ms": 133.7, "ratio_to_lengths": 1.0},
                                        "lengths+key_mask": {"median_ms": 144.3, "min_ms": 127.3,
                                                             "ratio_to_lengths": 0.93}}}}
    text = report.render([("/x/mask-cost-cpu-17163c7.json", document)])
    assert "## Cost of a key mask (cpu, float32, `mask-cost-cpu-17163c7.json`)" in text
    assert "| forward | lengths+key_mask | 144.3 | 127.3 | 0.93× |" in text


def test_a_bf16_isa_run_gets_a_row_per_cap_with_the_onednn_kernel_it_ran(tmp_path):
    import json

    def times(fp32, bf16, error):
        return {"fp32": {"median_ms": fp32, "error_vs_transformers_fp32": 0.0},
                "bf16": {"median_ms": bf16, "error_vs_transformers_fp32": error}}

    ours, theirs = times(250.0, 80.0, 0.014), times(260.0, 90.0, 0.013)
    results = {f"{name}, {dtype}": row for name, rows in (("ours", ours), ("transformers sdpa", theirs))
               for dtype, row in rows.items()}
    document = {"environment": {"commit": "d" * 40, "torch": "2.13.0", "cores": 2, "threads": 2},
                "options": {"layers": 2, "seconds": 6.0, "rounds": 5}, "caveat": "caps oneDNN only",
                "caps": {"AVX512_CORE_BF16": {"results": results, "speed_up_bf16": {"ours": 3.12,
                                                                                   "transformers sdpa": 2.89},
                                              "onednn": {"bfloat16": ["cpu,inner_product,brg:avx512_core_bf16"]},
                                              "load_before": [0.4, 0.3, 0.2]}}}
    path = tmp_path / "cpu-bf16-isa-d.json"
    path.write_text(json.dumps(document))
    text = report.render(report.load([str(path)]))
    assert "## bf16 on a CPU, by instruction set (2 cores, `cpu-bf16-isa-d.json`)" in text
    assert ("| AVX512_CORE_BF16 | 250.0 | 80.0 | 3.12× | 260.0 | 90.0 | 2.89× | 0.014 / 0.013 | "
            "brg:avx512_core_bf16 | 0.4 |") in text
