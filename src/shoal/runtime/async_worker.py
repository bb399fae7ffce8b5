"""The worker's side of ``--strategy async``: ask for a unit, compute, push, repeat.

The loop (``runtime.trainer._Loop``) has formed the generation, returned to the last
commit and healed; this runs the generation's units until the server says the run is done
(then every member takes the server's final state) or the generation breaks (then the
loop's usual recovery takes over). See ``strategies.asyncsgd`` for the protocol and the
commit point.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from shoal.data import fetch
from shoal.runtime.faults import maybe_kill
from shoal.runtime.heal import FRESH, deserialize, heal, serialize
from shoal.strategies.asyncsgd import (DONE, SERVER, WAIT, Answer, AsyncSGD, ParameterServer,
                                      ServerLink, UnitBook)

__all__ = ["keep_served_state", "run_async"]


def run_async(loop, replica: nn.Module, total_steps: int) -> None:
    strategy: AsyncSGD = loop.strategy
    context = loop.context
    world = dist.get_world_size()
    store = context.generation_store
    if dist.get_rank() == SERVER:
        server = strategy.server = ParameterServer(
            strategy, total_steps * strategy.book.shares, context.generation,
            snapshot=lambda: _commit_on_server(loop, alone=world == 1),
            timeout=context.collective_timeout)
        store.set("shoal/parameter-server", server.start(context.reachable_host(), world - 1))
        # Start when every member has: the server's own worker would otherwise take the first
        # units alone (all of a short run's, on a loaded machine) while the others connect.
        # A member that never does is declared dead, and the generation moves on.
        while server.connected < world - 1:
            context.check_generation()
            time.sleep(0.01)
        ask = _LocalLink(server, context).exchange
    else:
        while not context.ask_store(store.check, ["shoal/parameter-server"]):  # unless the server is gone first
            context.check_generation()
            time.sleep(0.01)
        address = store.get("shoal/parameter-server").decode()
        strategy.link = ServerLink(strategy, address, timeout=context.collective_timeout)
        ask = strategy.link.exchange
    answer = ask(WAIT, 0, 0, 0.0, None)
    while answer.unit != DONE:
        context.check_generation()
        if answer.snapshot is not None:
            _adopt(loop, deserialize(answer.snapshot))
        if answer.unit == WAIT:
            answer = ask(WAIT, 0, 0, 0.0, None)
            continue
        samples, loss_part, gradient = _compute(loop, replica, answer)
        answer = ask(answer.unit, answer.version, samples, loss_part, gradient)
        context.bytes_sent = strategy.bytes_sent
    if strategy.server is not None:
        strategy.server.wait_finished()
    strategy.teardown()
    _finish(loop, total_steps)


class _LocalLink:
    """The worker in the server's own process: no messages, a condition to wait on."""

    def __init__(self, server: ParameterServer, context):
        self.server, self.context = server, context

    def exchange(self, unit, version, samples, loss_part, gradient) -> Answer:
        answer = self.server.exchange(unit, version, samples, loss_part, gradient,
                                      holder=False, may_defer=True)
        # as a remote worker's request waits in the server: a unit this worker pushed too
        # stale is left to the others for as long (ParameterServer.exchange)
        deadline = time.monotonic() + self.server.wait_limit
        while answer is None:
            with self.server.changed:
                self.server.changed.wait(0.05)
            self.context.check_generation()
            avoid = unit if time.monotonic() < deadline else WAIT
            answer = self.server.exchange(WAIT, 0, 0, 0.0, None, holder=False, may_defer=True,
                                          avoid=avoid)
        return answer


def _compute(loop, replica: nn.Module, answer: Answer) -> tuple[int, float, torch.Tensor]:
    """This unit's mean gradient at the server's parameters (and its share of the step's loss)."""
    step, share = divmod(answer.unit, answer.shares)
    maybe_kill(loop.context, step, loop.kills, reached=True)
    vector_to_parameters(answer.parameters, replica.parameters())
    replica.zero_grad(set_to_none=True)
    indices = loop.sampler.local_indices(step, share, answer.shares)
    started = time.perf_counter()
    if len(indices):
        total = loop.loss_fn(replica, fetch(loop.dataset, indices))
    else:
        total = sum(p.sum() for p in replica.parameters()) * 0.0
    loop._straggle(time.perf_counter() - started)
    (total / max(len(indices), 1)).backward()
    gradient = parameters_to_vector(
        p.grad if p.grad is not None else torch.zeros_like(p) for p in replica.parameters())
    return len(indices), total.item() / len(loop.sampler.global_indices(step)), gradient


def keep_served_state(loop) -> bool:
    """After a generation ended: if this process was its server and its state is whole, make
    that state its commit (True). It is newer than any snapshot, and the book says which
    units it holds, so the heal spreads it and only the units in flight are handed out
    again; a worker's death then costs no applied update."""
    strategy: AsyncSGD = loop.strategy
    served, strategy.served_intact = strategy.served_intact, False
    if not served:
        return False
    _commit_on_server(loop, alone=False)
    return True


def _commit_on_server(loop, alone: bool) -> torch.Tensor:
    """The server's snapshot: its committed state from now on, and the blob a holder adopts.
    Kept serialised: the blob is a copy already, and a restore is rare."""
    loop.position = loop.strategy.version
    blob = serialize(loop._capture())
    loop._committed_state = blob
    loop.strategy.committed_steps = loop.strategy.book.whole_steps
    # --kill R@S:commit on the server: once it has committed S, before any holder has it. (In
    # whichever thread applied the update: checked in its own worker's loop instead, it
    # never fired when the remote workers did the rest of the run, on a loaded machine.)
    maybe_kill(loop.context, loop.strategy.committed_steps, loop.kills, "commit", reached=True)
    if alone:  # no peer to hold it: this is as durable as the job gets
        _report_finished(loop, loop.strategy.book.ledger)
    return blob


def _adopt(loop, state: dict) -> None:
    """A holder keeps the server's snapshot as its committed state (loaded only if a
    generation breaks: ``_Loop._return_to_commit``) and reports the steps it finished."""
    loop._committed_state = state
    loop.position = int(state["position"])
    book = UnitBook()
    book.load_state_dict(state["strategy"]["book"])
    # --kill R@S:commit on a holder: holding a commit of S steps or more, before it reports them
    maybe_kill(loop.context, book.whole_steps, loop.kills, "commit", reached=True)
    _report_finished(loop, book.ledger)


def _report_finished(loop, ledger) -> None:
    strategy: AsyncSGD = loop.strategy
    for step, loss, generation, finished_at in ledger:
        if (step, generation) not in strategy.reported:  # a step redone later is news again
            loop.context.record_commit(step, loss, generation=generation, committed_at=finished_at,
                                       whole=True)
            strategy.reported.add((step, generation))


def _finish(loop, total_steps: int) -> None:
    """Every member takes the server's final state, and reports what it has not yet."""
    mine = loop.position if dist.get_rank() == SERVER else FRESH  # the server's is the final one
    report = heal(mine, loop._capture, loop._restore)
    if report is not None:
        loop.heals.append(report)
    _report_finished(loop, loop.strategy.book.ledger)
    loop.position = loop.next_step = total_steps
