"""Results files, the comparison table and the coefficient heatmap."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from adamerge.errors import ConfigError
from adamerge.storage.atomic import write_atomic

RESULT_KEYS = ("method", "config", "tasks", "accuracy", "average_accuracy", "coefficients", "seconds", "peak_memory_mb")


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Strict JSON written atomically, so a crash never leaves a truncated results file."""
    return write_atomic(path, json.dumps(payload, indent=2, allow_nan=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    """A results file's content; a ConfigError naming the file when it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} cannot be read as JSON ({error})") from error


def read_run_results(run_dir: Path) -> list[dict[str, Any]]:
    """A run's results.json files: its own (one method), or its methods' (a comparison, in the order of its
    summary.json, then any method without a summary row, e.g. of an interrupted comparison)."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return [read_json(run_dir / "results.json")]
    order = []
    if (run_dir / "summary.json").is_file():
        order = [row["method"] for row in read_json(run_dir / "summary.json")["rows"]]
    files = {p.parent.name: p for p in run_dir.glob("*/results.json")}
    names = [n for n in order if n in files] + sorted(n for n in files if n not in order)
    return [read_json(files[name]) for name in names]


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


def expert_agreement(row: Mapping[str, Any]) -> float | None:
    """Task mean of a method's label-free agreement with each task's expert (None where it was not measured)."""
    values = [v for v in ((row.get("unlabeled") or {}).get("expert_agreement") or {}).values() if v is not None]
    return sum(values) / len(values) if values else None


def format_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    """Markdown table: one row per method, accuracy (%) per task and the average, and the label-free agreement with
    each task's expert (task mean, %) where the rows measured it."""
    agreement = any(expert_agreement(row) is not None for row in rows)
    header = ["method", *tasks, "average", *(["expert agreement"] if agreement else [])]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        cells = [f"{100 * row['accuracy'][t]:.1f}" for t in tasks] + [f"{100 * row['average_accuracy']:.1f}"]
        if agreement:
            value = expert_agreement(row)
            cells.append("" if value is None else f"{100 * value:.1f}")
        lines.append("| " + " | ".join([row["method"], *cells]) + " |")
    return "\n".join(lines)


PROTECTED_STAGES = ("reference", "start", "end")
PROTECTED_SCORES = ("loss", "accuracy", "agreement", "refusal_rate", "guard_safe_rate")


def _stages(scores: Mapping[str, Mapping[str, float]], key: str, percent: bool) -> str:
    values = [(stage, scores[stage][key]) for stage in PROTECTED_STAGES if key in scores.get(stage, {})]
    return " / ".join(f"{stage} {100 * v:.1f}%" if percent else f"{stage} {v:.4f}" for stage, v in values)


def protected_lines(report: Mapping[str, Mapping[str, Any]] | None) -> list[str]:
    """One line per protected task of a method's results: its scores at every stage measured (the reference
    model, the starting merge, the merge) and, under a budget, whether the merge kept it."""
    lines = []
    for task, entry in (report or {}).items():
        how = f"β={entry['weight']}" if entry["mode"] == "penalty" else f"ε={entry['budget']}"
        scores = entry["scores"]
        parts = [f"{key} {_stages(scores, key, key != 'loss')}" for key in PROTECTED_SCORES
                 if any(key in scores.get(stage, {}) for stage in PROTECTED_STAGES)]
        if "within_budget" in entry:
            parts.append(f"loss − L_ref {entry['excess_loss']:+.4f} "
                         f"{'within' if entry['within_budget'] else 'OVER'} budget (μ {entry['multiplier']:.3g})")
        lines.append(f"protected {task} ({entry['loss']}, {entry['mode']} {how}, reference {entry['reference']}): "
                     + "; ".join(parts))
    return lines


def format_protected_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of every method's protected tasks (empty when no method has one)."""
    body = [f"| {row['method']} | {line.removeprefix('protected ')} |"
            for row in rows for line in protected_lines(row.get("protected"))]
    if not body:
        return ""
    return "\n".join(["| method | protected task: scores (reference / start / end) |", "|---|---|", *body])


def write_summary(run_dir: str | Path, rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> str:
    table = format_table(rows, tasks)
    protected = format_protected_table(rows)
    if protected:
        table += "\n\nProtected tasks:\n\n" + protected
    summary_rows = [
        {"method": r["method"], "accuracy": dict(r["accuracy"]), "average_accuracy": r["average_accuracy"],
         **({"expert_agreement": (r.get("unlabeled") or {}).get("expert_agreement")} if expert_agreement(r) is not None else {}),
         **({"protected": r["protected"]} if r.get("protected") else {})}
        for r in rows
    ]
    write_json(Path(run_dir) / "summary.json", {"tasks": list(tasks), "rows": summary_rows})
    write_atomic(Path(run_dir) / "summary.md", table + "\n")
    return table


def coefficient_heatmap(
    coefficients: Sequence, task_names: Sequence[str], path: str | Path, title: str = "merge coefficients"
) -> Path:
    """Layers × tasks heatmap (a single row for task-wise coefficients), saved as PNG."""
    from adamerge.reporting.plots import coefficient_heatmap_png

    path = Path(path)
    write_atomic(path, coefficient_heatmap_png(coefficients, task_names, title))
    return path
