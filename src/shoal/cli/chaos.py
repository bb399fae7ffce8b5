"""``shoal chaos``: seeded fault trials that check the promises, with a Markdown summary."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys

__all__ = ["add_chaos"]


def add_chaos(commands) -> None:
    parser = commands.add_parser("chaos", help="randomized fault trials checked against the promises")
    parser.add_argument("--trials", type=int, default=10, help="trials to run (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault plan (default 0)")
    parser.add_argument("--task", help="task to train (default quadratic; quadratic-sgd for localsgd and "
                                       "diloco, whose members' own optimizer state a death loses)")
    parser.add_argument("--strategy", choices=("allreduce", "hierarchical", "localsgd", "diloco", "zero", "async"),
                        default="allreduce", help="strategy every trial trains with (default allreduce)")
    parser.add_argument("--compress", default="none", metavar="NAME",
                        help="compression every trial trains with: none, fp16, int8, onebit, powersgd "
                             "(default none); checked by the distance to the task's optimum")
    parser.add_argument("--launcher", choices=("train", "run"), default="train",
                        help="what every trial runs: shoal train (default), or a shoal.train script under "
                             "shoal run --coordinator on three namespace hosts (root), faults done from outside: "
                             "workers killed or stopped, a node killed and started again, a link cut, "
                             "the coordinator restarted")
    parser.add_argument("--link-mbit", type=float, metavar="MBIT",
                        help="with --launcher run: limit every host's link to MBIT Mbit/s each way (tbf)")
    parser.add_argument("--ballast-mb", type=float, default=0.0, metavar="MB",
                        help="with --launcher run on quadratic or quadratic-sgd: add MB of parameters to the "
                             "script's model, which every sample's loss pulls to zero: the task's numerics, "
                             "with a payload that feels --link-mbit (default 0)")
    parser.add_argument("--heartbeat-timeout", type=float, default=2.0, metavar="S",
                        help="every trial's (default 2 s): where its collective timeout starts")
    parser.add_argument("--workers", type=int, default=4, help="workers per trial (default 4)")
    parser.add_argument("--steps", type=int, default=600, help="steps per trial (default 600)")
    parser.add_argument("--markdown", metavar="PATH",
                        help="write the summary as Markdown (e.g. docs/RELIABILITY.md)")
    parser.add_argument("--json", metavar="PATH", help="write the summary as JSON")
    parser.set_defaults(handler=_chaos)


def _chaos(args: argparse.Namespace) -> int:
    from shoal.config import ConfigError, StrategyOptions, check_heartbeat_timeout, check_writable_file
    from shoal.network import namespaces_available
    from shoal.reliability.chaos import (
        LOCAL_STATE_STRATEGIES,
        ChaosSettings,
        default_task,
        render_markdown,
        run_chaos,
        summarize,
    )
    from shoal.reliability.script_cluster import MIN_STEPS
    from shoal.tasks import TASKS

    if args.trials < 1:
        raise ConfigError("--trials", f"must be at least 1, got {args.trials}")
    if args.workers < 2:
        raise ConfigError("--workers", f"must be at least 2 (a fault needs survivors), got {args.workers}")
    if args.steps < 20:
        raise ConfigError("--steps", f"must be at least 20, got {args.steps}")
    if args.task is not None and args.task not in TASKS:
        raise ConfigError("--task", f"unknown task {args.task!r} (choose from {', '.join(TASKS)})")
    StrategyOptions(compress=args.compress).validate(args.strategy)
    if args.launcher == "run" and args.steps < MIN_STEPS:
        raise ConfigError("--steps", f"--launcher run needs at least {MIN_STEPS} steps, got {args.steps} "
                                     "(a node started again must find steps left to join)")
    for flag, given in (("--link-mbit", args.link_mbit is not None), ("--ballast-mb", args.ballast_mb != 0)):
        if given and args.launcher != "run":
            raise ConfigError(flag, "only with --launcher run, whose trials all run on namespace hosts")
    if args.link_mbit is not None and not 0 < args.link_mbit < math.inf:
        raise ConfigError("--link-mbit", f"must be positive and finite, got {args.link_mbit:g}")
    if not 0 <= args.ballast_mb <= 64:  # every worker holds it with its gradient and momentum
        raise ConfigError("--ballast-mb", f"must be between 0 and 64, got {args.ballast_mb:g}")
    check_heartbeat_timeout(args.heartbeat_timeout)
    if args.ballast_mb and not (args.task or default_task(args.strategy)).startswith("quadratic"):
        raise ConfigError("--ballast-mb", "only on quadratic or quadratic-sgd, whose loss (half the sum of "
                                          "squares of the model's output) pulls the ballast to zero")
    settings = ChaosSettings(trials=args.trials, seed=args.seed, task=args.task or "", strategy=args.strategy,
                             workers=args.workers, steps=args.steps, compress=args.compress,
                             launcher=args.launcher, link_mbit=args.link_mbit,
                             heartbeat_timeout=args.heartbeat_timeout,
                             ballast=round(args.ballast_mb * 1e6 / 4),
                             # a trial over slow links takes 2-3 minutes where it is quick, and
                             # a loaded machine made one twice as slow: it reached its fault's
                             # step after the 150 s (half the trial) it was given
                             **({"trial_timeout": 600.0} if args.link_mbit is not None else {}))
    if settings.checked_by_optimum and not TASKS[settings.task].knows_optimum:
        runs = f"--compress {args.compress}" if args.compress != "none" else f"--strategy {args.strategy}"
        raise ConfigError("--task", f"{runs} runs are checked by their distance to the task's optimum: "
                                    f"choose a task that knows it "
                                    f"({', '.join(n for n, t in TASKS.items() if t.knows_optimum)})")
    check_writable_file("--markdown", args.markdown)
    check_writable_file("--json", args.json)
    unavailable = namespaces_available()
    if unavailable is not None and args.launcher == "run":
        raise ConfigError("--launcher", f"run's trials need network namespaces: {unavailable}")
    if unavailable is not None:
        print(f"shoal chaos: no link-cut or coordinator-restart trials: {unavailable}", file=sys.stderr)
    settings.cluster = unavailable is None
    if settings.task != default_task(settings.strategy) and settings.strategy in LOCAL_STATE_STRATEGIES:
        print(f"shoal chaos: note: a death loses that member's {settings.task} optimizer state under "
              f"{settings.strategy}, so the model may differ from the undisturbed run's with nothing "
              f"wrong; {default_task(settings.strategy)} keeps none (docs/STRATEGIES.md)", file=sys.stderr)
    outcomes = run_chaos(settings, report=lambda line: print(line, flush=True))
    summary = summarize(outcomes)
    command = "shoal chaos " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["chaos"] else [])
    when = f"{datetime.date.today().isoformat()}, {platform.machine()}, Python {platform.python_version()}"
    if args.markdown:
        with open(args.markdown, "w") as handle:
            title = "# Reliability of `shoal run --coordinator`" if args.launcher == "run" else "# Reliability"
            handle.write(f"{title}\n\n" + render_markdown(summary, settings, command, when))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(summary, handle, indent=2)
    print(f"shoal chaos: {summary['passed']} of {summary['trials']} trials passed")
    return 0 if summary["passed"] == summary["trials"] else 1
