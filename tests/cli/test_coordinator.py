"""`shoal coordinator` standalone: prints where it listens and its token, refuses other tokens."""

import re
import subprocess
import sys

import httpx


def test_standalone_coordinator_serves_status_with_its_token():
    process = subprocess.Popen(
        [sys.executable, "-m", "shoal.cli.main", "coordinator", "--port", "0", "--token", "t0k"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = re.search(r"listening on (\S+)", process.stdout.readline()).group(1)
        assert process.stdout.readline().strip() == "shoal coordinator: token t0k"
        assert httpx.get(f"{url}/status").status_code == 401
        status = httpx.get(f"{url}/status", headers={"Authorization": "Bearer t0k"})
        assert status.status_code == 200
        assert status.json()["status"] == "waiting" and status.json()["members"] == []
    finally:
        process.terminate()
        process.wait(timeout=30)
