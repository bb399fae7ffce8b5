"""Launchers: start and supervise local workers (``shoal train``, ``shoal run``)."""

from shoal.launch.train_job import run_train

__all__ = ["run_train"]
