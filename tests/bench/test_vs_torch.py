"""`shoal bench overhead`, `recovery` and `scaling` once each, tiny: the torch and shoal
runs complete, the counts that do not depend on timing are right, every output is written.
(Benchmarks never assert timings in tests.)"""

import json

from tests.conftest import shoal


def _outputs(tmp_path, name):
    return ["--json", str(tmp_path / f"{name}.json"), "--markdown", str(tmp_path / f"{name}.md"),
            "--plot", str(tmp_path / f"{name}.png")]


def test_the_overhead_benchmark_times_torchrun_and_shoal(tmp_path):
    result = shoal("bench", "overhead", "--task", "quadratic", "--workers", "1", "--steps", "8", "--warmup", "2",
                   "--pairs", "1", *_outputs(tmp_path, "o"))
    assert result.returncode == 0, result.stderr
    [pair] = json.loads((tmp_path / "o.json").read_text())["pairs"]
    assert pair["error"] is None and pair["torch_step_seconds"] > 0 and pair["shoal_step_seconds"] > 0
    assert "shoal bench overhead --task quadratic" in (tmp_path / "o.md").read_text()
    assert (tmp_path / "o.png").stat().st_size > 0


def test_the_recovery_benchmark_counts_what_each_tool_redoes(tmp_path):
    result = shoal("bench", "recovery", "--task", "quadratic", "--workers", "2", "--steps", "12",
                   "--kill-step", "7", "--checkpoint-every", "5", "--pairs", "1", *_outputs(tmp_path, "r"))
    assert result.returncode == 0, result.stderr
    [pair] = json.loads((tmp_path / "r.json").read_text())["pairs"]
    assert pair["error"] is None
    assert pair["torch"]["steps_redone"] == 2  # killed at 7, back to the checkpoint of step 5
    assert pair["shoal"]["steps_redone"] == 0
    assert pair["shoal"]["model_difference"] <= 1e-5  # the survivor trains the same model
    assert pair["torch"]["model_difference"] <= 1e-5  # the checkpoint held everything
    assert pair["shoal_recovery_seconds"] is not None
    assert pair["torch"]["lost_in_run_seconds"] != 0 and pair["shoal"]["lost_in_run_seconds"] != 0
    assert "| 1 | shoal |" in (tmp_path / "r.md").read_text()


def test_the_scaling_benchmark_states_efficiency_against_one_worker(tmp_path):
    result = shoal("bench", "scaling", "--task", "quadratic", "--workers", "1", "--workers", "2", "--steps", "8",
                   "--warmup", "2", *_outputs(tmp_path, "s"))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "s.json").read_text())
    assert [r["workers"] for r in data["rows"]] == [1, 2]
    assert data["rows"][0]["efficiency"] == 1.0 and data["rows"][1]["efficiency"] > 0
    assert "gloo" in data["device"] or "NCCL" in data["device"]
