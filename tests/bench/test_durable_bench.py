"""`shoal bench checkpoint` and `shoal bench memory` once each, tiny: every run completes and
every output is written. (Benchmarks never assert timings in tests.)"""

import json

from tests.conftest import shoal


def test_the_checkpoint_benchmark_runs_a_pair(tmp_path):
    result = shoal("bench", "checkpoint", "--task", "quadratic", "--workers", "1", "--steps", "20", "--every", "10",
                   "--pairs", "1", "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md"))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert [p["error"] for p in data["pairs"]] == [None]
    assert [s["step"] for s in data["pairs"][0]["saves"]] == [10, 20]
    assert data["summary"]["saves"] == 2 and data["summary"]["write_megabytes_per_second"] > 0
    assert "Median step-time ratio" in (tmp_path / "c.md").read_text()


def test_the_memory_benchmark_compares_zero_with_allreduce(tmp_path):
    result = shoal("bench", "memory", "--task", "quadratic", "--workers", "1", "--zero-replicas", "2",
                   "--steps", "1", "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md"))
    assert result.returncode == 0, result.stderr
    row, = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert row["error"] is None and (row["workers"], row["replicas"]) == (1, 2)
    assert row["zero"]["parameters"] == row["allreduce"]["parameters"] > 0  # one worker: nothing to shard
    assert "| 1 | 2 |" in (tmp_path / "m.md").read_text()
