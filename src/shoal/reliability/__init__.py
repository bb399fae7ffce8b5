"""Reliability: the chaos suite that checks the promises under real faults."""

from shoal.reliability.chaos import ChaosSettings, plan_trials, run_chaos

__all__ = ["ChaosSettings", "plan_trials", "run_chaos"]
