"""cli/common.py: the commands size torch's threads from the CPUs the process may really use (affinity mask,
cgroup v2 / v1 CPU quota, rounded down, at least 1); --threads, then OMP_NUM_THREADS, win; the commands say so in
their start line."""

import os

import numpy as np

import pytest
import torch

from w2vbert_fast.cli import common as threads
from w2vbert_fast.cli import main
from w2vbert_fast.cli.common import apply_threads, cgroup_cpu_limit, choose_threads, command_threads


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A fake machine: ``machine(affinity=N, proc="0::/", files={relative path: text})`` sets the affinity mask,
    /proc/self/cgroup and files under a fake /sys/fs/cgroup (tmp_path/cgroup); OMP_NUM_THREADS and
    LOCAL_WORLD_SIZE unset."""
    root = tmp_path / "cgroup"
    root.mkdir()
    monkeypatch.setattr(threads, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(threads, "PROC_CGROUP", str(tmp_path / "proc-self-cgroup"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)

    def make(affinity=8, proc="0::/\n", files=None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        (tmp_path / "proc-self-cgroup").write_text(proc)
        for path, text in (files or {}).items():
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(text)

    return make


V2 = {"cgroup.controllers": "cpu io memory\n"}


def test_no_quota_gives_the_affinity_mask(machine):
    machine(affinity=6, files={**V2, "cpu.max": "max 100000\n"})
    choice = choose_threads()
    assert choice.threads == 6
    assert "affinity 6 CPUs, no cgroup CPU quota" in choice.reason


@pytest.mark.parametrize("quota, expected", [("250000 100000", 2), ("150000 100000", 1), ("50000 100000", 1),
                                             ("400000 50000", 8), ("1600000 100000", 8)],
                         ids=["2.5 CPUs", "1.5 CPUs", "half a CPU", "8 CPUs, 50 ms period", "quota above affinity"])
def test_a_cgroup_v2_quota_caps_the_affinity_rounded_down_at_least_one(machine, quota, expected):
    machine(affinity=8, files={**V2, "cpu.max": quota + "\n"})
    choice = choose_threads()
    assert choice.threads == expected
    assert "cgroup CPU quota" in choice.reason


def test_a_parent_cgroups_quota_binds_its_children(machine):
    machine(proc="0::/job/step\n", files={**V2, "job/cpu.max": "300000 100000", "job/step/cpu.max": "max 100000"})
    assert cgroup_cpu_limit() == 3.0
    assert choose_threads().threads == 3


def test_a_cgroup_path_outside_the_mount_falls_back_to_the_mount_root(machine):
    """A container without its own cgroup namespace lists the host's path; its /sys/fs/cgroup is its own cgroup."""
    machine(proc="0::/system.slice/docker-abc.scope\n", files={**V2, "cpu.max": "200000 100000"})
    assert choose_threads().threads == 2


def test_a_hybrid_systems_unified_hierarchy_is_read(machine):
    machine(proc="1:cpu:/\n0::/\n", files={"unified/cpu.max": "200000 100000"})
    assert choose_threads().threads == 2


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_a_cgroup_v1_cfs_quota_caps_the_affinity(machine, mount):
    machine(affinity=16, proc="4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n",
            files={f"{mount}/cpu.cfs_quota_us": "300000", f"{mount}/cpu.cfs_period_us": "100000",
                   f"{mount}/docker/abc/cpu.cfs_quota_us": "-1", f"{mount}/docker/abc/cpu.cfs_period_us": "100000"})
    assert cgroup_cpu_limit() == 3.0
    assert choose_threads().threads == 3


def test_unreadable_or_garbled_cgroup_files_mean_no_quota(machine):
    machine(affinity=4, files={**V2, "cpu.max": "lots\n"})
    assert cgroup_cpu_limit() is None
    assert choose_threads().threads == 4


def test_the_processes_of_a_torchrun_machine_share_its_cpus(machine, monkeypatch):
    machine(affinity=8, files={**V2, "cpu.max": "max 100000"})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    choice = choose_threads()
    assert choice.threads == 2 and "shared by 3 processes" in choice.reason


@pytest.mark.parametrize("value, expected", [("3", 3), ("4,2", 4)])
def test_omp_num_threads_set_by_the_user_wins_over_the_quota(machine, monkeypatch, value, expected):
    machine(affinity=8, files={**V2, "cpu.max": "100000 100000"})
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    choice = choose_threads()
    assert choice.threads == expected
    assert choice.reason == f"OMP_NUM_THREADS={value} from the environment"


def test_an_omp_num_threads_that_is_not_a_number_is_ignored_and_said(machine, monkeypatch):
    machine(affinity=2)
    monkeypatch.setenv("OMP_NUM_THREADS", "many")
    choice = choose_threads()
    assert choice.threads == 2 and "OMP_NUM_THREADS='many' is not a positive number, ignored" in choice.reason


def test_the_threads_option_wins_over_everything(machine, monkeypatch):
    machine(affinity=8, files={**V2, "cpu.max": "100000 100000"})
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert choose_threads(requested=3) == threads.ThreadChoice(3, "--threads 3")


@pytest.mark.parametrize("bad", [0, -2, True, 1.5])
def test_the_threads_option_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="--threads must be a positive number of threads"):
        choose_threads(requested=bad)


def test_apply_sets_torch_and_the_command_scope_restores_it():
    before = torch.get_num_threads()
    try:
        assert apply_threads(threads.ThreadChoice(1, "test")) == before
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with command_threads(requested=1) as choice:
        assert choice.threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------- the commands
def test_demo_states_its_threads_in_its_start_line(capsys):
    assert main(["demo", "--tiny", "--no-transformers", "--threads", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("w2vbert_fast demo on cpu, float32, 1 torch thread (--threads 1)"), first


def test_extract_states_its_threads_in_its_start_line(tmp_path, capsys, monkeypatch):
    from test_cli import write_wav

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_wav(tmp_path / "a.wav", 0.1 * np.sin(np.arange(16000) * 0.05))
    assert main(["extract", str(tmp_path / "a.wav"), "--out", str(tmp_path / "out"), "--random-weights", "tiny",
                 "--quiet"]) == 0
    start = capsys.readouterr().err.splitlines()[0]
    assert start.startswith("extract: 1 inputs, 0 already written (skipped), 1 to do; layer 2 of tiny"), start
    assert start.endswith("on cpu, float32; 1 torch thread (OMP_NUM_THREADS=1 from the environment)"), start


def test_a_bad_threads_option_is_a_usage_error(capsys):
    assert main(["demo", "--tiny", "--threads", "0"]) == 2
    assert "--threads must be a positive number of threads, got 0" in capsys.readouterr().err


def test_bench_gives_its_benchmark_processes_the_thread_count(tmp_path, monkeypatch, capsys):
    from w2vbert_fast.cli import bench

    environments = []

    def run(command, **kwargs):
        environments.append(kwargs.get("env"))
        json_arg = [a for a in command if str(a).startswith("--benchmark-json=")]
        if json_arg:
            open(json_arg[0].split("=", 1)[1], "w").write("{}")
        return bench.subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench.subprocess, "run", run)
    assert main(["bench", "--json", str(tmp_path / "cpu.json"), "--threads", "1", "-k", "encoder"]) == 0
    assert environments[0]["OMP_NUM_THREADS"] == "1"
    assert "bench: 1 torch thread (--threads 1)" in capsys.readouterr().err
