"""``shoal bench``: benchmarks that write JSON, Markdown and PNG (docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import shlex
import sys

__all__ = ["add_bench"]


def add_bench(commands) -> None:
    parser = commands.add_parser("bench", help="benchmarks (see docs/BENCHMARKS.md)")
    kinds = parser.add_subparsers(dest="benchmark", required=True, parser_class=type(parser))
    wan = _benchmark(kinds, "wan", "every strategy over emulated slow links (root)", _wan, plot=True)
    wan.add_argument("--hosts", type=int, default=4, help="worker hosts, one worker each (default 4)")
    wan.add_argument("--mbit", type=float, default=50.0, help="link rate in Mbit/s (default 50)")
    wan.add_argument("--steps", type=int, default=150, help="steps per run (default 150)")
    wan.add_argument("--heartbeat-timeout", type=float, default=20.0,
                     help="the coordinator's, where collective timeouts start (default 20 s)")
    wan.add_argument("--target-loss", type=float, default=2.5,
                     help="smoothed training loss to reach (default 2.5)")
    wan.add_argument("--only", action="append", default=[], metavar="LABEL",
                     help="run only these (repeatable), e.g. 'allreduce' 'diloco H=50'")
    wan.add_argument("--no-bound", action="store_true",
                     help="skip allreduce over unlimited links (the compute of the communication bound)")
    straggler = _benchmark(kinds, "straggler", "async against allreduce with one slow worker", _straggler,
                           plot=True)
    straggler.add_argument("--workers", type=int, default=4, help="local workers (default 4)")
    straggler.add_argument("--factor", type=float, default=3.0,
                           help="how many times slower worker 1 computes (default 3)")
    straggler.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    straggler.add_argument("--target-loss", type=float, default=2.6,
                           help="smoothed training loss to reach (default 2.6)")
    checkpoint = _benchmark(kinds, "checkpoint", "step-time cost and write throughput of checkpoints",
                            _checkpoint)
    checkpoint.add_argument("--strategy", choices=("allreduce", "zero"), default="allreduce",
                            help="allreduce: the leader saves everything; zero: each member its "
                            "shards (default allreduce)")
    checkpoint.add_argument("--workers", type=int, default=2, help="local workers (default 2)")
    checkpoint.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    checkpoint.add_argument("--every", type=int, default=50, help="steps between checkpoints (default 50)")
    checkpoint.add_argument("--pairs", type=int, default=5,
                            help="runs without and with checkpoints, alternating (default 5 pairs)")
    memory = _benchmark(kinds, "memory", "each worker's share of the state: zero against allreduce", _memory)
    memory.add_argument("--workers", type=int, action="append", metavar="N",
                        help="worker counts to measure (repeatable; default 2 and 4)")
    memory.add_argument("--zero-replicas", type=int, action="append", dest="replicas", metavar="R",
                        help="zero's members per shard to measure (repeatable; default 1 and 2)")
    memory.add_argument("--steps", type=int, default=4, help="steps per run (default 4)")
    overhead = _benchmark(kinds, "overhead", "shoal's allreduce against a plain DDP script under torchrun",
                          _overhead, task=False, plot="step times")
    overhead.add_argument("--task", action="append", dest="tasks", metavar="TASK",
                          help="task to train (repeatable; default digits and charlm)")
    overhead.add_argument("--workers", type=int, default=2, help="local workers (default 2)")
    overhead.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    overhead.add_argument("--warmup", type=int, default=20, help="steps not timed (default 20)")
    overhead.add_argument("--pairs", type=int, default=5, help="torch and shoal runs, alternating (default 5)")
    recovery = _benchmark(kinds, "recovery", "time lost to a killed worker: shoal against torchrun's restart",
                          _recovery, default_task="digits", plot="the time lost")
    recovery.add_argument("--workers", type=int, default=4, help="local workers (default 4)")
    recovery.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    recovery.add_argument("--kill-step", type=int, default=125, help="step at which worker 1 is killed (default 125)")
    recovery.add_argument("--checkpoint-every", type=int, default=50,
                          help="torchrun's recipe: steps between checkpoints (default 50)")
    recovery.add_argument("--pairs", type=int, default=3, help="repetitions of the four runs (default 3)")
    scaling = _benchmark(kinds, "scaling", "samples per second with 1, 2, 4 ... workers", _scaling,
                         plot="samples per second")
    scaling.add_argument("--workers", type=int, action="append", metavar="N",
                         help="worker counts (repeatable; default 1, 2 and 4)")
    scaling.add_argument("--steps", type=int, default=100, help="steps per run (default 100)")
    scaling.add_argument("--warmup", type=int, default=10, help="steps not timed (default 10)")


def _benchmark(kinds, name: str, summary: str, handler, *, plot: str | bool = False, task: bool = True,
               default_task: str = "charlm") -> argparse.ArgumentParser:
    """A benchmark's parser with what every benchmark takes: --task and its outputs."""
    parser = kinds.add_parser(name, help=summary)
    if task:
        parser.add_argument("--task", default=default_task, help=f"task to train (default {default_task})")
    parser.add_argument("--json", metavar="PATH", help="write every run as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    if plot:
        what = plot if isinstance(plot, str) else "loss against wall time"
        parser.add_argument("--plot", metavar="PATH", help=f"write {what} as PNG")
    parser.set_defaults(handler=handler)
    return parser


def _check_task(args, tasks: list[str] | None = None) -> None:
    from shoal.config import ConfigError
    from shoal.tasks import TASKS

    for task in tasks or [args.task]:
        if task not in TASKS:
            raise ConfigError("--task", f"unknown task {task!r} (choose from {', '.join(TASKS)})")


def _at_least(minimum: int, *flags: tuple[str, int]) -> None:
    from shoal.config import ConfigError

    for flag, value in flags:
        if value < minimum:
            raise ConfigError(flag, f"must be at least {minimum}, got {value}")


def _check_target_loss(value: float) -> None:
    from shoal.config import ConfigError

    if not math.isfinite(value):  # nan is never reached, and would say so without a word
        raise ConfigError("--target-loss", f"must be a finite loss, got {value}")


def _wan(args: argparse.Namespace) -> int:
    from shoal.bench.report import wan_markdown
    from shoal.bench.wan import DEFAULT_RUNS, WanSettings, run_wan, to_json
    from shoal.config import ConfigError, check_heartbeat_timeout
    from shoal.network import namespaces_available

    _check_task(args)
    if args.hosts < 2:
        raise ConfigError("--hosts", f"must be at least 2, got {args.hosts}")
    if not 0 < args.mbit < math.inf:
        raise ConfigError("--mbit", f"must be positive and finite, got {args.mbit}")
    _check_target_loss(args.target_loss)
    if args.steps < 1:
        raise ConfigError("--steps", f"must be at least 1, got {args.steps}")
    check_heartbeat_timeout(args.heartbeat_timeout)
    labels = [label for label, _ in DEFAULT_RUNS]
    unknown = [label for label in args.only if label not in labels]
    if unknown:
        raise ConfigError("--only", f"unknown run {unknown[0]!r} (choose from {', '.join(labels)})")
    _check_outputs(args)
    unavailable = namespaces_available()
    if unavailable is not None:
        print(f"shoal bench wan: cannot emulate hosts: {unavailable}", file=sys.stderr)
        return 2
    runs = tuple(r for r in DEFAULT_RUNS if not args.only or r[0] in args.only)
    settings = WanSettings(task=args.task, hosts=args.hosts, mbit=args.mbit, steps=args.steps,
                           target_loss=args.target_loss, runs=runs, bound=not args.no_bound,
                           heartbeat_timeout=args.heartbeat_timeout)
    results = run_wan(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "wan", to_json(settings, results), results, wan_markdown, settings,
                   title=f"{args.task}, {args.hosts} hosts at {args.mbit:g} Mbit/s")
    return 1 if any(r.error for r in results) else 0


def _straggler(args: argparse.Namespace) -> int:
    from shoal.bench.report import straggler_markdown
    from shoal.bench.straggler import StragglerSettings, run_straggler, to_json
    from shoal.config import MAX_SLOWDOWN, ConfigError

    _check_task(args)
    if args.workers < 2:
        raise ConfigError("--workers", f"must be at least 2 (one of them is slow), got {args.workers}")
    if not 1 <= args.factor <= MAX_SLOWDOWN:
        raise ConfigError("--factor", f"must be between 1 and {MAX_SLOWDOWN:g}, got {args.factor}")
    _check_target_loss(args.target_loss)
    if args.steps < 1:
        raise ConfigError("--steps", f"must be at least 1, got {args.steps}")
    _check_outputs(args)
    settings = StragglerSettings(task=args.task, workers=args.workers, factor=args.factor,
                                 steps=args.steps, target_loss=args.target_loss)
    results = run_straggler(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "straggler", to_json(settings, results), results, straggler_markdown, settings,
                   title=f"{args.task}, {args.workers} workers, worker 1 {args.factor:g}x slower")
    return 1 if any(r.error for r in results) else 0


def _checkpoint(args: argparse.Namespace) -> int:
    from shoal.bench.checkpoint import CheckpointSettings, run_checkpoint_bench, to_json
    from shoal.bench.report import checkpoint_markdown
    from shoal.config import ConfigError

    _check_task(args)
    for flag, value in (("--workers", args.workers), ("--steps", args.steps), ("--every", args.every),
                        ("--pairs", args.pairs)):
        if value < 1:
            raise ConfigError(flag, f"must be at least 1, got {value}")
    if args.every > args.steps:
        raise ConfigError("--every", f"must be at most --steps ({args.steps}), got {args.every}")
    _check_outputs(args)
    settings = CheckpointSettings(task=args.task, strategy=args.strategy, workers=args.workers,
                                  steps=args.steps, every=args.every, pairs=args.pairs)
    pairs = run_checkpoint_bench(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "checkpoint", to_json(settings, pairs), pairs, checkpoint_markdown, settings,
                   title="")
    return 1 if any(p.error for p in pairs) else 0


def _memory(args: argparse.Namespace) -> int:
    from shoal.bench.memory import MemorySettings, run_memory_bench, to_json
    from shoal.bench.report import memory_markdown
    from shoal.config import ConfigError

    _check_task(args)
    workers = tuple(args.workers or (2, 4))
    if min(workers) < 1:
        raise ConfigError("--workers", f"must be at least 1, got {min(workers)}")
    replicas = tuple(args.replicas or (1, 2))
    if min(replicas) < 1:
        raise ConfigError("--zero-replicas", f"must be at least 1, got {min(replicas)}")
    if args.steps < 1:
        raise ConfigError("--steps", f"must be at least 1, got {args.steps}")
    _check_outputs(args)
    settings = MemorySettings(task=args.task, workers=workers, replicas=replicas, steps=args.steps)
    rows = run_memory_bench(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "memory", to_json(settings, rows), rows, memory_markdown, settings, title="")
    return 1 if any(r.error for r in rows) else 0


def _overhead(args: argparse.Namespace) -> int:
    from shoal.bench.overhead import OverheadSettings, run_overhead_bench, to_json
    from shoal.bench.report import overhead_markdown
    from shoal.config import ConfigError

    tasks = tuple(args.tasks or ("digits", "charlm"))
    _check_task(args, list(tasks))
    _at_least(1, ("--workers", args.workers), ("--pairs", args.pairs))
    _at_least(0, ("--warmup", args.warmup))
    if args.steps < args.warmup + 2:
        raise ConfigError("--steps", f"must exceed --warmup ({args.warmup}) by at least 2, got {args.steps}")
    _check_outputs(args)
    settings = OverheadSettings(tasks=tasks, workers=args.workers, steps=args.steps, warmup=args.warmup,
                                pairs=args.pairs)
    pairs = run_overhead_bench(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "overhead", to_json(settings, pairs), pairs, overhead_markdown, settings, title="")
    return 1 if any(p.error for p in pairs) else 0


def _recovery(args: argparse.Namespace) -> int:
    from shoal.bench.recovery import RecoverySettings, run_recovery_bench, to_json
    from shoal.bench.report import recovery_markdown
    from shoal.config import ConfigError

    _check_task(args)
    _at_least(2, ("--workers", args.workers))
    _at_least(1, ("--steps", args.steps), ("--kill-step", args.kill_step),
              ("--checkpoint-every", args.checkpoint_every), ("--pairs", args.pairs))
    if args.kill_step >= args.steps:
        raise ConfigError("--kill-step", f"must be below --steps ({args.steps}), got {args.kill_step}")
    _check_outputs(args)
    settings = RecoverySettings(task=args.task, workers=args.workers, steps=args.steps, kill_step=args.kill_step,
                                checkpoint_every=args.checkpoint_every, pairs=args.pairs)
    pairs = run_recovery_bench(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "recovery", to_json(settings, pairs), pairs, recovery_markdown, settings, title="")
    return 1 if any(p.error for p in pairs) else 0


def _scaling(args: argparse.Namespace) -> int:
    from shoal.bench.report import scaling_markdown
    from shoal.bench.scaling import ScalingSettings, run_scaling_bench, to_json
    from shoal.config import ConfigError

    _check_task(args)
    workers = tuple(args.workers or (1, 2, 4))
    _at_least(1, ("--workers", min(workers)))
    _at_least(0, ("--warmup", args.warmup))
    if args.steps < args.warmup + 2:
        raise ConfigError("--steps", f"must exceed --warmup ({args.warmup}) by at least 2, got {args.steps}")
    _check_outputs(args)
    settings = ScalingSettings(task=args.task, workers=workers, steps=args.steps, warmup=args.warmup)
    rows = run_scaling_bench(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "scaling", to_json(settings, rows), rows, scaling_markdown, settings, title="")
    return 1 if any(r.error for r in rows) else 0


def _check_outputs(args) -> None:
    """Refuse unwritable output paths before any run starts."""
    from shoal.config import check_writable_file

    for flag, path in (("--json", args.json), ("--markdown", args.markdown),
                       ("--plot", getattr(args, "plot", None))):
        check_writable_file(flag, path)


def _write_outputs(args, name: str, data: dict, results, markdown, settings, *, title: str) -> None:
    from shoal.bench import report

    plotter = getattr(report, f"plot_{name}", report.plot_curves)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=2)
    plot = getattr(args, "plot", None)
    plotted = bool(plot) and plotter(results, plot, title=title)
    if plot and not plotted:
        print(f"shoal bench {name}: no plot: matplotlib is not installed (pip install 'shoal[bench]')",
              file=sys.stderr)
    if args.markdown:
        command = "shoal bench " + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else [])
        when = (f"Measured {datetime.date.today().isoformat()} on {platform.machine()} "
                f"({_cores()} cores), torch {_torch_version()}")
        with open(args.markdown, "w") as handle:
            handle.write(markdown(settings, results, command=command, when=when,
                                  plot=plot if plotted else None))


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def _torch_version() -> str:
    import torch

    return torch.__version__
