"""JSON as onestep writes it everywhere (--json output, --out files, RUN/eval/*.json, stats.jsonl, samples.json): NaN
and infinities become null, since JSON has neither and strict readers (jq, JavaScript, Go) refuse Python's `NaN`.

This module is the lowest layer: it imports nothing from the package.
"""

from __future__ import annotations

import json
import math


def json_safe(value):
    """`value` with non-finite floats as None, numpy and 0-d torch scalars as Python numbers, tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if not isinstance(value, (str, bytes, int)) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return json_safe(value.item())  # numpy scalars (np.float32 is no float) and 0-d arrays or tensors.
    return value


def to_json(value, indent: int | None = None) -> str:
    """`value` as strict JSON text: non-finite numbers as null, anything else unknown (paths) as its string."""
    return json.dumps(json_safe(value), indent=indent, default=str, allow_nan=False)
