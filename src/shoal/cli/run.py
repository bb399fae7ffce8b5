"""``shoal run``: a user script on N processes per node with torchrun's environment.

torchrun's flags, in both its spellings (``--nproc-per-node`` and ``--nproc_per_node``), so
that a torchrun command for a script becomes a shoal one by its first word, ``-m MODULE``
and ``--no-python PROGRAM`` included. (Not taken: ``--rdzv-conf``, ``--local-addr``; they
exit 2 as unknown.)
"""

from __future__ import annotations

import argparse
import os

__all__ = ["add_run"]


def _node_count(text: str) -> int:
    """``--nnodes``: a number, or torchrun's ``N:N``. An elastic ``MIN:MAX`` is refused with
    the reason."""
    low, _, high = text.partition(":")
    try:
        low_count, high_count = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if low_count != high_count:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a fixed number of nodes; a script that uses shoal.train is elastic "
            "within the job (--min-workers), so torchrun's MIN:MAX has no use here")
    return low_count


_node_count.__name__ = "N"


def _process_count(text: str) -> int:
    """``--nproc-per-node``: a number, or torchrun's ``cpu`` (the cores), ``gpu`` (the CUDA
    devices) or ``auto`` (the devices if any, else the cores)."""
    if text in ("cpu", "gpu", "auto"):
        import torch

        devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if text == "gpu" and devices == 0:
            raise argparse.ArgumentTypeError("'gpu': this machine has no CUDA device")
        return devices if text == "gpu" or (text == "auto" and devices) else os.cpu_count() or 1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a number, cpu, gpu or auto") from None


_process_count.__name__ = "N"


def _flag(name: str) -> list[str]:
    """A flag under both of torchrun's spellings."""
    return [f"--{name}", f"--{name.replace('-', '_')}"] if "-" in name else [f"--{name}"]


def add_run(commands) -> None:
    run = commands.add_parser("run", help="run your script on N processes (torchrun-compatible)",
                              description="Run a script on --nproc-per-node processes on each of "
                              "--nnodes nodes, with torchrun's environment and flags.")
    run.add_argument(*_flag("nproc-per-node"), dest="nproc_per_node", type=_process_count, default=1,
                     help="processes to start on this node: a number, cpu, gpu or auto (default 1)")
    run.add_argument(*_flag("nnodes"), type=_node_count, default=1,
                     help="nodes of the job, each running `shoal run` (default 1)")
    run.add_argument(*_flag("node-rank"), dest="node_rank", type=int, default=None,
                     help="this node's rank, 0 to --nnodes - 1 (default: 0 for the node that can "
                     "listen at --master-addr, the next free rank for the others)")
    run.add_argument(*_flag("master-addr"), "--host", dest="master_addr", default=None,
                     help="node 0's address, where the store and the coordinator listen "
                     "(default 127.0.0.1)")
    run.add_argument(*_flag("master-port"), dest="master_port", type=int, default=None,
                     help="the store's port on node 0 (default 29500 with several nodes, as "
                     "torchrun; one the OS chooses on a single node)")
    run.add_argument(*_flag("rdzv-endpoint"), dest="rdzv_endpoint", metavar="HOST[:PORT]",
                     help="torchrun's c10d rendezvous: the same as --master-addr HOST "
                     "--master-port PORT (default port 29400)")
    run.add_argument(*_flag("rdzv-backend"), dest="rdzv_backend", default="static",
                     help="static or c10d: both meet at node 0's store (default static)")
    run.add_argument(*_flag("rdzv-id"), dest="rdzv_id", default=None,
                     help="the job's id (TORCHELASTIC_RUN_ID); every node must give the same "
                     "(default: node 0 makes one up)")
    run.add_argument(*_flag("max-restarts"), dest="max_restarts", type=int, default=0,
                     help="a plain script: how many times every node's workers are started again "
                     "after one failed, as torchrun (the script resumes from its own checkpoint); "
                     "a shoal.train script: how many times each failed worker is started again, "
                     "rejoining the running job (default 0)")
    run.add_argument("--standalone", action="store_true",
                     help="torchrun's single-node flag: accepted, it is what one node does anyway")
    run.add_argument(*_flag("join-timeout"), dest="join_timeout", type=float, default=300.0,
                     help="how long a node other than 0 waits for node 0 (default 300 s)")
    run.add_argument(*_flag("min-workers"), dest="min_workers", type=int, default=1,
                     help="an elastic script fails when fewer remain (default 1)")
    run.add_argument(*_flag("heartbeat-timeout"), dest="heartbeat_timeout", type=float, default=5.0)
    run.add_argument("--quorum", default="majority", metavar="{majority,none}",
                     help="which side of a partition of the nodes goes on: the one with a majority of "
                     "them (node 0's side on a tie; the other side fails, saying it may be the one cut "
                     "off), or every side (none: each finishes on its own) (default majority)")
    run.add_argument("--coordinator", metavar="HOST:PORT",
                     help="join the job of a standalone coordinator (`shoal coordinator`) instead of "
                     "meeting at node 0: a script that uses shoal.train then survives losing any node")
    run.add_argument("--token", help="the standalone coordinator's job token (with --coordinator; "
                     "default: $SHOAL_TOKEN)")
    run.add_argument("-m", "--module", action="store_true",
                     help="the script is a module, run as `python -m MODULE` runs it (from this directory)")
    run.add_argument(*_flag("no-python"), dest="no_python", action="store_true",
                     help="the script is a program (a shell script, a binary), run as it is, not by Python; "
                     "a wrapper should exec its last command, or it outlives a launcher that is killed")
    run.add_argument("script", help="the Python script to run (a module with -m, a program with --no-python)")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from shoal.config import ConfigError, RunConfig, joining_token
    from shoal.launch.script_job import run_script

    if args.standalone and args.nnodes != 1:
        raise ConfigError("--standalone", f"means a single node, but --nnodes is {args.nnodes}")
    if args.rdzv_backend not in ("static", "c10d"):
        raise ConfigError("--rdzv-backend", f"{args.rdzv_backend!r}: shoal's nodes meet at node 0's "
                          "store, which is what static and c10d mean; choose one of them")
    if args.coordinator is not None and (args.rdzv_endpoint is not None or args.rdzv_backend != "static"):
        flag = "--rdzv-endpoint" if args.rdzv_endpoint is not None else "--rdzv-backend"
        raise ConfigError(flag, "not with --coordinator: the workers meet at the coordinator")
    master_addr, master_port = args.master_addr or "127.0.0.1", args.master_port
    if args.rdzv_endpoint is not None:
        if args.master_addr is not None or args.master_port is not None:
            raise ConfigError("--rdzv-endpoint", "give it or --master-addr/--master-port, not both")
        master_addr, master_port = _endpoint(args.rdzv_endpoint)
    elif args.nnodes > 1 and args.master_addr is None and args.coordinator is None:
        # torchrun's default, 127.0.0.1, would make every machine a node 0 of its own job.
        raise ConfigError("--master-addr", "several nodes need node 0's address (or "
                          "--rdzv-endpoint); 127.0.0.1 only if every node is this machine")
    config = RunConfig(script=args.script, script_args=args.script_args, module=args.module,
                       no_python=args.no_python,
                       nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                       node_rank=args.node_rank, master_addr=master_addr, master_port=master_port,
                       run_id=args.rdzv_id, join_timeout=args.join_timeout,
                       min_workers=args.min_workers, heartbeat_timeout=args.heartbeat_timeout,
                       coordinator=args.coordinator, token=joining_token(args.token, args.coordinator),
                       max_restarts=args.max_restarts, quorum=args.quorum)
    return run_script(config.validate())


_C10D_PORT = 29400
"""torchrun's default port for ``--rdzv-endpoint HOST``."""


def _endpoint(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT``, ``[IPV6]`` or ``[IPV6]:PORT``, as torchrun reads it."""
    from shoal.config import ConfigError

    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:  # a name, an IPv4 address or a bare IPv6 address
        host, port = text, ""
    try:
        return host, int(port) if port else _C10D_PORT
    except ValueError:
        raise ConfigError("--rdzv-endpoint", f"{text!r}: the port must be a number") from None
