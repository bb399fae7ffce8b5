"""``shoal run --nnodes``: node 1 stands by to take over the job's coordinator from node 0.

Node 0's launcher hosts the coordinator, so its loss used to end a ``shoal.train`` job that
survives any other node's. Node 1's launcher now reserves two ports (for a coordinator and its
store) as it joins, and node 0 publishes their address as the job's successor before any
worker starts. Every worker is told both coordinators (``SHOAL_COORDINATOR`` and
``SHOAL_COORDINATOR_SUCCESSOR``: its client tries the next when one does not answer).
When node 0's store stops answering while the job runs (refused, or left unanswered for
three heartbeat timeouts: cut off, or frozen), node 1 starts a coordinator there with the
job's token and rules; the workers' heartbeats come to it, and it takes over their
generation from them, as a coordinator restarted without a state file does
(``Membership._adopt``). The other nodes' launchers follow it. The ports are bound but not
listened on until then: a worker that tries the successor while node 0 lives is refused at
once and goes back to node 0. (``launch/script_job.py`` decides when, and says so.)

One successor, fixed when the workers start: losing node 0 after node 1 (or node 1's
launcher started again) still ends the job. A plain script gains nothing (torchrun's scripts
cannot lose a rank). Node 0 cut off from node 1, not gone, leaves two coordinators (silence
cannot tell a dead node from a cut-off one); under ``--quorum majority`` only the one whose
workers are on a majority of the nodes forms generations, and the other fails
(``launch/quorum.py``).
"""

from __future__ import annotations

import socket

from shoal.coordinator import Membership

__all__ = ["Standby"]


class Standby:
    """The ports a successor coordinator would listen on, held until it does (or is not needed)."""

    def __init__(self, address: str, family: int):
        self._sockets = []
        try:
            for _ in range(2):  # the coordinator's HTTP port, then its store's
                reserved = socket.socket(family, socket.SOCK_STREAM)
                self._sockets.append(reserved)
                reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                reserved.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))  # every interface, as node 0's
        except OSError:
            self.release()
            raise
        self.address = address
        self.port, self.store_port = (reserved.getsockname()[1] for reserved in self._sockets)
        self.coordinator = None

    @classmethod
    def towards(cls, master_addr: str, master_port: int) -> Standby:
        """Ports on the interface this machine reaches ``master_addr`` by (the first of its
        addresses that has a route): the other nodes reach node 0 there, so most likely this
        node too. Raises OSError if none has."""
        error: OSError | None = None
        for family, _, _, _, target in socket.getaddrinfo(master_addr, master_port, type=socket.SOCK_DGRAM):
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as probe:
                    probe.connect(target)  # a route is chosen; nothing is sent
                    address = probe.getsockname()[0]
                return cls(address, family)
            except OSError as unroutable:
                error = unroutable
        raise error or OSError(f"no address for {master_addr}")

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    def take_over(self, token: str, membership: Membership) -> str:
        """Start the successor coordinator on the reserved ports; returns its URL."""
        from shoal.coordinator import Coordinator

        self.release()
        coordinator = Coordinator(membership, host=self.address, port=self.port, token=token,
                                  store_port=self.store_port, bind_all=True)
        try:
            coordinator.start()
        except BaseException:
            coordinator.stop()  # its store may listen already
            raise
        self.coordinator = coordinator
        return coordinator.url

    def release(self) -> None:
        for reserved in self._sockets:
            reserved.close()
        self._sockets = []

    def close(self) -> None:
        self.release()
        if self.coordinator is not None:
            self.coordinator.stop()
            self.coordinator = None
