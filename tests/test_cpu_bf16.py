"""--dtype bfloat16 on a CPU, a documented mode of extract and demo (README "On a CPU"): it runs, stores bfloat16,
and stays within bf16 error of the fp32 run of the same model (tiny random model, fp32 reference)."""

import re

import numpy as np
import pytest
import torch
from test_cli import write_wav

from w2vbert_fast import load_features
from w2vbert_fast.cli import main


def extract_layer(tmp_path, dtype):
    out = tmp_path / f"out-{dtype}"
    assert main(["extract", str(tmp_path / "clips"), "--out", str(out), "--random-weights", "tiny", "--device", "cpu",
                 "--dtype", dtype, "--quiet"]) == 0
    return dict(load_features(str(out)))


def test_extract_in_bfloat16_on_a_cpu_stores_bf16_within_bf16_error_of_fp32(tmp_path):
    (tmp_path / "clips").mkdir()
    rng = np.random.default_rng(0)
    for i, seconds in enumerate([1.0, 2.5]):
        t = np.arange(int(seconds * 16000)) / 16000
        write_wav(tmp_path / "clips" / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * 220 * t * (1 + t)) +
                  0.01 * rng.standard_normal(t.size))
    fp32, bf16 = extract_layer(tmp_path, "float32"), extract_layer(tmp_path, "bfloat16")
    assert fp32.keys() == bf16.keys() == {"c0", "c1"}
    for name, reference in fp32.items():
        assert reference.dtype == torch.float32 and bf16[name].dtype == torch.bfloat16
        assert bf16[name].shape == reference.shape
        relative = ((bf16[name].double() - reference.double()).norm() / reference.double().norm()).item()
        assert 0 < relative < 0.05, relative  # bf16 keeps 8 bits: ~0.4 % a value, a few % after two layers


def test_demo_in_bfloat16_on_a_cpu_reports_a_bf16_sized_error(capsys):
    assert main(["demo", "--tiny", "--no-transformers", "--device", "cpu", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("w2vbert_fast demo on cpu, bfloat16")
    relative = float(re.search(r"relative error ([0-9.e+-]+)", out).group(1))
    assert relative < 0.05, out


@pytest.mark.parametrize("amx", [False, True], ids=["cpu-without-amx", "cpu-with-amx"])
def test_bfloat16_on_a_cpu_without_amx_warns_that_float32_is_likely_faster(monkeypatch, capsys, amx):
    from w2vbert_fast.cli import common

    monkeypatch.setattr(common, "cpu_has_amx", lambda: amx)
    assert common.resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    warned = "--dtype float32 is likely faster here" in capsys.readouterr().err
    assert warned == (not amx)
    common.resolve_device_dtype("cpu", "float32")
    assert capsys.readouterr().err == ""
