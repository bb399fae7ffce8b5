"""`shoal bench straggler` once, tiny: both runs complete with a slow worker and every output
is written. (Benchmarks never assert timings in tests.)"""

import json

from tests.conftest import shoal


def test_the_straggler_benchmark_runs_both_strategies(tmp_path):
    result = shoal("bench", "straggler", "--task", "quadratic", "--workers", "2", "--steps", "20",
                   "--factor", "3", "--target-loss", "1e9", "--json", str(tmp_path / "s.json"),
                   "--markdown", str(tmp_path / "s.md"))
    assert result.returncode == 0, result.stderr
    runs = json.loads((tmp_path / "s.json").read_text())["runs"]
    assert [(r["label"], r["error"], r["steps"]) for r in runs] == [("allreduce", None, 20), ("async", None, 20)]
    assert all(r["seconds_to_target"] is not None and r["curve"] for r in runs)
    markdown = (tmp_path / "s.md").read_text()
    assert "| async | 20 |" in markdown and "--slowdown 1=3" in markdown
