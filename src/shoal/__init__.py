"""shoal: elastic, fault-tolerant data-parallel training for PyTorch.

The library API is one call: :func:`train` runs an ordinary model, optimizer, dataset and
loss function on every worker of the job and keeps going when workers die.
"""

from shoal._protocol import VERSION as __version__  # noqa: F401  (the package's version)
from shoal.checkpoint import CheckpointError, Checkpointing
from shoal.compression import COMPRESSORS, Compressor
from shoal.config import ConfigError, KillSpec, Slowdown, StrategyOptions, TrainConfig
from shoal.runtime import Context, HealReport, JobStopped, LRSchedule, Preempted, TrainResult, train
from shoal.strategies import STRATEGIES, Strategy
from shoal.tasks import TASKS, Task

__all__ = [
    "COMPRESSORS",
    "STRATEGIES",
    "TASKS",
    "CheckpointError",
    "Checkpointing",
    "Compressor",
    "ConfigError",
    "Context",
    "HealReport",
    "JobStopped",
    "KillSpec",
    "LRSchedule",
    "Preempted",
    "Slowdown",
    "Strategy",
    "StrategyOptions",
    "Task",
    "TrainConfig",
    "TrainResult",
    "train",
]
