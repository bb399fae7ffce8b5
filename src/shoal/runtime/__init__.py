"""Inside a worker: membership, process groups, healing and the elastic training loop."""

from shoal.runtime.context import Context, GenerationMoved, JobStopped
from shoal.runtime.heal import HealReport
from shoal.runtime.schedule import LRSchedule
from shoal.runtime.trainer import Preempted, TrainResult, train

__all__ = ["Context", "GenerationMoved", "HealReport", "JobStopped", "LRSchedule", "Preempted", "TrainResult", "train"]
