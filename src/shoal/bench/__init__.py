"""Benchmarks: runs made side by side in one invocation, reported as ratios."""
