"""Recording measured numbers (accuracies, losses, timings) so the benchmark command can collect them."""
from __future__ import annotations

import json
import os
import time

from .runtime import get_profile


def record(name: str, value: float, *, unit: str = "", show: bool = True) -> float:
    """Print a measured number and, under `course bench`, append it to `COURSE_METRICS_FILE`.

    Notebooks quote only numbers that went through here, so every number in the prose has a run behind it.
    """
    if show:
        print(f"{name} = {value:.4g}{(' ' + unit) if unit else ''}  (profile {get_profile()})")
    path = os.environ.get("COURSE_METRICS_FILE")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": float(value), "unit": unit, "time": time.time()}) + "\n")
    return value
