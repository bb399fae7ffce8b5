"""What a run leaves behind: results.json and the sample log (written once, by the launcher)."""

from shoal.tracking.results import build_results, write_json, write_sample_log

__all__ = ["build_results", "write_json", "write_sample_log"]
