"""`shoal bench wan` once, tiny: two namespace hosts, two runs, every output written.

Benchmarks never assert timings in tests; this checks the benchmark still works and that
its byte counts make sense (int8's payload is smaller; the wire carries at least the payload).
"""

import json

import pytest

from shoal.network import namespaces_available
from tests.conftest import shoal

pytestmark = pytest.mark.skipif(namespaces_available() is not None,
                                reason=namespaces_available() or "")


def test_the_wan_benchmark_runs_and_counts_bytes(tmp_path):
    result = shoal("bench", "wan", "--task", "quadratic", "--hosts", "2", "--steps", "20",
                   "--target-loss", "100", "--only", "allreduce", "--only", "allreduce int8",
                   "--json", str(tmp_path / "wan.json"), "--markdown", str(tmp_path / "wan.md"),
                   "--plot", str(tmp_path / "wan.png"))
    assert result.returncode == 0, result.stderr
    plain, int8 = json.loads((tmp_path / "wan.json").read_text())["runs"]
    assert plain["error"] is None and int8["error"] is None
    assert plain["steps"] == int8["steps"] == 20
    assert plain["payload_bytes_per_step"] / int8["payload_bytes_per_step"] > 3
    assert plain["wire_bytes_per_step"] >= plain["payload_bytes_per_step"]
    assert plain["seconds_to_target"] is not None
    markdown = (tmp_path / "wan.md").read_text()
    assert "| allreduce int8 |" in markdown and "shoal bench wan" in markdown
    assert (tmp_path / "wan.png").read_bytes()[:4] == b"\x89PNG"
