"""Results files, the comparison table and the coefficient heatmap."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULT_KEYS = ("method", "config", "tasks", "accuracy", "average_accuracy", "coefficients", "seconds", "peak_memory_mb")


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Strict JSON written atomically, so a crash never leaves a truncated results file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, allow_nan=False, default=str)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
    os.replace(tmp, path)
    return path


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk (what makes a rename durable after a crash)."""
    if path.is_dir() and not hasattr(os, "O_DIRECTORY"):
        return  # directories cannot be opened for fsync on Windows
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_marked_block(path: str | Path, name: str, block: str) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``path`` (generated docs)."""
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    path.write_text(head + start + "\n" + block + "\n" + end + rest.split(end, 1)[1])


def average(accuracy: Mapping[str, float]) -> float:
    return sum(accuracy.values()) / len(accuracy) if accuracy else math.nan


def format_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """Markdown table: one row per method, accuracy (%) per task and the average."""
    header = ["method", *tasks, "average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [f"{100 * row['accuracy'][t]:.1f}" for t in tasks]
        lines.append("| " + " | ".join([row["method"], *cells, f"{100 * row['average_accuracy']:.1f}"]) + " |")
    return "\n".join(lines)


def write_summary(run_dir: str | Path, rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    table = format_table(rows, tasks)
    summary_rows = [
        {"method": r["method"], "accuracy": dict(r["accuracy"]), "average_accuracy": r["average_accuracy"]}
        for r in rows
    ]
    write_json(Path(run_dir) / "summary.json", {"tasks": list(tasks), "rows": summary_rows})
    (Path(run_dir) / "summary.md").write_text(table + "\n")
    return table


def coefficient_heatmap(
    coefficients: Sequence, task_names: Sequence[str], path: str | Path, title: str = "merge coefficients"
) -> Path:
    """Layers × tasks heatmap (a single row for task-wise coefficients), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.asarray(coefficients, dtype=float)
    matrix = matrix[None, :] if matrix.ndim == 1 else matrix
    height = min(2 + 0.06 * matrix.shape[0], 14)
    fig, ax = plt.subplots(figsize=(2 + 0.9 * matrix.shape[1], height))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(task_names)), task_names, rotation=45, ha="right")
    ax.set_ylabel("layer (parameter tensor)" if matrix.shape[0] > 1 else "")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
