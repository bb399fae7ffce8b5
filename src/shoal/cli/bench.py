"""``shoal bench``: benchmarks that write JSON, Markdown and PNG (docs/BENCHMARKS.md)."""

from __future__ import annotations

import argparse
import datetime
import json
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
    wan.add_argument("--target-loss", type=float, default=2.5,
                     help="smoothed training loss to reach (default 2.5)")
    wan.add_argument("--only", action="append", default=[], metavar="LABEL",
                     help="run only these (repeatable), e.g. 'allreduce' 'diloco H=50'")
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
    checkpoint.add_argument("--workers", type=int, default=2, help="local workers (default 2)")
    checkpoint.add_argument("--steps", type=int, default=200, help="steps per run (default 200)")
    checkpoint.add_argument("--every", type=int, default=50, help="steps between checkpoints (default 50)")
    checkpoint.add_argument("--pairs", type=int, default=5,
                            help="runs without and with checkpoints, alternating (default 5 pairs)")
    memory = _benchmark(kinds, "memory", "each worker's share of the state: zero against allreduce", _memory)
    memory.add_argument("--workers", type=int, action="append", metavar="N",
                        help="worker counts to measure (repeatable; default 2 and 4)")
    memory.add_argument("--steps", type=int, default=4, help="steps per run (default 4)")


def _benchmark(kinds, name: str, summary: str, handler, *, plot: bool = False) -> argparse.ArgumentParser:
    """A benchmark's parser with what every benchmark takes: --task and its outputs."""
    parser = kinds.add_parser(name, help=summary)
    parser.add_argument("--task", default="charlm", help="task to train (default charlm)")
    parser.add_argument("--json", metavar="PATH", help="write every run as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    if plot:
        parser.add_argument("--plot", metavar="PATH", help="write loss against wall time as PNG")
    parser.set_defaults(handler=handler)
    return parser


def _check_task(args) -> None:
    from shoal.config import ConfigError
    from shoal.tasks import TASKS

    if args.task not in TASKS:
        raise ConfigError("--task", f"unknown task {args.task!r} (choose from {', '.join(TASKS)})")


def _wan(args: argparse.Namespace) -> int:
    from shoal.bench.report import wan_markdown
    from shoal.bench.wan import DEFAULT_RUNS, WanSettings, run_wan, to_json
    from shoal.config import ConfigError
    from shoal.network import namespaces_available

    _check_task(args)
    if args.hosts < 2:
        raise ConfigError("--hosts", f"must be at least 2, got {args.hosts}")
    if not args.mbit > 0:
        raise ConfigError("--mbit", f"must be positive, got {args.mbit}")
    if args.steps < 1:
        raise ConfigError("--steps", f"must be at least 1, got {args.steps}")
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
                           target_loss=args.target_loss, runs=runs)
    results = run_wan(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "wan", to_json(settings, results), results, wan_markdown, settings,
                   title=f"{args.task}, {args.hosts} hosts at {args.mbit:g} Mbit/s")
    return 1 if any(r.error for r in results) else 0


def _straggler(args: argparse.Namespace) -> int:
    from shoal.bench.report import straggler_markdown
    from shoal.bench.straggler import StragglerSettings, run_straggler, to_json
    from shoal.config import ConfigError

    _check_task(args)
    if args.workers < 2:
        raise ConfigError("--workers", f"must be at least 2 (one of them is slow), got {args.workers}")
    if not args.factor >= 1:
        raise ConfigError("--factor", f"must be at least 1, got {args.factor}")
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
    settings = CheckpointSettings(task=args.task, workers=args.workers, steps=args.steps,
                                  every=args.every, pairs=args.pairs)
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
    if args.steps < 1:
        raise ConfigError("--steps", f"must be at least 1, got {args.steps}")
    _check_outputs(args)
    settings = MemorySettings(task=args.task, workers=workers, steps=args.steps)
    rows = run_memory_bench(settings, report=lambda line: print(line, flush=True))
    _write_outputs(args, "memory", to_json(settings, rows), rows, memory_markdown, settings, title="")
    return 1 if any(r.error for r in rows) else 0


def _check_outputs(args) -> None:
    """Refuse unwritable output paths before any run starts."""
    from shoal.config import check_writable_file

    for flag, path in (("--json", args.json), ("--markdown", args.markdown),
                       ("--plot", getattr(args, "plot", None))):
        check_writable_file(flag, path)


def _write_outputs(args, name: str, data: dict, results, markdown, settings, *, title: str) -> None:
    from shoal.bench.report import plot_curves

    if args.json:
        with open(args.json, "w") as handle:
            json.dump(data, handle, indent=2)
    plot = getattr(args, "plot", None)
    plotted = bool(plot) and plot_curves(results, plot, title=title)
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
