"""One PNG per swept parameter: average test accuracy and the label-free score against its values."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _as_number(value: str | None) -> float | None:
    try:
        number = float(value) if value is not None else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def log_spaced(numbers: Sequence[float]) -> bool:
    """Whether swept values read best on a log axis: all positive, spanning a decade or more, and spread more
    evenly on a log scale than on a linear one (step sizes 1e-4, 3e-4, 1e-3, ... but not 1, 2, ..., 10)."""
    values = sorted(set(numbers))
    if len(values) < 2 or values[0] <= 0 or values[-1] / values[0] < 10:
        return False
    return _unevenness([math.log(v) for v in values]) <= _unevenness(values)


def is_step_size(key: str) -> bool:
    """Whether a swept override names a step size (``method.lr``, ``method.mask_lr``, ...): always a log axis."""
    name = key.rsplit(".", 1)[-1].lower()
    return name == "lr" or name.endswith("_lr")


def log_axis(key: str, numbers: Sequence[float]) -> bool:
    """A log x axis for a swept step size with positive values, or for values that are log-spaced (``log_spaced``)."""
    if numbers and min(numbers) > 0 and is_step_size(key):
        return True
    return log_spaced(numbers)


def _unevenness(values: Sequence[float]) -> float:
    """The widest gap between neighbouring sorted values over the narrowest (1: evenly spaced)."""
    gaps = [b - a for a, b in zip(values, values[1:])]
    return max(gaps) / min(gaps)


def plot_swept_parameter(summary: Mapping[str, Any], key: str, path: str | Path) -> Path | None:
    """Two panels over the values of ``key``: average accuracy (top) and the selection score (bottom), one
    series per method, the label-free pick and the test-accuracy pick circled. ``None`` when no job finished."""
    from matplotlib.figure import Figure

    from adamerge.storage.atomic import write_atomic
    from adamerge.reporting.plots import png_bytes

    rows = [(i, row) for i, row in enumerate(summary["rows"]) if row["status"] == "ok" and key in row["overrides"]]
    if not rows:
        return None
    criterion = summary["selection"]["criterion"]
    values = [row["overrides"][key] for _, row in rows]
    numbers = [_as_number(v) for v in values]
    numeric = all(n is not None for n in numbers)
    if numeric:
        positions = dict(zip(values, numbers))
    else:  # categorical values (method names, objectives, ...) at evenly spaced positions, in first-seen order
        positions = {value: float(i) for i, value in enumerate(dict.fromkeys(values))}

    fig = Figure(figsize=(6.5, 6))
    top, bottom = fig.subplots(2, 1, sharex=True)
    for method in dict.fromkeys(row["method"] for _, row in rows):
        series = sorted(((positions[row["overrides"][key]], row) for _, row in rows if row["method"] == method),
                        key=lambda point: point[0])
        xs = [x for x, _ in series]
        top.plot(xs, [100 * (r["average_accuracy"] or math.nan) for _, r in series], "o-", label=method)
        bottom.plot(xs, [math.nan if r.get(criterion) is None else r[criterion] for _, r in series], "o-", label=method)
    selection = summary["selection"]
    for index, style, label in ((selection["accuracy_pick"], "s", "test-accuracy pick"),
                                (selection["label_free_pick"], "*", "label-free pick")):
        if index is None or key not in summary["rows"][index]["overrides"]:
            continue
        row = summary["rows"][index]
        x = positions[row["overrides"][key]]
        top.plot([x], [100 * row["average_accuracy"]], style, markersize=16, mfc="none", mec="k", label=label)
        if row.get(criterion) is not None:
            bottom.plot([x], [row[criterion]], style, markersize=16, mfc="none", mec="k")
    top.set_ylabel("average accuracy (%)")
    bottom.set_ylabel(f"label-free {criterion}\n(unlabeled inputs, lower = picked)")
    bottom.set_xlabel(key)
    if numeric and log_axis(key, numbers):
        bottom.set_xscale("log")  # shared with the top panel
    if not numeric:
        bottom.set_xticks(list(positions.values()), list(positions), rotation=30, ha="right")
    top.legend(fontsize=7, markerscale=0.5)
    top.set_title(f"sweep over {key}")
    fig.tight_layout()
    return write_atomic(path, png_bytes(fig))
