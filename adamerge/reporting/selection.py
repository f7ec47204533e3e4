"""Label-free model selection: which merged model of a sweep (or of a job's methods) to keep, without labels.

A test-time method promises not to use the test labels, so picking a sweep's best job by test accuracy would
tune on exactly what it promised not to see. The criteria here read only each run's scores on the *unlabeled*
evaluation inputs (``results.json["unlabeled"]``): the objective the methods minimise, the prediction
entropy, and the share of inputs on which the merged model agrees with each task's own fine-tuned model (its expert). A sweep summary shows the label-free pick next to the job test accuracy would have picked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from adamerge.errors import ConfigError

# Not one merged model but K fine-tuned ones (each task with its own backbone): the upper bound a merge is
# measured against, never a candidate to deploy as "the" merged model.
NOT_A_MERGE = ("individual",)


@dataclass(frozen=True)
class Criterion:
    name: str
    description: str
    score: Callable[[Mapping[str, Any]], float | None]  # of a summary row; lower is better
    comparable: Callable[[Sequence[Mapping[str, Any]]], str | None]  # why rows can't be compared, else None


def _mean(values: Mapping[str, float] | None) -> float | None:
    if not values:
        return None
    mean = sum(values.values()) / len(values)
    return mean if math.isfinite(mean) else None


def unlabeled_means(result: Mapping[str, Any]) -> dict[str, float | None]:
    """Task-mean objective, prediction entropy and expert agreement of one method's results.json (its ``unlabeled``
    scores; agreement None where the run did not measure it)."""
    unlabeled = result.get("unlabeled") or {}
    return {"objective": _mean(unlabeled.get("objective")), "entropy": _mean(unlabeled.get("entropy")),
            "expert_agreement": _mean(unlabeled.get("expert_agreement"))}


def _same_objective(rows: Sequence[Mapping[str, Any]]) -> str | None:
    configs = {repr(sorted((row.get("objective_config") or {}).items())) for row in rows}
    if len(configs) > 1:
        return ("the jobs measure different objectives, whose values do not compare; "
                "select by selection=entropy (the same quantity for every job)")
    return None


CRITERIA: dict[str, Criterion] = {
    "objective": Criterion(
        "objective",
        "lowest final objective on the unlabeled evaluation inputs (task mean)",
        lambda row: row.get("objective"),
        _same_objective,
    ),
    "entropy": Criterion(
        "entropy",
        "lowest mean prediction entropy on the unlabeled evaluation inputs (task mean)",
        lambda row: row.get("entropy"),
        lambda rows: None,
    ),
    # Agreeing with the task's expert is what "keep each fine-tuned model's accuracy" asks, measurable without labels.
    "expert_agreement": Criterion(
        "expert_agreement",
        "highest share of unlabeled evaluation inputs on which the merge predicts what each task's expert predicts (task mean)",
        lambda row: None if row.get("expert_agreement") is None else 1.0 - row["expert_agreement"],
        lambda rows: None,
    ),
}


def get_criterion(name: str) -> Criterion:
    if name not in CRITERIA:
        raise ConfigError(f"unknown selection criterion selection.name={name!r}; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]


def candidates(rows: Sequence[Mapping[str, Any]], score: Callable[[Mapping[str, Any]], float | None]) -> list[int]:
    """Indices of the rows a pick may choose: finished merges with a ``score``."""
    return [i for i, row in enumerate(rows)
            if row.get("status", "ok") == "ok" and row.get("method") not in NOT_A_MERGE and score(row) is not None]


def pick(rows: Sequence[Mapping[str, Any]], criterion: Criterion) -> tuple[int | None, str | None]:
    """The row with the lowest criterion score (ties: the earlier row), and a note when there is none."""
    indices = candidates(rows, criterion.score)
    if not indices:
        return None, "no finished merge has a label-free score"
    reason = criterion.comparable([rows[i] for i in indices])
    if reason:
        return None, reason
    return min(indices, key=lambda i: criterion.score(rows[i])), None


def pick_by_accuracy(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """What peeking at the test labels would choose: the highest average accuracy among the same candidates."""
    indices = candidates(rows, lambda row: row.get("average_accuracy"))
    return max(indices, key=lambda i: rows[i]["average_accuracy"]) if indices else None
