"""The elastic training loop: shoal owns the step boundary so it can redo and re-split a step.

One step, as data flows: the sampler gives this rank its share of global batch ``s``; the
loss (a SUM over the share, divided as the strategy says) is back-propagated; the strategy
communicates; the optimizer steps, and ``s`` is committed, at once (synchronous strategies)
or with the rest of its round (local SGD, DiLoCo). When anything in that fails because a
peer is gone, the worker reports it, drops the generation's process group, returns to its
last commit, waits for the next generation, heals from the most advanced member, and redoes
the first step that is not committed everywhere, re-split over the new members.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset

from shoal.checkpoint import (
    AsyncSaver,
    Checkpoint,
    CheckpointError,
    Checkpointing,
    CheckpointStore,
    check_resumable,
    job_identity,
)
from shoal.config import ConfigError, KillSpec, Slowdown, StrategyOptions
from shoal.coordinator.timeouts import START, STEP
from shoal.data import GlobalBatchSampler, fetch
from shoal.runtime.async_worker import keep_served_state, run_async
from shoal.runtime.context import ENV_LAUNCHER_ID, Context, GenerationMoved, JobStopped
from shoal.runtime.faults import maybe_kill
from shoal.runtime.heal import FRESH, HealReport, deserialize, heal
from shoal.runtime.reshard import ShardsLost, restore_from_members
from shoal.runtime.schedule import LRFactor, LRSchedule
from shoal.strategies import STRATEGIES, Strategy

__all__ = ["Preempted", "TrainResult", "train"]

log = logging.getLogger(__name__)

_MAX_FAILURES_WITHOUT_PROGRESS = 5
"""A step that keeps failing while no member changes is a bug, not a fault: give up."""

LossFn = Callable[[nn.Module, object], torch.Tensor]

class Preempted(JobStopped):
    """SIGTERM (a preemption notice): the leader saved a checkpoint (if asked to) and every
    worker stopped at a step boundary."""


@dataclass(slots=True)
class TrainResult:
    model: nn.Module
    steps: int
    """Committed steps."""
    epochs: float
    rank: int
    world_size: int
    generation: int
    heals: list[HealReport] = field(default_factory=list)
    bytes_sent: int = 0
    replicas_agree: bool | None = True
    """Every member ended with bit-identical parameters (checked once, at the end; None if a
    member left before it could be checked)."""
    resumed_from: int | None = None
    """The step of the checkpoint this run resumed from."""
    checkpoints: list[dict] = field(default_factory=list)
    """The checkpoints this worker wrote: step, bytes, write and blocked seconds."""
    state_bytes: dict[str, int] = field(default_factory=dict)
    """This worker's parameters, gradients and optimizer state, in bytes (its shards under zero)."""

    @property
    def is_leader(self) -> bool:
        """True on exactly one worker: the one that should evaluate, save and print."""
        return self.rank == 0


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    dataset: Dataset,
    loss_fn: LossFn,
    *,
    global_batch_size: int,
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    strategy: str = "allreduce",
    options: StrategyOptions | None = None,
    context: Context | None = None,
    kills: Sequence[KillSpec] = (),
    slowdowns: Sequence[Slowdown] = (),
    checkpoint: Checkpointing | None = None,
    resume: str | os.PathLike | None = None,
    task: str | None = None,
    lr_schedule: LRSchedule | LRFactor | None = None,
) -> TrainResult:
    """Train ``model`` elastically; survive workers that die.

    ``loss_fn(model, batch)`` must return the SUM of per-sample losses of ``batch`` (shoal
    divides by the global batch size). It may be called again for the same step after a
    failure, with a different share of the batch. Under ``shoal run`` the job's coordinator is
    found from the environment; run plainly, this trains in one process. ``options`` tune the
    strategy (compression, ``sync_every``, ...); ``kills`` and ``slowdowns`` inject faults.

    ``checkpoint`` makes the leader save the committed state every so many steps, at the end
    and on SIGTERM; ``resume`` (a checkpoint directory, or a job's checkpoint root: its
    newest good checkpoint) starts from a saved state. ``task`` names the workload in the
    checkpoint, so that resuming another one is refused.

    ``lr_schedule`` (an :class:`LRSchedule`, or ``step -> factor`` of the optimizer's rates
    as ``LambdaLR`` takes) sets the learning rate of each step from its number alone, so a
    redone or resumed step runs at the rate it had, and needs no scheduler state.
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps=")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed)
    total_steps = steps if steps is not None else epochs * sampler.steps_per_epoch
    owns_context = context is None
    if context is None:
        context = Context.from_env()
        context.join()
    try:
        chosen = _choose_strategy(model, optimizer, strategy, options, checkpoint)
        identity = job_identity(model, task=task, global_batch_size=global_batch_size, seed=seed,
                                strategy=strategy)
        saver = _checkpoint_saver(checkpoint, identity, context, resume) if checkpoint is not None else None
    except ConfigError as error:
        # Every worker refuses alike: the coordinator fails the job, the launcher says why once.
        context.reject(error)
        if owns_context:
            context.close()
        raise
    chosen.lr_factor = lr_schedule.over(total_steps) if isinstance(lr_schedule, LRSchedule) else lr_schedule
    if context.distributed:
        chosen.await_members = context.await_members
    context.times_steps = not chosen.drives_steps  # async's requests are not steps we run
    loop = _Loop(model, optimizer, dataset, loss_fn, sampler, chosen, context, kills, slowdowns,
                 saver, checkpoint.every if checkpoint else 0)
    try:
        with _PreemptionNotice(enabled=saver is not None) as notice:
            loop.preemption = notice
            if resume is not None:
                loop.resume(_open_resume(resume, identity))
            loop.run(total_steps)
        state_bytes = chosen.state_bytes()
        if chosen.sharded:  # no replicas to compare; the leader gets the whole model
            whole = chosen.full_state_dict()
            model, agree = (chosen.plain_model(whole) if context.rank == 0 else chosen.model), None
        else:
            agree = _replicas_agree(model)
    except BaseException:
        if owns_context:
            context.close()
        raise
    if agree is False and context.rank == 0:
        log.error("the members of generation %d ended with different parameters", context.generation)
    result = TrainResult(model, loop.position, loop.position / sampler.steps_per_epoch, context.rank,
                         context.world_size, context.generation, loop.heals,
                         loop.strategy.bytes_sent, agree, loop.resumed_from,
                         saver.saved if saver else [], state_bytes)
    if owns_context:
        context.finish()
    return result


def _choose_strategy(model: nn.Module, optimizer: torch.optim.Optimizer, strategy: str,
                     options: StrategyOptions | None, checkpoint: Checkpointing | None) -> Strategy:
    """The strategy, built for this model and optimizer; ``ConfigError`` if they do not go together."""
    options = (options or StrategyOptions()).validate(strategy)
    chosen = STRATEGIES[strategy](model, optimizer, options)
    if chosen.sharded and not chosen.replicated and checkpoint is None:
        raise ConfigError("checkpoint=", "strategy 'zero' with zero_replicas=1 needs it: after a "
                          "member dies, the last checkpoint is what the others go back to")
    if checkpoint is not None and chosen.drives_steps:
        raise ConfigError("checkpoint=", f"not supported with strategy {strategy!r} yet")
    return chosen


def _checkpoint_saver(checkpoint: Checkpointing, identity: dict, context: Context,
                      resume: str | os.PathLike | None) -> AsyncSaver:
    """The leader's saver into ``checkpoint.directory``; ``ConfigError`` if another job's is there."""
    store = CheckpointStore(checkpoint.directory, checkpoint.keep)
    # A worker that joins a running job (restarted, say) continues the job's own directory.
    continuing = context.joined_running_job or (resume is not None and _within(resume, checkpoint.directory))
    if not continuing and store.checkpoints(warn=lambda line: None):
        raise ConfigError("checkpoint=", f"{checkpoint.directory} holds another job's checkpoints: "
                          "continue it with resume=, or give an empty directory")
    return AsyncSaver(store, identity, background=checkpoint.background)


def _within(resume: str | os.PathLike, directory: str | os.PathLike) -> bool:
    """Is ``resume`` the checkpoint directory itself, or one checkpoint in it? (A job goes on
    writing where it resumes from; the launcher passes the checkpoint it chose.)"""
    root = os.path.dirname(os.path.abspath(resume)) if Checkpoint.is_checkpoint(resume) else resume
    return os.path.exists(directory) and os.path.samefile(root, directory)


def _open_resume(path: str | os.PathLike, identity: dict) -> tuple[Checkpoint, dict]:
    """The checkpoint at ``path`` (one checkpoint's directory, or the newest good one of a
    checkpoint root) and its verified state; refuses one of another job."""
    if Checkpoint.is_checkpoint(path):
        checkpoint = Checkpoint.open(path)
        state = checkpoint.load_state()
    else:
        found = CheckpointStore(path).latest_good()
        if found is None:
            raise CheckpointError(f"{path}: holds no checkpoint that passes its checksums")
        checkpoint, state = found
    check_resumable(checkpoint.meta, identity, str(checkpoint.path))
    return checkpoint, state


class _PreemptionNotice:
    """With checkpoints, SIGTERM sets a flag that the loop reads at the next step boundary
    (a handler that acted at once could interrupt the optimizer half-way through an update).
    Without them there is nothing to save, and SIGTERM keeps its default: stop at once."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.received = False
        self._previous = None

    def __enter__(self) -> _PreemptionNotice:
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _note(self, signum, frame) -> None:
        self.received = True


def _replicas_agree(model: nn.Module) -> bool | None:
    """Do all members hold the same parameters, bit for bit? (A digest, all-gathered.)

    None when it could not be checked: a member left after the last commit.
    """
    digest = hashlib.sha256()
    for parameter in model.parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    mine = torch.tensor([int.from_bytes(digest.digest()[:7], "little")], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    try:
        torch.distributed.all_gather(everyone, mine)
    except RuntimeError as error:
        log.warning("could not compare the final parameters of the members: %s", error)
        return None
    return all(int(d) == int(mine) for d in everyone)


class _Loop:
    def __init__(self, model, optimizer, dataset, loss_fn, sampler, strategy: Strategy,
                 context: Context, kills, slowdowns, saver: AsyncSaver | None, checkpoint_every: int):
        self.model, self.optimizer, self.dataset, self.loss_fn = model, optimizer, dataset, loss_fn
        self.sampler, self.strategy, self.context, self.kills = sampler, strategy, context, kills
        self.slowdown = max((s.factor for s in slowdowns if s.rank == context.worker_id), default=1.0)
        self.position = 0
        """Committed steps: the data position."""
        self.next_step = 0
        """The next step to run: ahead of ``position`` inside an uncommitted round."""
        self._pending: list[tuple[int, float, int]] = []
        """(step, loss share, generation) of the tentative steps of the current round."""
        self._committed_state: dict | torch.Tensor | None = None
        """Round-based strategies: a copy of everything at the last commit, to return to."""
        self.fresh = True
        self.heals: list[HealReport] = []
        self.saver, self.checkpoint_every = saver, checkpoint_every
        self.total_steps = 0
        self.resumed_from: int | None = None
        self._resume_path: str | None = None
        self.preemption = _PreemptionNotice()
        self._checkpoint_group = None
        """zero with background saves: the generation's process group for DCP's writing."""
        self._failed_in = START
        """Where the generation broke: in a step's own work (``STEP``), or elsewhere."""
        self._sent_at_commit: int | None = None
        """What the strategy had sent at this generation's last commit (or its setup)."""
        self._start_bytes: int | None = None
        """This generation's estimate of what its start sent at most (``_estimate_start_bytes``)."""

    def resume(self, found: tuple[Checkpoint, dict]) -> None:
        """Start from a checkpoint: as if this worker had committed its step (the heal then
        finds every member equal, or brings a member without it up to date). A sharded
        checkpoint is loaded once the generation's shards exist."""
        checkpoint, state = found
        self.resumed_from = checkpoint.step
        log.info("resuming from %s (step %d)", checkpoint.path, checkpoint.step)
        if self.strategy.sharded:
            self._resume_path = str(checkpoint.path)
            return
        self._restore(state)
        self.fresh = False

    def run(self, total_steps: int) -> None:
        self.total_steps = total_steps
        failures, last_failure = 0, None
        while True:
            try:
                self._run_generation(total_steps)
                if self.saver is not None:
                    self.saver.wait()
                return
            except GenerationMoved:
                pass
            except JobStopped:
                self._leave()
                raise
            except RuntimeError as error:
                if self.preemption.received:  # the peers are stopping too: no new generation
                    self._leave()
                    self._stop_for_preemption()
                # A peer died or the group broke mid-collective: report it (which also proves
                # this worker is alive) and let the coordinator form the next generation.
                # (a longer timeout is a new try: the coordinator lengthens one after a
                # collective among live members ran out of time)
                key = (self.position, tuple(self.context.members), self.context.collective_timeout,
                       self.context.step_timeout)
                failures = failures + 1 if key == last_failure else 1
                last_failure = key
                if failures >= _MAX_FAILURES_WITHOUT_PROGRESS:
                    self._leave()
                    raise
                self.context.report_failure(f"{type(error).__name__}: {error}", self._failed_in)
                log.debug("generation %d broke at step %d: %s", self.context.generation,
                          self.position, error)
            # Only here, with the failed frames released, can the old group really close: a
            # live reference (say, to the DDP wrapper) would keep its sockets open and leave
            # peers waiting in a collective until it times out.
            self._leave()

    def _run_generation(self, total_steps: int) -> None:
        self._failed_in = START
        self.context.enter_next_generation()
        if self.strategy.sharded:
            self.strategy.generation = self.context.generation
            module = self.strategy.setup(self._host_key())
            self._restore_shards()
        else:
            missed = list(self._pending)
            self._return_to_commit()
            self._heal()
            self._commit_missed(missed)
            module = self.strategy.setup(self._host_key())
        if not self.strategy.commits_every_step:
            self._committed_state = copy.deepcopy(self._capture(local=True))
        self._sent_at_commit, self._start_bytes = self.strategy.bytes_off_host, None
        self.context.start_rounds = 0.0  # this generation's link and members are not measured yet
        if self.strategy.drives_steps:
            run_async(self, module, total_steps)
            return
        while self.next_step < total_steps:
            if self.preemption.received:
                self._stop_for_preemption()
            self.context.check_generation()
            self._step(module, total_steps)

    def _stop_for_preemption(self) -> None:
        """Save the last committed state (the leader) and stop this worker. (Under zero a save
        takes every member at the same step, which a signal cannot promise: the last periodic
        checkpoint stands.)"""
        self._return_to_commit()
        if self.saver is not None and self.context.rank == 0 and not self.strategy.sharded:
            if self.saver.last_saved_step != self.position:
                self.saver.save(self.position, self._capture())
            self.saver.wait()
        raise Preempted(f"worker {self.context.worker_id} stopped by SIGTERM at step {self.position}")

    def _return_to_commit(self) -> None:
        """Undo whatever the broken generation did after the last commit (async's server
        keeps its own state: see ``keep_served_state``)."""
        self.strategy.rollback()
        if self.strategy.drives_steps and keep_served_state(self):
            self._pending.clear()
            return
        # A round broke (back to its start), or a strategy that drives its own steps may
        # have moved the state anywhere since its commit.
        moved = self.next_step != self.position or self.strategy.drives_steps
        if moved and self._committed_state is not None:
            state = self._committed_state
            if isinstance(state, torch.Tensor):  # kept serialised (async's server)
                state = deserialize(state)
            self._restore(state)
        self._pending.clear()

    def _restore_shards(self) -> None:
        """zero: this generation's shards of the committed state, rebuilt from the shards the
        members hold (``--zero-replicas`` >= 2), else from the newest checkpoint."""
        if self.strategy.replicated:
            try:
                # A new job's starting state (the same on every member) is its state at step
                # 0; a resumed job's is the checkpoint, which no member holds yet.
                holds = not (self.fresh and self._resume_path)
                restored = restore_from_members(
                    self.strategy, self.position if holds else FRESH, self._sharded_extras(),
                    lambda step: maybe_kill(self.context, step, self.kills, "heal"))
            except ShardsLost as lost:
                if self.context.rank == 0:
                    log.warning("zero: %s; going back to the newest checkpoint", lost)
            else:
                if restored is not None:
                    extras, report = restored
                    self._load_sharded_extras(extras)
                    self.heals.append(report)
                    return
        self._restart_from_checkpoint()

    def _restart_from_checkpoint(self) -> None:
        """zero: every member loads the newest checkpoint into this generation's shards (a
        shard that died has no other copy); a new job checkpoints its starting state."""
        from shoal.checkpoint.sharded import agreed_checkpoint, load_sharded

        checkpoint = agreed_checkpoint(self.saver.store if self.saver else None, also=self._resume_path)
        if checkpoint is None:
            if not self.fresh:  # this generation's module is uninitialised memory
                raise JobStopped("zero: no step of the state has a live copy of every shard and no "
                                 "checkpoint was written to go back to (give --checkpoint-dir)")
            self.fresh = False  # set first: a save that fails leaves nothing to restart from
            self.strategy.forget_held()
            if self.saver is not None:
                self._save_sharded(wait=True)  # what a crash before the next one goes back to
            return
        extras = load_sharded(checkpoint, self.strategy.model, self.strategy.optimizer)
        self.strategy.forget_held()
        self._load_sharded_extras(extras)

    def _sharded_extras(self) -> dict:
        """What every zero member holds whole: data position, strategy state and RNG."""
        return {"position": self.position, "strategy": self.strategy.state_dict(),
                "rng_cpu": torch.get_rng_state()}

    def _load_sharded_extras(self, extras: dict) -> None:
        self.fresh = False
        self.position = self.next_step = int(extras["position"])
        self.strategy.load_state_dict(extras["strategy"])
        torch.set_rng_state(extras["rng_cpu"])
        self._commit_missed(self._pending)
        self.context.committed_step = self.position - 1
        self._pending.clear()

    def _commit_missed(self, pending: list[tuple[int, float, int]]) -> None:
        """Report this member's share of the loss of steps it computed and did not commit,
        which the others did (the collective that decided them failed here alone): the state
        it now holds is past them, and their update had its gradient, so its share counts.

        Only from the generation just before this one: this one has run no step yet, so the
        others committed those steps in that generation, with this member. (A member that
        sat a generation out may be past them because it was redone without it.)"""
        for step, loss_part, generation in pending:
            if step < self.position and generation == self.context.generation - 1:
                self.context.record_commit(step, loss_part, generation=generation)

    def _save_sharded(self, *, wait: bool = False) -> None:
        """Collective: every member stages its shards (a copy) and the writing goes on in the
        background, coordinated on a process group of its own (DCP's async_save), unless
        ``wait`` or the saver writes in the foreground."""
        from shoal.checkpoint.sharded import save_sharded

        background = self.saver.background and not wait
        if background and self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(
                backend="gloo", timeout=timedelta(seconds=self.context.collective_timeout))
        position, extras = self.position, self._sharded_extras()
        group = self._checkpoint_group if background else None
        self.saver.save_staged(position, lambda: save_sharded(
            self.saver.store, position, self.strategy.model, self.strategy.optimizer, extras,
            self.saver.meta, group=group), log_failure=self.context.rank == 0)
        if wait:
            self.saver.wait()

    def _host_key(self) -> str:
        per_host = self.strategy.options.workers_per_host
        if per_host:
            return f"emulated-host-{self.context.worker_id // per_host}"
        return os.environ.get(ENV_LAUNCHER_ID) or socket.gethostname()

    def _leave(self) -> None:
        if self.saver is not None and self.strategy.sharded:
            # A sharded save of this generation, finished or failed before its groups close
            # (failed: a member is gone; the checkpoint before it stands).
            self.saver.settle()
        self._checkpoint_group = None
        self.strategy.teardown()
        self.context.leave_generation()

    def _heal(self) -> None:
        report = heal(FRESH if self.fresh else self.position, self._capture, self._restore,
                      lambda step: maybe_kill(self.context, step, self.kills, "heal"))
        if report is not None:
            self.heals.append(report)
        self.fresh = False

    def _capture(self, local: bool = False) -> dict:
        """The committed state: what a heal ships to a peer (``local`` adds this worker's own
        strategy state, which only a rollback restores)."""
        state = {
            "position": self.position,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "strategy": self.strategy.state_dict(),
            "rng_cpu": torch.get_rng_state(),
        }
        if local:
            state["strategy_local"] = self.strategy.local_state_dict()
        return state

    def _restore(self, state: dict) -> None:
        self.position = self.next_step = int(state["position"])
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.strategy.load_state_dict(state["strategy"])
        if "strategy_local" in state:
            self.strategy.load_local_state_dict(state["strategy_local"])
        torch.set_rng_state(state["rng_cpu"])
        self.context.committed_step = self.position - 1

    def _step(self, module: nn.Module, total_steps: int) -> None:
        step, context = self.next_step, self.context
        maybe_kill(context, step, self.kills)
        with self._step_timeout():
            committed = self._compute_and_apply(module, step, total_steps)
        context.bytes_sent = self.strategy.bytes_sent
        if committed:
            self._commit()

    def _compute_and_apply(self, module: nn.Module, step: int, total_steps: int) -> bool:
        """The step's own work, its collectives included; True when it committed."""
        context = self.context
        self.strategy.begin_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        global_indices = self.sampler.global_indices(step)
        global_size = len(global_indices)
        local = self.sampler.local_indices(step, context.rank, context.world_size)
        started = time.perf_counter()
        if len(local):
            total = self.loss_fn(module, fetch(self.dataset, local))
        else:
            # More members than samples left in the epoch: contribute zero gradients, through
            # the module's own forward all the same. DDP and FSDP prepare their collectives
            # there; a backward that skips it sends nothing, and the members' collectives
            # part ways (a timeout, a lost generation). One sample weighs nothing at x 0.
            total = self.loss_fn(module, fetch(self.dataset, global_indices[:1])) * 0.0
        self._straggle(time.perf_counter() - started)
        self.strategy.backward(total / self.strategy.loss_divisor(len(local), global_size))
        loss_part = total.item() / global_size
        self._pending.append((step, loss_part if math.isfinite(loss_part) else float("nan"),
                              context.generation))
        maybe_kill(context, step, self.kills, "commit")
        self.strategy.agree(step)
        maybe_kill(context, step, self.kills, "agreed")
        committed = self.strategy.step(step, last=step + 1 == total_steps)
        self.next_step = step + 1
        return committed

    @contextlib.contextmanager
    def _step_timeout(self):
        """A step's own collectives wait at most the step timeout, which the coordinator
        shrinks again once steps are quick (coordinator/timeouts.py); everything else (a heal,
        a checkpoint) the generation's collective timeout, set when it formed. A failure
        inside is reported as the step's, and lengthens the step timeout if it was one."""
        step_timeout = self.context.step_timeout
        if step_timeout:
            self.context.use_timeout(step_timeout, skip=(self._checkpoint_group,))
        try:
            yield
        except BaseException:
            self._failed_in = STEP  # the group is left as it is: it is about to be dropped
            raise
        if step_timeout:
            self.context.use_timeout(self.context.collective_timeout, skip=(self._checkpoint_group,))

    def _commit(self) -> None:
        # A round's steps are committed together, at one time: the coordinator measures the
        # time between commits (coordinator/timeouts.py), and a round is one interval.
        now = time.time()
        for step, loss_part, generation in self._pending:
            self.context.record_commit(step, loss_part, generation=generation, committed_at=now)
        self._pending.clear()
        self._measure_round()
        before, self.position = self.position, self.next_step
        if not self.strategy.commits_every_step:
            self._committed_state = copy.deepcopy(self._capture(local=True))
        if self.saver is not None and self._checkpoint_due(before):
            if self.strategy.sharded:  # every member writes its shards
                self._save_sharded()
            elif self.context.rank == 0:
                self.saver.save(self.position, self._capture())

    def _measure_round(self) -> None:
        """Tell the coordinator how many times the bytes this round sent a generation's start
        may make one member send: with the time between rounds, that bounds the collective
        timeout (coordinator/timeouts.py)."""
        sent, before = self.strategy.bytes_off_host, self._sent_at_commit
        self._sent_at_commit = sent
        if before is None or sent <= before or self.strategy.sharded:
            # A round that sent nothing off its host (one member, a hierarchical member not
            # its host's leader) measured no link; zero's starts and saves also read and
            # write checkpoints, which no link's rate bounds.
            self.context.start_rounds = 0.0
            return
        if self._start_bytes is None:  # once a generation, after a step (Adam's state is lazy)
            self._start_bytes = self._estimate_start_bytes()
        self.context.start_rounds = self._start_bytes / (sent - before)

    def _estimate_start_bytes(self) -> int:
        """At most what one member sends in a generation's start: a heal of the state (the
        parameters and buffers, the optimizer's state, and a strategy's own, taken for the
        parameters' size), then the strategy's first broadcast of parameters and buffers
        (DDP's). Each is a binomial broadcast (gloo's), whose source sends the whole once per
        doubling of the members, a newcomer counted (several at once take one doubling more
        per doubling of the members: the margin covers a few)."""
        held = self.strategy.state_bytes()
        buffers = sum(buffer.numel() * buffer.element_size() for buffer in self.strategy.model.buffers())
        whole = 3 * held["parameters"] + held["optimizer"] + 2 * buffers
        return whole * math.ceil(math.log2(self.context.world_size + 1))

    def _checkpoint_due(self, before: int) -> bool:
        """Did this commit cross a multiple of the interval (or finish the run)?"""
        every = self.checkpoint_every
        return self.position // every > before // every or self.position == self.total_steps

    def _straggle(self, forward_seconds: float) -> None:
        """``--slowdown``: stretch this step's compute (forward and backward, about three
        forwards) by the factor. Sleeping is the fault being emulated, not a wait."""
        if self.slowdown > 1:
            time.sleep((self.slowdown - 1) * 3 * forward_seconds)
