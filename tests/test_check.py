"""``python -m w2vbert_fast check`` (cli/check.py): the bug-report command. CI runs it as a user would, on the CPU;
then a wrong op, a crashing op and a backend that cannot run here must each make it fail (exit status 1) while the
rest of the report is still printed."""

import os
import subprocess
import sys

import torch

import w2vbert_fast.ops
from w2vbert_fast import cli

OPS = ("rel_key_attention", "glu_depthwise_conv", "log_mel_fbank")


def test_check_runs_on_this_machine_and_every_op_passes():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "W2VBERT_FAST_BACKEND")}
    done = subprocess.run([sys.executable, "-m", "w2vbert_fast", "check"], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "w2vbert_fast check"
    assert f"torch {torch.__version__}" in lines[1] and "triton " in lines[1] and "CUDA " in lines[1]
    assert lines[2].startswith("  cpu: ") and "CPUs" in lines[2]
    assert "W2VBERT_FAST_BACKEND=auto on cpu:" in lines
    # the path each op takes in each dtype and why, then one run per op and dtype, each passing
    for op in OPS:
        assert sum(line.split()[:1] == [op] and "cpu tensors:" in line for line in lines) == 3
    runs = [line for line in lines if line.split()[:1] in ([op] for op in OPS) and ("PASS" in line or "FAIL" in line)]
    assert [line.split()[:2] for line in runs] == [
        ["rel_key_attention", "float32"], ["rel_key_attention", "bfloat16"], ["glu_depthwise_conv", "float32"],
        ["glu_depthwise_conv", "bfloat16"], ["log_mel_fbank", "float32"]]
    assert all(line.split()[2:4] == ["fast", "PASS:"] for line in runs), runs
    assert "forward max" in runs[0] and "dq rel" in runs[0] and "features max" in runs[-1]
    assert lines[-1] == "5 of 5 runs passed"


def test_a_wrong_or_crashing_op_fails_the_check_and_the_report_goes_on(monkeypatch, capsys):
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", "auto")
    monkeypatch.setattr(w2vbert_fast.ops, "log_mel_fbank", lambda waves, lengths: torch.zeros(2, 98, 80))

    def crash(*args, **kwargs):
        raise RuntimeError("a kernel failed to launch")

    monkeypatch.setattr(w2vbert_fast.ops, "glu_depthwise_conv", crash)
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "log_mel_fbank      float32  fast      FAIL: features max" in out and "✗" in out
    assert "glu_depthwise_conv float32  fast      FAIL: RuntimeError: a kernel failed to launch" in out
    assert "rel_key_attention  float32  fast      PASS" in out
    assert out.rstrip().endswith("2 of 5 runs passed, 3 FAILED")


def test_a_backend_that_cannot_run_here_fails_the_check(monkeypatch, capsys):
    monkeypatch.setenv("W2VBERT_FAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "W2VBERT_FAST_BACKEND=triton on cpu:" in out and "needs Triton's interpreter" in out
    assert out.rstrip().endswith("0 of 5 runs passed, 5 FAILED")
