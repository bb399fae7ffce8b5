"""Built-in tasks, by name: the workloads of ``shoal train``, the tests and the benchmarks."""

from shoal.tasks.ackley import AckleyTask
from shoal.tasks.api import Task, TaskDefaults
from shoal.tasks.charlm import CharLMTask
from shoal.tasks.digits import DigitsTask
from shoal.tasks.quadratic import QuadraticSGDTask, QuadraticTask

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (QuadraticTask, QuadraticSGDTask, AckleyTask, DigitsTask, CharLMTask)
}

__all__ = ["TASKS", "Task", "TaskDefaults"]
