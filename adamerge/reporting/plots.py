"""The figures of the HTML report (and the run's coefficients.png), rendered with matplotlib's Agg canvas.

Figures are built as bare ``matplotlib.figure.Figure`` objects rather than through pyplot: they never enter
pyplot's global registry (nothing to close, nothing leaks between calls) and the global backend is left alone.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_bytes(fig: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(fig)  # attaches itself as the figure's canvas
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def heatmap_figure(coefficients: Sequence, task_names: Sequence[str], title: str = "merge coefficients") -> Figure:
    """Layers × tasks heatmap of merge coefficients (a single row for task-wise coefficients)."""
    import numpy as np

    matrix = np.asarray(coefficients, dtype=float)
    matrix = matrix[None, :] if matrix.ndim == 1 else matrix
    height = min(2 + 0.06 * matrix.shape[0], 14)
    fig = Figure(figsize=(2 + 0.9 * matrix.shape[1], height))
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(task_names)), task_names, rotation=45, ha="right")
    ax.set_ylabel("layer (parameter tensor)" if matrix.shape[0] > 1 else "")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return fig


def accuracy_bars(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], title: str = "accuracy") -> bytes:
    """Grouped bars: one group per task plus the average, one bar per row (its ``method``)."""
    import numpy as np

    groups = [*tasks, "average"]
    width = 0.8 / max(len(rows), 1)
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) + 0.25 * len(rows)), 3.6))
    ax = fig.add_subplot()
    positions = np.arange(len(groups))
    for i, row in enumerate(rows):
        values = [100 * row["accuracy"][t] for t in tasks] + [100 * row["average_accuracy"]]
        ax.bar(positions + i * width, values, width, label=row["method"])
    ax.set_xticks(positions + 0.4 - width / 2, groups)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return png_bytes(fig)


def coefficient_heatmap_png(coefficients: Sequence, task_names: Sequence[str], title: str) -> bytes:
    return png_bytes(heatmap_figure(coefficients, task_names, title))


def learning_curves(objective: Sequence[float], entropy: Sequence[float], objective_name: str, title: str) -> bytes:
    """The training objective and the prediction entropy per step, side by side."""
    fig = Figure(figsize=(9, 3))
    for index, (values, label) in enumerate(((objective, f"objective ({objective_name})"), (entropy, "entropy"))):
        ax = fig.add_subplot(1, 2, index + 1)
        if values:
            ax.plot(range(1, len(values) + 1), values, marker="." if len(values) < 30 else None)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return png_bytes(fig)
