"""shoal: elastic, fault-tolerant data-parallel training for PyTorch.

The library API is one call: :func:`train` runs an ordinary model, optimizer, dataset and
loss function on every worker of the job and keeps going when workers die.
"""

from shoal.config import ConfigError, KillSpec, TrainConfig
from shoal.runtime import Context, HealReport, JobStopped, TrainResult, train
from shoal.strategies import STRATEGIES, Strategy
from shoal.tasks import TASKS, Task

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "TASKS",
    "ConfigError",
    "Context",
    "HealReport",
    "JobStopped",
    "KillSpec",
    "Strategy",
    "Task",
    "TrainConfig",
    "TrainResult",
    "train",
]
