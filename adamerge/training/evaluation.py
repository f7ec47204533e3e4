"""Scoring a merged model on each task's evaluation split: accuracy (labels) and the label-free scores."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adamerge.data import EVALUATION
from adamerge.module import SCORE_COUNTS, batch_scores, run_backbone, to_device
from adamerge.objectives import Objective

if TYPE_CHECKING:
    from adamerge.expert_targets import ExpertTargets


@torch.no_grad()
def evaluate(
    backbone: nn.Module, heads: Mapping[str, nn.Module], datamodule: Any, tasks: list[str], device: torch.device,
    objective: Objective, experts: ExpertTargets | None = None,
) -> dict[str, dict[str, float]]:
    """``backbone`` + each task's head on that task's evaluation split: accuracy (labels) and the label-free
    scores a sweep selects by (``unlabeled``: the objective, the prediction entropy and, given the experts' outputs,
    the share of predictions that agree with each task's expert; inputs only)."""
    backbone = backbone.to(device).eval()
    scores: dict[str, dict[str, float]] = {"accuracy": {}, "objective": {}, "entropy": {}, "expert_agreement": {}}
    for task in tasks:
        head = heads[task].to(device).eval()
        totals = dict.fromkeys(SCORE_COUNTS, 0.0)
        batches = 0
        for batch in datamodule.eval_dataloader(task):
            inputs = to_device(batch["inputs"], device)
            output = run_backbone(backbone, inputs)
            expert = experts.lookup(task, EVALUATION, {**batch, "inputs": inputs}) if experts is not None else None
            batch_totals = batch_scores(head(output), batch["labels"].to(device), inputs, objective, output=output,
                                        expert=expert)
            totals = {name: totals[name] + batch_totals[name] for name in SCORE_COUNTS}
            batches += 1
        scores["accuracy"][task] = totals["correct"] / max(totals["seen"], 1)
        scores["objective"][task] = totals["objective"] / max(batches, 1)
        scores["entropy"][task] = totals["entropy"] / max(batches, 1)
        if totals["compared_to_expert"]:
            scores["expert_agreement"][task] = totals["agreed"] / totals["compared_to_expert"]
    unlabeled = {name: scores[name] for name in ("objective", "entropy", "expert_agreement") if scores[name]}
    return {"accuracy": scores["accuracy"], "unlabeled": finite_scores(unlabeled)}


def finite_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    """A non-finite label-free score (a broken merge) is recorded as null: results.json stays strict JSON and
    the merge is never a label-free pick."""
    return {name: {task: (v if math.isfinite(v) else None) for task, v in values.items()} for name, values in scores.items()}
