"""`shoal bench wan` once, tiny: two namespace hosts, allreduce over limited and unlimited
links, every output written.

Benchmarks never assert timings in tests; this checks the benchmark still works, that its
byte counts make sense (the wire carries at least the payload; the limit changes neither)
and that the communication bound is computed from both runs. (Compressed payloads are
counted in tests/strategies/test_compression.py.)
"""

import json

import pytest

from shoal.network import namespaces_available
from tests.conftest import shoal

pytestmark = pytest.mark.skipif(namespaces_available() is not None,
                                reason=namespaces_available() or "")


def test_the_wan_benchmark_runs_and_counts_bytes(tmp_path):
    result = shoal("bench", "wan", "--task", "quadratic", "--hosts", "2", "--steps", "20",
                   "--target-loss", "100", "--only", "allreduce",
                   "--json", str(tmp_path / "wan.json"), "--markdown", str(tmp_path / "wan.md"),
                   "--plot", str(tmp_path / "wan.png"))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "wan.json").read_text())
    limited, unlimited = data["runs"]
    assert unlimited["label"] == "allreduce, links unlimited"
    assert limited["error"] is None and unlimited["error"] is None
    assert limited["steps"] == unlimited["steps"] == 20
    assert limited["payload_bytes_per_step"] == unlimited["payload_bytes_per_step"] > 0
    assert limited["wire_bytes_per_step"] >= limited["payload_bytes_per_step"]
    assert limited["seconds_to_target"] is not None
    bound = data["communication_bound"]
    assert bound["compute_seconds"] == unlimited["step_seconds"] > 0
    assert bound["bound_seconds"] > bound["compute_seconds"] and bound["ratio"] > 0
    markdown = (tmp_path / "wan.md").read_text()
    assert "| allreduce, links unlimited |" in markdown and "shoal bench wan" in markdown
    assert "Communication bound of allreduce" in markdown
    assert (tmp_path / "wan.png").read_bytes()[:4] == b"\x89PNG"
