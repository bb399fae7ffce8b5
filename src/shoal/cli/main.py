"""The ``shoal`` command: fills configuration and calls the library, nothing more.

argparse because it is the standard library's parser: sub-commands, typed flags and help
with no dependency. Every usage error is ONE line naming the flag, with exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from shoal.config import (
    ConfigError,
    KillSpec,
    Slowdown,
    StrategyOptions,
    TrainConfig,
    joining_token,
)
from shoal.strategies import STRATEGIES
from shoal.tasks import TASKS

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line instead of usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        # argparse leaves a sub-command's unknown flags to the top parser, whose error names
        # `shoal`; the command that was given them says so instead (`shoal train: error: ...`).
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def _fault(signal: str):
    def parse(text: str) -> KillSpec:
        try:
            return KillSpec.parse(text, signal)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error).split(": ", 1)[1]) from None

    parse.__name__ = "RANK@STEP"  # argparse names the type in its error message
    return parse


def _slowdown(text: str) -> Slowdown:
    try:
        return Slowdown.parse(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error).split(": ", 1)[1]) from None


_slowdown.__name__ = "RANK=FACTOR"


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train a built-in task on N local workers",
                                description="Train a built-in task on N local worker processes "
                                "with an embedded coordinator.")
    train.add_argument("--task", default="digits", help=f"one of: {', '.join(TASKS)} (default digits)")
    train.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    train.add_argument("--min-workers", type=int, default=1,
                       help="fail when fewer workers remain (default 1)")
    train.add_argument("--strategy", default="allreduce",
                       help=f"one of: {', '.join(STRATEGIES)} (default allreduce)")
    talk = train.add_argument_group("how workers talk (see docs/STRATEGIES.md)")
    talk.add_argument("--compress", default="none",
                      help="none, fp16, int8, onebit or powersgd (default none); onebit with an "
                      "Adam or AdamW optimizer and --warmup-steps is 1-bit Adam")
    talk.add_argument("--powersgd-rank", type=int, default=4, help="PowerSGD's rank r (default 4)")
    talk.add_argument("--sync-every", type=int, default=50, metavar="H",
                      help="localsgd/diloco: local steps between synchronisations (default 50)")
    talk.add_argument("--outer-lr", type=float, default=0.7, help="diloco's outer learning rate (default 0.7)")
    talk.add_argument("--outer-momentum", type=float, default=0.9,
                      help="diloco's outer Nesterov momentum (default 0.9)")
    talk.add_argument("--warmup-steps", type=int, default=0, metavar="W",
                      help="the first W steps uncompressed, and for localsgd/diloco synchronous; "
                      "1-bit Adam freezes Adam's variance after them (default 0)")
    talk.add_argument("--variance-refresh", type=int, default=0, metavar="R",
                      help="1-bit Adam: every R steps after the warm-up, sum the gradients "
                      "once in int8 and refresh Adam's frozen variance with them, weighted "
                      "as the R steps since the last refresh (default 0: never)")
    talk.add_argument("--zero-replicas", type=int, default=2, metavar="R",
                      help="zero: members holding each shard (default 2: a death costs no step; "
                      "1: a crash goes back to the last checkpoint)")
    talk.add_argument("--max-staleness", type=int, default=8, metavar="K",
                      help="async: drop gradients more than K updates old (default 8)")
    talk.add_argument("--workers-per-host", type=int, metavar="K",
                      help="hierarchical: emulate hosts of K consecutive workers "
                      "(default: the workers of one launcher form a host)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help="epochs to train (default: the task's)")
    length.add_argument("--steps", type=int, help="steps to train instead of epochs")
    train.add_argument("--batch-size", type=int,
                       help="GLOBAL batch size, constant when workers die (default: the task's)")
    train.add_argument("--lr", type=float, help="learning rate (default: the task's)")
    train.add_argument("--lr-schedule", default="constant", metavar="KIND",
                       help="constant, or cosine: down to 0 after the last step (default constant)")
    train.add_argument("--lr-warmup", type=int, default=0, metavar="S",
                       help="raise the learning rate linearly over the first S steps (default 0)")
    train.add_argument("--seed", type=int, default=0, help="data order and init seed (default 0)")
    train.add_argument("--output", metavar="PATH", help="write results as JSON")
    train.add_argument("--save-model", metavar="PATH", help="save the final state_dict (torch.save)")
    train.add_argument("--sample-log", metavar="PATH",
                       help="JSONL, one line per committed step with its sample indices")
    train.add_argument("--kill", metavar="RANK@STEP", type=_fault("SIGKILL"), action="append",
                       default=[], help="the worker launched as RANK SIGKILLs itself at STEP (repeatable)")
    train.add_argument("--hang", metavar="RANK@STEP", type=_fault("SIGSTOP"), action="append",
                       default=[], help="the worker launched as RANK SIGSTOPs itself at STEP (repeatable)")
    train.add_argument("--fail", metavar="RANK@STEP", type=_fault("EXCEPTION"), action="append",
                       default=[], help="the worker launched as RANK raises an exception at STEP (repeatable)")
    train.add_argument("--lose-answer", metavar="RANK@STEP", type=_fault("LOST"), action="append",
                       default=[], help="the worker launched as RANK does not hear that STEP was "
                       "agreed: the others apply it, it fails and rejoins (repeatable)")
    train.add_argument("--slowdown", metavar="RANK=FACTOR", type=_slowdown, action="append", default=[],
                       help="the worker launched as RANK computes FACTOR times slower (repeatable)")
    train.add_argument("--restart", action="store_true",
                       help="restart a worker whose process died; it rejoins with a live peer's state")
    train.add_argument("--max-restarts", type=int, default=3, help="restarts per worker (default 3)")
    train.add_argument("--max-workers", type=int, help="members at most (default: no cap)")
    train.add_argument("--heartbeat-timeout", type=float, default=5.0,
                       help="seconds without heartbeat before a worker is declared dead (default 5)")
    train.add_argument("--host", default="127.0.0.1",
                       help="address the embedded coordinator binds (default 127.0.0.1)")
    train.add_argument("--coordinator", metavar="HOST:PORT",
                       help="join a standalone `shoal coordinator` instead of embedding one")
    train.add_argument("--token", help="the job token printed by that coordinator (default: $SHOAL_TOKEN)")
    durable = train.add_argument_group("checkpoints (see docs/CHECKPOINTS.md)")
    durable.add_argument("--checkpoint-dir", metavar="DIR",
                         help="save the committed state in DIR every --checkpoint-every steps, "
                         "at the end and on SIGTERM")
    durable.add_argument("--checkpoint-every", type=int, default=100, metavar="S",
                         help="steps between checkpoints (default 100)")
    durable.add_argument("--checkpoint-keep", type=int, default=3, metavar="K",
                         help="newest checkpoints kept (default 3)")
    durable.add_argument("--resume", metavar="DIR",
                         help="resume from DIR's newest good checkpoint (and go on saving there)")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from shoal.launch import run_train

    config = TrainConfig(
        task=args.task, workers=args.workers, min_workers=args.min_workers, strategy=args.strategy,
        options=StrategyOptions(compress=args.compress, powersgd_rank=args.powersgd_rank,
                                sync_every=args.sync_every, outer_lr=args.outer_lr,
                                outer_momentum=args.outer_momentum, max_staleness=args.max_staleness,
                                warmup_steps=args.warmup_steps, variance_refresh=args.variance_refresh,
                                zero_replicas=args.zero_replicas,
                                workers_per_host=args.workers_per_host),
        slowdowns=args.slowdown,
        epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, lr_warmup=args.lr_warmup,
        seed=args.seed, output=args.output, save_model=args.save_model,
        sample_log=args.sample_log, kills=args.kill + args.hang + args.fail + args.lose_answer,
        restart=args.restart,
        max_restarts=args.max_restarts, max_workers=args.max_workers, quiet=args.quiet,
        heartbeat_timeout=args.heartbeat_timeout, host=args.host,
        coordinator=args.coordinator, token=joining_token(args.token, args.coordinator), checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, checkpoint_keep=args.checkpoint_keep,
        resume=args.resume,
    )
    config.validate()
    return run_train(config)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shoal", description="Elastic, fault-tolerant training for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(commands)
    from shoal.cli.bench import add_bench
    from shoal.cli.chaos import add_chaos
    from shoal.cli.coordinator import add_coordinator
    from shoal.cli.export import add_export
    from shoal.cli.run import add_run

    add_run(commands)
    add_coordinator(commands)
    add_chaos(commands)
    add_bench(commands)
    add_export(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"shoal {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
