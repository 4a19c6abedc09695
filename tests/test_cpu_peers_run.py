"""benchmarks/tools/cpu_peers_run.py, the committed CPU peers run's one command: it refuses a busy machine (the load
average above --max-load) before starting anything."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "benchmarks", "tools", "cpu_peers_run.py")


def test_a_busy_machine_is_refused_before_any_work(tmp_path):
    out = tmp_path / "peers.json"
    result = subprocess.run([sys.executable, TOOL, "--max-load", "-1", "--json", str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "not a quiet machine; wait, or pass --max-load" in result.stderr
    assert not out.exists()
