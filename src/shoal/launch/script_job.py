"""``shoal run``: a user script on N local processes with torchrun's environment.

A plain torchrun/DDP script sees RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ... as under
torchrun; its ``init_process_group("env://")`` rendezvous on the TCPStore the coordinator
hosts (``TORCHELASTIC_USE_AGENT_STORE``, as torchrun's agent does). Such a script is
all-or-nothing: when one process fails, the others are stopped and the command fails,
naming the worker. A script that uses ``shoal.train`` joins the coordinator instead and
survives failures down to ``--min-workers``.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid

from shoal.config import RunConfig
from shoal.coordinator import Coordinator, Membership
from shoal.launch.workers import WorkerGroup, describe_exit
from shoal.runtime.context import ENV_COORDINATOR, ENV_TOKEN, ENV_WORKER_ID
from shoal.runtime.trainer import ENV_LAUNCHER_ID

__all__ = ["run_script", "torchrun_env"]


def torchrun_env(*, rank: int, world_size: int, master_addr: str, master_port: int,
                 run_id: str) -> dict[str, str]:
    """The variables torchrun sets for one worker on a single node."""
    values = {
        "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world_size,
        "LOCAL_WORLD_SIZE": world_size, "GROUP_RANK": 0, "GROUP_WORLD_SIZE": 1,
        "ROLE_RANK": rank, "ROLE_WORLD_SIZE": world_size, "ROLE_NAME": "default",
        "MASTER_ADDR": master_addr, "MASTER_PORT": master_port,
        "TORCHELASTIC_RUN_ID": run_id, "TORCHELASTIC_RESTART_COUNT": 0,
        "TORCHELASTIC_MAX_RESTARTS": 0, "TORCHELASTIC_USE_AGENT_STORE": True,
    }
    return {key: str(value) for key, value in values.items()}


def run_script(config: RunConfig) -> int:
    membership = Membership(expected_workers=config.nproc_per_node,
                            min_workers=config.min_workers,
                            heartbeat_timeout=config.heartbeat_timeout)
    coordinator = Coordinator(membership, host=config.host).start()
    failures: list[str] = []
    done = threading.Event()

    def on_exit(worker_id: int, returncode: int, when: float) -> None:
        if group.stopping:  # exits we cause while shutting down are not failures
            return
        elastic = str(worker_id) in membership.snapshot()["workers"]
        if returncode != 0:
            failures.append(f"worker {worker_id} (rank {worker_id}) {describe_exit(returncode)}")
            membership.report_exit(worker_id, describe_exit(returncode), when)
            if not elastic:
                done.set()  # a plain torchrun script cannot survive a lost rank
        else:
            membership.report_exit(worker_id, "exited", when)
        if not group.running():
            done.set()

    base_env = {**os.environ, ENV_COORDINATOR: coordinator.url, ENV_TOKEN: coordinator.token,
                ENV_LAUNCHER_ID: f"{socket.gethostname()}/{os.getpid()}"}
    if config.nproc_per_node > 1 and "OMP_NUM_THREADS" not in os.environ:
        base_env["OMP_NUM_THREADS"] = "1"  # as torchrun: N processes must not each take every core
    # The script runs as `python -u SCRIPT`, through a runner that survives torch's teardown.
    group = WorkerGroup([sys.executable, "-u", "-m", "shoal.launch.script_runner", config.script,
                         *config.script_args], env=base_env,
                        on_exit=on_exit, echo=lambda line: print(line, flush=True))
    run_id = uuid.uuid4().hex[:12]
    try:
        for rank in range(config.nproc_per_node):
            env = torchrun_env(rank=rank, world_size=config.nproc_per_node,
                               master_addr=config.host, master_port=coordinator.store.port,
                               run_id=run_id)
            group.spawn(rank, {**env, ENV_WORKER_ID: str(rank)})
        done.wait()
    except KeyboardInterrupt:
        failures.append("interrupted (Ctrl-C)")
    finally:
        group.stop_all()
        coordinator.stop()
    return _verdict(membership, failures)


def _verdict(membership: Membership, failures: list[str]) -> int:
    elastic = bool(membership.snapshot()["workers"])
    if membership.rejected:  # shoal.train refused its arguments in every worker
        print(f"shoal run: error: {membership.reason}", file=sys.stderr)
        return 2
    if elastic and membership.status == "completed":
        for failure in failures:
            print(f"shoal run: survived: {failure}", file=sys.stderr)
        return 0
    if failures or (elastic and membership.status != "completed"):
        reason = "; ".join(failures) or membership.reason
        print(f"shoal run: failed: {reason}", file=sys.stderr)
        return 1
    return 0
