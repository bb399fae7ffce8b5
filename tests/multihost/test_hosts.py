"""Three hosts as network namespaces: a standalone coordinator on one, workers joining it
over the namespace network from the other two. (A link cut and a coordinator restart on the
same topology are chaos trials: tests/reliability/test_chaos.py.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from shoal.network import Hosts, namespaces_available
from shoal.reliability.checks import exactly_once_violations, relative_difference
from shoal.tasks import TASKS
from tests.conftest import shoal

pytestmark = pytest.mark.skipif(namespaces_available() is not None,
                                reason=namespaces_available() or "")

STEPS = 300
TOKEN = "multihost-token"
DATASET_SIZE = len(TASKS["quadratic"](0).train_dataset())
TASK = ["--task", "quadratic", "--steps", str(STEPS), "--batch-size", "64", "--seed", "0"]


@pytest.fixture
def hosts():
    network = Hosts(3)
    yield network
    network.close()


def test_workers_on_two_hosts_join_a_standalone_coordinator(hosts, tmp_path):
    coordinator = hosts.popen(0, [sys.executable, "-m", "shoal.cli.main", "coordinator",
                                  "--host", hosts.addresses[0], "--port", "0", "--token", TOKEN,
                                  "--workers", "4", "--linger", "5"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    address = re.search(r"listening on http://(\S+)", coordinator.stdout.readline()).group(1)
    launchers = [
        hosts.popen(index, [sys.executable, "-m", "shoal.cli.main", "train", *TASK, "--workers", "2",
                            "--coordinator", address, "--token", TOKEN, "--quiet",
                            "--save-model", str(tmp_path / f"h{index}.pt"),
                            "--output", str(tmp_path / f"h{index}.json"),
                            "--sample-log", str(tmp_path / f"h{index}.jsonl")],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in (1, 2)
    ]
    codes = [launcher.wait(timeout=240) for launcher in launchers]
    assert codes == [0, 0], "\n".join(launcher.stderr.read() for launcher in launchers)
    assert coordinator.wait(timeout=60) == 0

    saved = [p for p in (tmp_path / "h1.pt", tmp_path / "h2.pt") if p.exists()]
    assert len(saved) == 1, saved  # exactly one leader saved
    reference = tmp_path / "reference.pt"
    result = shoal("train", *TASK, "--workers", "4", "--quiet", "--save-model", str(reference))
    assert result.returncode == 0, result.stderr
    assert relative_difference(saved[0], reference) <= 1e-5

    # Either launcher writes the job's results and sample log from the coordinator's record.
    for index in (1, 2):
        results = json.loads((tmp_path / f"h{index}.json").read_text())
        assert results["steps"] == STEPS and results["status"] == "completed"
        assert exactly_once_violations(tmp_path / f"h{index}.jsonl", dataset_size=DATASET_SIZE, steps=STEPS) == []
