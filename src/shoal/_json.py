"""JSON has no NaN or infinity: a diverged run's losses travel and are written as null.

httpx refuses non-finite floats outright (``allow_nan=False``), and the standard library
writes ``NaN``, which strict readers (``jq``, browsers) reject.
"""

from __future__ import annotations

import math

__all__ = ["finite_or_null"]


def finite_or_null(value):
    """``value`` with every non-finite float, at any depth of dicts, lists and tuples, as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value
