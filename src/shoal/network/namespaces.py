"""Several "hosts" on one machine: network namespaces joined by veth pairs and a bridge.

The bridge lives in a namespace of its own (the "switch"), so nothing is added to the
machine's own network; every address is inside namespaces created here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

__all__ = ["Hosts", "namespaces_available"]


def namespaces_available() -> str | None:
    """None when the tests can build hosts, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"shoal-probe-{uuid.uuid4().hex[:6]}"
    created = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if created.returncode != 0:
        return f"cannot create a network namespace: {created.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=False)
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _ip_netns_tc(namespace: str, *args: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, "tc", *args], check=True, capture_output=True,
                   text=True)


class Hosts:
    """``count`` hosts with addresses 10.77.0.1 .. 10.77.0.count on interface eth0."""

    def __init__(self, count: int):
        tag = uuid.uuid4().hex[:6]
        self.switch = f"shoal-{tag}-sw"
        self.names = [f"shoal-{tag}-h{i}" for i in range(count)]
        self.addresses = [f"10.77.0.{i + 1}" for i in range(count)]
        self._processes: list[subprocess.Popen] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        for index, (name, address) in enumerate(zip(self.names, self.addresses)):
            _ip("netns", "add", name)
            _ip("-n", self.switch, "link", "add", f"port{index}", "type", "veth",
                "peer", "name", "eth0", "netns", name)
            _ip("-n", self.switch, "link", "set", f"port{index}", "master", "br0", "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def popen(self, index: int, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` on host ``index`` (gloo told to use that host's interface)."""
        env = {**kwargs.pop("env", os.environ), "GLOO_SOCKET_IFNAME": "eth0"}
        process = subprocess.Popen(["ip", "netns", "exec", self.names[index], *argv], env=env,
                                   **kwargs)
        self._processes.append(process)
        return process

    def run(self, index: int, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        env = {**kwargs.pop("env", os.environ), "GLOO_SOCKET_IFNAME": "eth0"}
        return subprocess.run(["ip", "netns", "exec", self.names[index], *argv], env=env, **kwargs)

    def cut(self, index: int) -> None:
        """Pull host ``index``'s cable: its switch port goes down."""
        _ip("-n", self.switch, "link", "set", f"port{index}", "down")

    def reconnect(self, index: int) -> None:
        _ip("-n", self.switch, "link", "set", f"port{index}", "up")

    def limit(self, index: int, mbit: float) -> None:
        """Limit host ``index``'s link to ``mbit`` Mbit/s each way (a token bucket, ``tbf``).

        Egress is shaped on the host's eth0, ingress on its switch port (whose egress it is).
        The bucket holds a few milliseconds of traffic, as a WAN link's buffer would.
        """
        burst = max(16_000, int(mbit * 1e6 / 8 * 0.004))
        for namespace, device in ((self.names[index], "eth0"), (self.switch, f"port{index}")):
            _ip_netns_tc(namespace, "qdisc", "replace", "dev", device, "root", "tbf", "rate",
                         f"{mbit}mbit", "burst", str(burst), "latency", "200ms")

    def tx_bytes(self, index: int) -> int:
        """Bytes host ``index`` has sent on eth0 (the kernel's counter)."""
        result = subprocess.run(["ip", "-n", self.names[index], "-s", "-j", "link", "show", "eth0"],
                                check=True, capture_output=True, text=True)
        return int(json.loads(result.stdout)[0]["stats64"]["tx"]["bytes"])

    def close(self) -> None:
        for process in self._processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        for name in [*self.names, self.switch]:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
