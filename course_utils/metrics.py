"""Recording measured numbers (accuracies, losses, timings) so the benchmark command can collect them."""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence

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


# --------------------------------------------------------------------------------------------------
# Intervals: every claimed gain comes with its number of items and a 95% interval
# --------------------------------------------------------------------------------------------------

def proportion_ci(successes: Sequence[bool] | int, n: int | None = None, *, z: float = 1.96) -> tuple[float, float, float]:
    """A success rate and its 95% Wilson score interval: (rate, low, high).

    Pass a list of booleans, or a count of successes and `n`. Wilson (not the normal approximation)
    stays inside [0, 1] and is honest at 0% or 100% on small sets.
    """
    if n is None:
        items = list(successes)  # type: ignore[arg-type]
        k, n = sum(bool(x) for x in items), len(items)
    else:
        k = int(successes)  # type: ignore[arg-type]
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(a: Sequence[float], b: Sequence[float], *, z: float = 1.96) -> tuple[float, float, float]:
    """Mean of a - b over paired items (e.g. after right, before right) and its 95% interval: (mean, low, high).

    Pairing (the same held-out items scored twice) removes the item-difficulty noise two separate
    intervals would carry. Normal approximation on the per-item differences; when every value is 0 or 1
    (pass/fail) the difference lies in [-1, 1], and so does the interval. (When every item changes the same
    way the interval has zero width: read it with its n.)
    """
    pairs = list(zip(a, b, strict=True))
    d = [float(x) - float(y) for x, y in pairs]
    n = len(d)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(n - 1, 1))
    half = z * sd / math.sqrt(n)
    if all(float(v) in (0.0, 1.0) for pair in pairs for v in pair):
        return mean, max(-1.0, mean - half), min(1.0, mean + half)
    return mean, mean - half, mean + half


def mean_ci(values: Sequence[float], *, z: float = 1.96) -> tuple[float, float, float]:
    """Mean of per-item (or per-seed) values and its 95% interval (normal approximation): (mean, low, high)."""
    return paired_difference(values, [0.0] * len(values), z=z)


def format_ci(value: tuple[float, float, float], n: int, *, percent: bool = True) -> str:
    """'62.0% [55.1, 68.4] (n=200)': a rate or gain with its interval and item count, for prose and tables."""
    m, lo, hi = value
    if percent:
        return f"{100 * m:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={n})"
    return f"{m:.4g} [{lo:.4g}, {hi:.4g}] (n={n})"
