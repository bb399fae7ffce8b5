"""Validated configuration for a training job.

The CLI only fills a :class:`TrainConfig`; every check lives here so that the library API
and the CLI refuse the same bad input with the same message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from shoal.runtime.schedule import LRSchedule

__all__ = ["ConfigError", "KillSpec", "RunConfig", "TrainConfig", "check_writable_file"]


class ConfigError(ValueError):
    """Bad user input. ``flag`` names the command-line flag (or API argument) to change."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.reported = False
        """A worker told the job's coordinator (``Context.reject``): the launcher prints it."""


@dataclass(frozen=True, slots=True)
class KillSpec:
    """A planned fault: ``--kill`` (SIGKILL), ``--hang`` (SIGSTOP), ``--fail`` (an exception)
    or ``--lose-answer`` (``LOST``: a collective failure that only this worker sees).

    The worker launched as ``rank`` sends itself ``signal`` (or raises, for ``EXCEPTION`` and
    ``LOST``) when it reaches ``step``.
    ``rank`` is the worker's launch rank (its stable worker id), not its rank in the current
    generation: ranks are re-numbered when members leave, and a fault plan must keep naming
    the same process.
    """

    rank: int
    step: int
    signal: str = "SIGKILL"
    phase: str = "step"
    """Where in the step: ``step`` (its start), ``commit`` (after the gradients were
    exchanged, before the update is applied; under async, at its commit point: a holder
    adopting a snapshot of ``step`` steps or more, before it reports them, or the server once
    it has taken one), ``agreed`` (once the members agreed to apply the step, before this one
    applies it: under zero after its one-number all-reduce, elsewhere where ``commit`` is;
    ``--lose-answer``'s only phase) or ``heal`` (while state is being sent to a member that
    lacks it, at the first heal from ``step`` on)."""

    PHASES = ("step", "commit", "agreed", "heal")

    @property
    def flag(self) -> str:
        return {"SIGSTOP": "--hang", "EXCEPTION": "--fail", "LOST": "--lose-answer"}.get(
            self.signal, "--kill")

    @staticmethod
    def default_phase(signal: str) -> str:
        return "agreed" if signal == "LOST" else "step"

    @classmethod
    def parse(cls, text: str, signal: str = "SIGKILL") -> KillSpec:
        where, _, phase = text.partition(":")
        rank, sep, step = where.partition("@")
        phase = phase or cls.default_phase(signal)
        phases = ("agreed",) if signal == "LOST" else cls.PHASES
        if not sep or not rank.strip().isdigit() or not step.strip().isdigit() or \
                phase not in phases:
            shape = "" if signal == "LOST" else f"[:{'|'.join(phases)}]"
            raise ConfigError(cls(0, 0, signal).flag,
                              f"expected RANK@STEP{shape} such as 1@20, got {text!r}")
        return cls(int(rank), int(step), signal, phase)

    def __str__(self) -> str:
        default = self.phase == self.default_phase(self.signal)
        return f"{self.rank}@{self.step}" + ("" if default else f":{self.phase}")


MAX_SLOWDOWN = 1000.0
"""A straggler 1000x slower is already one that never finishes a step in a test's time."""
MAX_SEED = 2**32 - 1
"""Seeds are mixed into 64-bit generator seeds (the sampler multiplies them by 1,000,003)."""


def check_heartbeat_timeout(timeout: float, interval: float = 0.25) -> None:
    if not 0 < interval < timeout < math.inf:
        raise ConfigError("--heartbeat-timeout", f"must exceed the heartbeat interval ({interval:g} s) "
                          f"and be finite, got {timeout:g}")


def check_bindable(flag: str, host: str) -> None:
    """Refuse an address this machine cannot listen on (another machine's, a name that does
    not resolve) before anything starts: binding it would fail or hang later, in a thread."""
    try:
        family = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
    except OSError as error:
        raise ConfigError(flag, f"cannot listen on {host!r}: {error.strerror or error}") from None


def check_distinct_files(paths: dict[str, str | None]) -> None:
    """Two outputs written to one path would overwrite each other at the end of the run."""
    seen: dict[str, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(flag, f"{path!r} is also {seen[real]}'s file: give each output its own")
        seen[real] = flag


def check_writable_file(flag: str, path: str | None) -> None:
    """Refuse a path we could not write at the end of a run, before the run starts."""
    if path is None:
        return
    if not path:
        raise ConfigError(flag, "is empty: give a file path")
    if os.path.isdir(path):
        raise ConfigError(flag, f"{path!r} is a directory, expected a file path")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigError(flag, f"directory {parent!r} does not exist")
    # Probe for real (permission bits say little to root): results are written as a temporary
    # file in the same directory, then renamed over ``path``.
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".shoal-probe-"):
            pass
    except OSError as error:
        raise ConfigError(flag, f"cannot write to {parent!r}: {error.strerror}") from None
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ConfigError(flag, f"{path!r} is not writable")


def _split_address(flag: str, address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(flag, f"expected HOST:PORT such as 10.0.0.1:29400, got {address!r}")
    return host.strip("[]"), int(port)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _changed(config, name: str) -> bool:
    """Does dataclass field ``name`` of ``config`` differ from its default (its flag given)?"""
    return getattr(config, name) != type(config).__dataclass_fields__[name].default


ENV_TOKEN = "SHOAL_TOKEN"
"""The job token, for a launcher joining a standalone coordinator (``--token``'s default: a
variable keeps it out of the process list) and for every worker."""
ENV_WORKER_PID = "SHOAL_WORKER_PID"
"""The pid the launcher knows a worker by, when the worker is a program's child (``shoal run
--no-python`` with a wrapper that does not exec): what it reports when it joins."""


def joining_token(token: str | None, coordinator: str | None) -> str | None:
    """``--token``, or with ``--coordinator`` the ``SHOAL_TOKEN`` variable."""
    return token if token is not None or coordinator is None else os.environ.get(ENV_TOKEN)


def _check_joining(config) -> None:
    """``--coordinator`` and ``--token`` of a launcher joining a standalone coordinator, which
    owns membership: the flags that configure an embedded one would be ignored, so they are
    refused instead."""
    _split_address("--coordinator", config.coordinator)
    if not config.token:
        raise ConfigError("--token", "joining a standalone coordinator needs its job token")
    for name in ("min_workers", "heartbeat_timeout"):
        if _changed(config, name):
            raise ConfigError(_flag(name), "with --coordinator the standalone coordinator sets it: "
                              f"give it to `shoal coordinator {_flag(name)}`")


def coordinator_url(address: str) -> str:
    host, port = _split_address("--coordinator", address)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass(kw_only=True, slots=True)
class StrategyOptions:
    """How the chosen strategy talks (``--compress``, ``--sync-every``, ...)."""

    compress: str = "none"
    """Compressor of the all-reduce (allreduce, hierarchical) or of the averaged update
    (localsgd, diloco): none, fp16, int8, onebit, powersgd."""
    powersgd_rank: int = 4
    sync_every: int = 50
    """localsgd/diloco: local steps between synchronisations (H)."""
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    """diloco's outer Nesterov SGD (the paper's defaults)."""
    max_staleness: int = 8
    """async: drop a gradient computed on parameters more than this many updates old."""
    warmup_steps: int = 0
    """The first steps are exchanged uncompressed, and localsgd/diloco all-reduce gradients
    every step until then (post-local SGD, Lin et al. 2020): compressors and local steps cost
    most quality early in training."""
    variance_refresh: int = 0
    """1-bit Adam: every this many compressed steps, the gradients are summed once (int8, a
    scale per 256 values) and Adam's frozen variance takes them in, weighted as the steps
    since the last refresh (0: frozen for good, as in the paper)."""
    zero_replicas: int = 2
    """zero: members holding each shard (replica groups as in HSDP). A member's death costs
    nothing while another holds each of its shards; with 1, a crash goes back to the last
    checkpoint."""
    workers_per_host: int | None = None
    """hierarchical: group consecutive worker ids into emulated hosts of this many workers
    (default: workers that share a launcher, i.e. a machine, form a host)."""

    def validate(self, strategy: str) -> StrategyOptions:
        from shoal.compression import COMPRESSORS

        if self.compress not in COMPRESSORS:
            raise ConfigError("--compress", f"unknown compressor {self.compress!r} "
                              f"(choose from {', '.join(COMPRESSORS)})")
        if self.powersgd_rank < 1:
            raise ConfigError("--powersgd-rank", f"must be at least 1, got {self.powersgd_rank}")
        if self.sync_every < 1:
            raise ConfigError("--sync-every", f"must be at least 1, got {self.sync_every}")
        if not 0 < self.outer_lr < math.inf:
            raise ConfigError("--outer-lr", f"must be positive and finite, got {self.outer_lr}")
        if not 0 <= self.outer_momentum < 1:
            raise ConfigError("--outer-momentum", f"must be in [0, 1), got {self.outer_momentum}")
        if self.zero_replicas < 1:
            raise ConfigError("--zero-replicas", f"must be at least 1, got {self.zero_replicas}")
        if strategy == "zero" and self.compress != "none":
            raise ConfigError("--compress", "zero's collectives are FSDP's own; use --compress none "
                              "with --strategy zero")
        if self.warmup_steps < 0:
            raise ConfigError("--warmup-steps", f"must be 0 or more, got {self.warmup_steps}")
        if strategy == "async" and self.warmup_steps:
            raise ConfigError("--warmup-steps", "async has no warm-up; leave --warmup-steps at 0")
        if self.variance_refresh < 0:
            raise ConfigError("--variance-refresh", f"must be 0 or more, got {self.variance_refresh}")
        if self.variance_refresh and not (self.compress == "onebit" and self.warmup_steps > 0
                                          and strategy in ("allreduce", "hierarchical")):
            raise ConfigError("--variance-refresh", "refreshes 1-bit Adam's variance: use it with "
                              "--compress onebit --warmup-steps W and --strategy allreduce or hierarchical")
        if self.max_staleness < 0:
            raise ConfigError("--max-staleness", f"must be at least 0, got {self.max_staleness}")
        if strategy == "async" and self.compress != "none":
            raise ConfigError("--compress", "async pushes whole gradients; use --compress none "
                              "with --strategy async")
        if self.workers_per_host is not None and self.workers_per_host < 1:
            raise ConfigError("--workers-per-host", f"must be at least 1, got {self.workers_per_host}")
        self._refuse_unused(strategy)
        return self

    def _refuse_unused(self, strategy: str) -> None:
        """An option the chosen strategy never reads is a mistake in the command (the wrong
        strategy, or a flag meant for another run): say so rather than ignore it."""
        for name, users in _OPTION_USERS.items():
            if _changed(self, name) and strategy not in users:
                raise ConfigError(_flag(name), f"only --strategy {' or '.join(users)} uses it, "
                                  f"not {strategy}")
        if _changed(self, "powersgd_rank") and self.compress != "powersgd":
            raise ConfigError("--powersgd-rank", "only --compress powersgd uses it")


_OPTION_USERS = {"sync_every": ("localsgd", "diloco"), "outer_lr": ("diloco",),
                 "outer_momentum": ("diloco",), "max_staleness": ("async",),
                 "zero_replicas": ("zero",), "workers_per_host": ("hierarchical",)}
"""Strategy options and the strategies that read them."""


@dataclass(frozen=True, slots=True)
class Slowdown:
    """``--slowdown RANK=FACTOR``: the worker launched as RANK computes FACTOR times slower."""

    rank: int
    factor: float

    @classmethod
    def parse(cls, text: str) -> Slowdown:
        rank, separator, factor = text.partition("=")
        try:
            parsed = cls(int(rank), float(factor))
        except ValueError:
            parsed = None
        if not separator or parsed is None or parsed.rank < 0 or not 1 <= parsed.factor <= MAX_SLOWDOWN:
            raise ConfigError("--slowdown", f"expected RANK=FACTOR with 1 <= FACTOR <= {MAX_SLOWDOWN:g} "
                              f"(e.g. 1=3), got {text!r}")
        return parsed

    def __str__(self) -> str:
        return f"{self.rank}={self.factor:g}"


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything one ``shoal train`` job needs. Call :meth:`validate` before use."""

    task: str = "digits"
    workers: int = 2
    """Worker processes to start."""
    min_workers: int = 1
    """The job fails when fewer workers than this remain."""
    strategy: str = "allreduce"
    options: StrategyOptions = field(default_factory=StrategyOptions)
    epochs: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    """GLOBAL batch size: constant whatever the number of live workers (shares grow)."""
    lr: float | None = None
    lr_schedule: str = "constant"
    """``constant`` or ``cosine`` (to 0 at the end), after ``lr_warmup`` steps of linear warm-up."""
    lr_warmup: int = 0
    seed: int = 0
    output: str | None = None
    save_model: str | None = None
    sample_log: str | None = None
    kills: list[KillSpec] = field(default_factory=list)
    """Planned faults: SIGKILLs (``--kill``), SIGSTOPs (``--hang``), exceptions (``--fail``)."""
    slowdowns: list[Slowdown] = field(default_factory=list)
    """Stragglers: the worker holding a rank sleeps so that each step takes FACTOR times longer."""
    restart: bool = False
    """Restart a worker whose process died; it rejoins with live state from a peer."""
    max_restarts: int = 3
    """Restarts per worker at most."""
    max_workers: int | None = None
    """Members at most; extra joiners wait."""
    quiet: bool = False
    heartbeat_interval: float = 0.25
    heartbeat_timeout: float = 5.0
    """A worker silent this long is declared dead; collectives time out after the same."""
    host: str = "127.0.0.1"
    """Address the embedded coordinator binds."""
    coordinator: str | None = None
    """``HOST:PORT`` of a standalone coordinator to join instead of embedding one."""
    token: str | None = None
    """The job token of that coordinator."""
    checkpoint_dir: str | None = None
    """Save the committed state here (``--checkpoint-every`` steps, at the end, on SIGTERM)."""
    checkpoint_every: int = 100
    checkpoint_keep: int = 3
    """Newest checkpoints kept."""
    resume: str | None = None
    """Resume from this checkpoint directory (its newest good checkpoint); checkpoints go on
    being written there unless ``checkpoint_dir`` says otherwise."""

    def validate(self) -> TrainConfig:
        """Check every field and fill task defaults; raises :class:`ConfigError`."""
        from shoal.strategies import STRATEGIES
        from shoal.tasks import TASKS

        if self.task not in TASKS:
            raise ConfigError("--task", f"unknown task {self.task!r} (choose from {', '.join(TASKS)})")
        if self.strategy not in STRATEGIES:
            choices = ", ".join(STRATEGIES)
            raise ConfigError("--strategy", f"unknown strategy {self.strategy!r} (choose from {choices})")
        self.options.validate(self.strategy)
        if self.workers < 1:
            raise ConfigError("--workers", f"must be at least 1, got {self.workers}")
        if not 1 <= self.min_workers <= self.workers:
            raise ConfigError(
                "--min-workers", f"must be between 1 and --workers ({self.workers}), got {self.min_workers}"
            )
        if self.max_workers is not None and self.max_workers < self.workers:
            raise ConfigError(
                "--max-workers", f"must be at least --workers ({self.workers}), got {self.max_workers}"
            )
        if self.max_restarts < 0:
            raise ConfigError("--max-restarts", f"must be 0 or more, got {self.max_restarts}")
        if _changed(self, "max_restarts") and not self.restart:
            raise ConfigError("--max-restarts", "limits --restart: give --restart too")
        if self.token is not None and self.coordinator is None:
            raise ConfigError("--token", "is the token of a standalone coordinator: give --coordinator too "
                              "(an embedded coordinator makes its own)")
        if self.epochs is not None and self.steps is not None:
            raise ConfigError("--steps", "give either --epochs or --steps, not both")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("--epochs", f"must be at least 1, got {self.epochs}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("--steps", f"must be at least 1, got {self.steps}")
        defaults = TASKS[self.task].defaults
        if self.epochs is None and self.steps is None:
            self.epochs = defaults.epochs
        if self.batch_size is None:
            self.batch_size = defaults.batch_size
        if self.lr is None:
            self.lr = defaults.lr
        if self.batch_size < self.workers:
            raise ConfigError(
                "--batch-size",
                f"the global batch ({self.batch_size}) must be at least --workers ({self.workers})",
            )
        samples = self.train_samples()
        if self.batch_size > samples:
            raise ConfigError("--batch-size", f"the global batch ({self.batch_size}) is larger than "
                              f"{self.task}'s {samples} training samples")
        if not 0 < self.lr < math.inf:
            raise ConfigError("--lr", f"must be positive and finite, got {self.lr}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ConfigError("--seed", f"must be between 0 and {MAX_SEED}, got {self.seed}")
        total_steps = self.total_steps()
        self.schedule().validate(total_steps if self.lr_warmup else None)
        check_heartbeat_timeout(self.heartbeat_timeout, self.heartbeat_interval)
        for kill in self.kills:
            if kill.phase == "agreed" and self.strategy == "async":
                raise ConfigError(kill.flag, f"{kill} is not for --strategy async: its members "
                                  "apply what the server sends and agree on no step")
            if kill.rank >= self.workers:
                raise ConfigError(kill.flag, f"rank {kill.rank} does not exist with --workers {self.workers}")
            if kill.step >= total_steps:
                raise ConfigError(kill.flag, f"step {kill.step} never comes: the run has {total_steps} "
                                  f"steps (0-{total_steps - 1})")
        for slowdown in self.slowdowns:
            if slowdown.rank >= self.workers:
                raise ConfigError("--slowdown", f"rank {slowdown.rank} does not exist with --workers {self.workers}")
        if self.coordinator is not None:
            self._validate_joining()
        else:
            check_bindable("--host", self.host)
        self._validate_checkpoints()
        check_writable_file("--output", self.output)
        check_writable_file("--save-model", self.save_model)
        check_writable_file("--sample-log", self.sample_log)
        check_distinct_files({"--output": self.output, "--save-model": self.save_model,
                              "--sample-log": self.sample_log})
        return self

    def job_spec(self) -> dict[str, object]:
        """What every launcher of one job must agree on, by flag (after :meth:`validate`): the
        data, the model's training and how workers talk. Per-host things (worker count,
        faults, output files) may differ, and so may ``--workers-per-host``."""
        names = ("task", "batch_size", "lr", "lr_schedule", "lr_warmup", "seed", "strategy")
        spec = {_flag(name): getattr(self, name) for name in names}
        spec["--steps"] = self.total_steps()  # --epochs E and its --steps agree
        options = dataclasses.asdict(self.options)
        options.pop("workers_per_host")
        return spec | {_flag(name): value for name, value in options.items()}

    def _validate_joining(self) -> None:
        """With ``--coordinator`` the standalone coordinator owns membership: the flags that
        configure an embedded one would be ignored, so they are refused instead."""
        _check_joining(self)
        if self.max_workers is not None:
            raise ConfigError("--max-workers", "not supported with --coordinator")
        if _changed(self, "host"):
            raise ConfigError("--host", "binds an embedded coordinator: with --coordinator there is none")

    def schedule(self) -> LRSchedule:
        from shoal.runtime.schedule import LRSchedule

        return LRSchedule(self.lr_schedule, self.lr_warmup)

    def total_steps(self) -> int:
        """The run's length in steps (with ``--epochs``, from the task's training set)."""
        if self.steps is not None:
            return self.steps
        from shoal.data import GlobalBatchSampler

        return self.epochs * GlobalBatchSampler(self.train_samples(), self.batch_size, self.seed).steps_per_epoch

    def train_samples(self) -> int:
        """The size of the task's training set (without building it: see Task.train_samples)."""
        from shoal.tasks import TASKS

        return TASKS[self.task].train_samples(self.seed)

    def _validate_checkpoints(self) -> None:
        if self.checkpoint_every < 1:
            raise ConfigError("--checkpoint-every", f"must be at least 1, got {self.checkpoint_every}")
        if self.checkpoint_keep < 1:
            raise ConfigError("--checkpoint-keep", f"must be at least 1, got {self.checkpoint_keep}")
        one_checkpoint = False
        if self.resume is not None:
            if not os.path.isdir(self.resume):
                raise ConfigError("--resume", f"{self.resume!r} is not a directory")
            # A job's checkpoint directory goes on being written; one checkpoint in it (an older
            # one, say) starts a new line of checkpoints, which must not mix with that job's.
            one_checkpoint = os.path.isfile(os.path.join(self.resume, "meta.json"))
            if self.checkpoint_dir is None and not one_checkpoint:
                self.checkpoint_dir = self.resume
        if self.checkpoint_dir is None:
            for name in ("checkpoint_every", "checkpoint_keep"):
                if _changed(self, name):
                    raise ConfigError(_flag(name), "applies to checkpoints: give --checkpoint-dir too")
            return
        if self.strategy == "async":
            raise ConfigError("--checkpoint-dir", "checkpoints are not supported with --strategy async yet")
        if os.path.exists(self.checkpoint_dir) and not os.path.isdir(self.checkpoint_dir):
            raise ConfigError("--checkpoint-dir", f"{self.checkpoint_dir!r} is not a directory")
        try:
            os.makedirs(self.checkpoint_dir, exist_ok=True)
        except OSError as error:
            raise ConfigError("--checkpoint-dir", f"cannot create {self.checkpoint_dir!r}: "
                              f"{error.strerror}") from None
        check_writable_file("--checkpoint-dir", os.path.join(self.checkpoint_dir, "metrics.json"))
        continuing = (self.resume is not None and not one_checkpoint
                      and os.path.samefile(self.checkpoint_dir, self.resume))
        if not continuing and any(name.startswith("step-") for name in os.listdir(self.checkpoint_dir)):
            raise ConfigError("--checkpoint-dir", f"{self.checkpoint_dir!r} holds another job's "
                              "checkpoints: continue it with --resume, or give an empty directory")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["kills"] = [[str(k), k.signal] for k in self.kills]
        data["slowdowns"] = [str(s) for s in self.slowdowns]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        data = json.loads(text)
        data["kills"] = [KillSpec.parse(text, signal) for text, signal in data["kills"]]
        data["slowdowns"] = [Slowdown.parse(text) for text in data.get("slowdowns", [])]
        data["options"] = StrategyOptions(**data.get("options", {}))
        return cls(**data)


QUORUM_POLICIES = ("majority", "none")
"""``shoal run --quorum``: a side of a partition of the nodes goes on only with most of them
(``launch/quorum.py``), or every side goes on."""


@dataclass(kw_only=True, slots=True)
class RunConfig:
    """``shoal run``: a user script on ``nproc_per_node`` processes on each of ``nnodes`` nodes
    (torchrun's static rendezvous: node 0 hosts the store at ``master_addr:master_port``)."""

    TORCHRUN_MASTER_PORT = 29500
    """torchrun's default ``--master-port``; on a single node the OS chooses one instead."""

    script: str
    script_args: list[str] = field(default_factory=list)
    module: bool = False
    """``-m``: ``script`` is a module, run as ``python -m`` runs it."""
    no_python: bool = False
    """``--no-python``: ``script`` is a program (a shell script, a binary), run as it is."""
    nproc_per_node: int = 1
    nnodes: int = 1
    node_rank: int | None = None
    """None: node 0 if this node can listen at ``master_addr:master_port``, else the next
    free rank (torchrun's c10d rendezvous)."""
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    run_id: str | None = None
    """torchrun's ``--rdzv-id``: node 0's, or a random one; every other node must match."""
    join_timeout: float = 300.0
    min_workers: int = 1
    heartbeat_timeout: float = 5.0
    coordinator: str | None = None
    """``HOST:PORT`` of a standalone coordinator (``shoal coordinator``) that this node's
    workers join, instead of meeting at node 0: a ``shoal.train`` script that survives the
    loss of any node."""
    token: str | None = None
    max_restarts: int = 0
    """A ``shoal.train`` script: how many times each worker that fails is started again (it
    rejoins the running job). A plain one (never with ``coordinator``): how many times every
    node's workers are started again after one failed (torchrun's restart)."""
    quorum: str = "majority"
    """Which side of a partition of the nodes goes on (``launch/quorum.py``): ``majority``,
    or ``none`` (every side)."""

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def validate(self) -> RunConfig:
        self._validate_script()
        if self.nproc_per_node < 1:
            raise ConfigError("--nproc-per-node", f"must be at least 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError("--max-restarts", f"must be 0 or more, got {self.max_restarts}")
        if self.coordinator is not None:
            self._validate_joining()
            return self
        if self.token is not None:
            raise ConfigError("--token", "is the job token of a standalone coordinator: give "
                              "--coordinator HOST:PORT with it")
        if self.nnodes < 1:
            raise ConfigError("--nnodes", f"must be at least 1, got {self.nnodes}")
        if self.nnodes == 1:
            self.node_rank = 0
        if self.node_rank is not None and not 0 <= self.node_rank < self.nnodes:
            raise ConfigError("--node-rank", f"must be between 0 and --nnodes - 1 ({self.nnodes - 1}), "
                              f"got {self.node_rank}")
        if self.master_port is None:
            self.master_port = self.TORCHRUN_MASTER_PORT if self.nnodes > 1 else 0
        if not (0 if self.nnodes == 1 else 1) <= self.master_port <= 65535:
            raise ConfigError("--master-port", f"must be a port number (1-65535) every node is given, "
                              f"got {self.master_port}")
        if not 0 < self.join_timeout < math.inf:
            raise ConfigError("--join-timeout", f"must be a positive number of seconds, got {self.join_timeout:g}")
        if not 1 <= self.min_workers <= self.world_size:
            raise ConfigError(
                "--min-workers",
                f"must be between 1 and the job's {self.world_size} processes (--nnodes x "
                f"--nproc-per-node), got {self.min_workers}",
            )
        check_heartbeat_timeout(self.heartbeat_timeout)
        if self.quorum not in QUORUM_POLICIES:
            raise ConfigError("--quorum", f"must be one of {', '.join(QUORUM_POLICIES)}, got {self.quorum!r}")
        if self.node_rank == 0:  # it hosts the store and the coordinator there
            check_bindable("--master-addr", self.master_addr)
        return self

    def _validate_script(self) -> None:
        """The script, module or program exists as each worker will look for it (a module is
        found by the workers, in this directory: importing it here could run its code)."""
        if self.module and self.no_python:
            raise ConfigError("--no-python", "not with -m: a module is run by Python")
        if self.module:
            if not all(part.isidentifier() for part in self.script.split(".")):
                raise ConfigError("-m", f"{self.script!r} is not a module name (such as package.train)")
        elif self.no_python:
            found = self.script if os.sep in self.script else shutil.which(self.script)
            if found is None or not os.path.isfile(found):
                raise ConfigError("script", f"{self.script!r} is not a file or a program on PATH")
            if not os.access(found, os.X_OK):
                raise ConfigError("--no-python", f"{self.script!r} is not executable: chmod +x it, "
                                  "or run it with Python (without --no-python)")
        elif not os.path.isfile(self.script):
            raise ConfigError("script", f"{self.script!r} is not a file")

    def _validate_joining(self) -> None:
        """With ``--coordinator`` there is no node 0: the standalone coordinator owns the job
        and its membership, and the flags that set up node 0's would be ignored, so they are
        refused instead."""
        _check_joining(self)
        for name, flag, why in (
                ("nnodes", "--nnodes", ("every node runs its own `shoal run --coordinator`; the "
                 "coordinator counts the workers (shoal coordinator --workers)")),
                ("node_rank", "--node-rank", "the coordinator numbers the workers as they join"),
                ("master_addr", "--master-addr", "the workers meet at the coordinator"),
                ("master_port", "--master-port", "the workers meet at the coordinator"),
                ("run_id", "--rdzv-id", "the coordinator is the job"),
                ("join_timeout", "--join-timeout", "it is how long a node waits for node 0"),
                ("quorum", "--quorum", "there is one coordinator, and no side of a partition to choose")):
            if _changed(self, name):
                raise ConfigError(flag, f"not with --coordinator: {why}")
