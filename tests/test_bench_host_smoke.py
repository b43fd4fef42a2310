"""CPU check of benchmarks/bench_host.py (the host cost of one eager loss call, launches
stubbed): it runs in a subprocess (so Triton's interpreter is set before any kernel import),
writes its JSON, and counts what it should. No timing is asserted."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_benchmark_counts_launches_and_ops_of_each_provider(tmp_path):
    out = tmp_path / "host.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_host.py"), "--rounds", "2", "--calls", "5"]
    proc = subprocess.run([*cmd, "--json", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert set(rows) == {"fastpref", "fastpref-metrics-read", "eager-diffusers", "autograd-floor"}
    # the fused forward (row sums + head) and backward: three launches, all stubbed; the eager
    # block and the floor launch none
    assert rows["fastpref"]["launches"] == rows["fastpref-metrics-read"]["launches"] == 3
    # unread metrics make no view; reading them makes theirs (more aten ops, the same launches)
    assert rows["fastpref-metrics-read"]["aten_ops"] > rows["fastpref"]["aten_ops"]
    assert rows["eager-diffusers"]["launches"] == 0 and rows["autograd-floor"]["launches"] == 0
    # the fused call dispatches a handful of aten ops (allocations and views); the eager block
    # its whole op chain forward and backward
    assert 0 < rows["fastpref"]["aten_ops"] < rows["eager-diffusers"]["aten_ops"] / 4
    for row in rows.values():
        assert row["host_us"] > 0 and row["host_us_median"] >= row["host_us"]
    assert result["ratio"] == rows["fastpref"]["host_us"] / rows["eager-diffusers"]["host_us"]
    assert result["floor_ratio"] == rows["autograd-floor"]["host_us"] / rows["eager-diffusers"]["host_us"]
    assert "fastpref / eager-diffusers host time" in proc.stdout
