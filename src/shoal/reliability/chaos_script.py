"""The user's script of ``shoal chaos --launcher run``: a ``shoal.train`` script as users
write one, run by ``shoal run --coordinator`` on each node, and plainly (one process) for
the reference that every trial must equal (under async or compression, which no one
process's run equals, the reference is the script run undisturbed on the same hosts).

It trains the chaos task with the library API, the chosen strategy and compressor, and the
leader saves the final model. The environment says what to train, how, and where the model
goes (``SHOAL_CHAOS_*``); each step's compute may be stretched
(``SHOAL_CHAOS_STEP_SECONDS``, or longer while the file ``SHOAL_CHAOS_SLOW_WHILE`` exists:
the harness's workers are on their way back), so that a node's launcher started again has
steps left to join. The pause changes when steps happen, not what they compute.

``SHOAL_CHAOS_BALLAST`` adds that many parameters to a quadratic task's model, which every
sample's loss pulls to zero (``Ballasted``): quadratic's numerics with a payload big enough
to feel a slow link in every all-reduce and heal. They are saved and compared with the model.
"""

import faulthandler
import os
import signal
import time

import torch

import shoal
from shoal._io import atomic_write
from shoal.tasks import TASKS

ENV_TASK = "SHOAL_CHAOS_TASK"
ENV_STEPS = "SHOAL_CHAOS_STEPS"
ENV_BATCH = "SHOAL_CHAOS_BATCH"
ENV_SEED = "SHOAL_CHAOS_SEED"
ENV_STRATEGY = "SHOAL_CHAOS_STRATEGY"
ENV_COMPRESS = "SHOAL_CHAOS_COMPRESS"
ENV_MODEL = "SHOAL_CHAOS_MODEL"
ENV_STEP_SECONDS = "SHOAL_CHAOS_STEP_SECONDS"
ENV_SLOW_WHILE = "SHOAL_CHAOS_SLOW_WHILE"
ENV_SLOW_STEP_SECONDS = "SHOAL_CHAOS_SLOW_STEP_SECONDS"
ENV_BALLAST = "SHOAL_CHAOS_BALLAST"


class Ballasted(torch.nn.Module):
    """A quadratic task's model and ``size`` more parameters. The forward appends them to
    each sample's displacement, so the task's loss (half the sum of squares) gains
    ``0.5 * ||ballast||^2`` per sample: they go to zero, and every all-reduce carries them.
    They are used in the forward, where DDP and FSDP hook in."""

    def __init__(self, model: torch.nn.Module, size: int):
        super().__init__()
        self.model = model
        # random, not constant: a compressor (PowerSGD, say) must find it as hard as a gradient
        self.ballast = torch.nn.Parameter(torch.randn(size, generator=torch.Generator().manual_seed(size)))

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.model(points), self.ballast.expand(len(points), -1)], dim=1)

    @staticmethod
    def task_state(state: dict) -> dict:
        """The task model's part of a saved state dict (the ballast's left out)."""
        return {name.removeprefix("model."): value for name, value in state.items() if name != "ballast"}


def main() -> None:
    # A launcher slow to exit after the job ended has its workers' stacks read (SIGUSR1).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    seed = int(os.environ[ENV_SEED])
    torch.manual_seed(seed)
    task = TASKS[os.environ[ENV_TASK]](seed)
    model = task.build_model()
    ballast = int(os.environ.get(ENV_BALLAST, "0"))
    if ballast:
        model = Ballasted(model, ballast)
        torch.set_flush_denormal(True)  # long runs take the ballast that near zero: keep it fast
    optimizer = task.build_optimizer(model, task.defaults.lr)
    pause = float(os.environ.get(ENV_STEP_SECONDS, "0"))
    slow_while = os.environ.get(ENV_SLOW_WHILE)
    slow_pause = float(os.environ.get(ENV_SLOW_STEP_SECONDS, "0"))

    def loss_fn(model, batch):
        # stands for a heavier model's compute
        time.sleep(slow_pause if slow_while and os.path.exists(slow_while) else pause)
        return task.loss(model, batch)

    result = shoal.train(model, optimizer, task.train_dataset(), loss_fn,
                         global_batch_size=int(os.environ[ENV_BATCH]), steps=int(os.environ[ENV_STEPS]),
                         seed=seed, strategy=os.environ.get(ENV_STRATEGY, "allreduce"),
                         options=shoal.StrategyOptions(compress=os.environ.get(ENV_COMPRESS, "none")))
    if result.is_leader:  # result.model: under zero the whole model, gathered from the shards
        atomic_write(os.environ[ENV_MODEL], lambda f: torch.save(result.model.state_dict(), f))


if __name__ == "__main__":
    main()
