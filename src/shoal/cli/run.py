"""``shoal run``: a user script on N processes with torchrun's environment."""

from __future__ import annotations

import argparse

__all__ = ["add_run"]


def add_run(commands) -> None:
    run = commands.add_parser("run", help="run your script on N processes (torchrun-compatible)")
    run.add_argument("--nproc-per-node", type=int, default=1, help="processes to start (default 1)")
    run.add_argument("--min-workers", type=int, default=1,
                     help="an elastic script fails when fewer remain (default 1)")
    run.add_argument("--heartbeat-timeout", type=float, default=5.0)
    run.add_argument("--host", default="127.0.0.1", help="address the coordinator and store bind")
    run.add_argument("script", help="the Python script to run")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from shoal.config import RunConfig
    from shoal.launch.script_job import run_script

    config = RunConfig(script=args.script, script_args=args.script_args,
                       nproc_per_node=args.nproc_per_node, min_workers=args.min_workers,
                       heartbeat_timeout=args.heartbeat_timeout, host=args.host)
    return run_script(config.validate())
