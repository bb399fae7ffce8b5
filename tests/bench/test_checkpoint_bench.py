"""`shoal bench checkpoint` once, tiny: a plain and a checkpointing run, and every output is
written. (Benchmarks never assert timings in tests.)"""

import json

from tests.conftest import shoal


def test_the_checkpoint_benchmark_runs_a_pair(tmp_path):
    result = shoal("bench", "checkpoint", "--task", "quadratic", "--steps", "20", "--every", "10",
                   "--pairs", "1", "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md"))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "c.json").read_text())
    assert [p["error"] for p in data["pairs"]] == [None]
    assert [s["step"] for s in data["pairs"][0]["saves"]] == [10, 20]
    assert data["summary"]["saves"] == 2 and data["summary"]["write_megabytes_per_second"] > 0
    assert "Median step-time ratio" in (tmp_path / "c.md").read_text()
