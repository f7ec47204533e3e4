"""Scoring a merged model on each task's evaluation split: accuracy (labels) and the label-free scores."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from adamerge.module import batch_scores, run_backbone, to_device
from adamerge.objectives import Objective


@torch.no_grad()
def evaluate(
    backbone: nn.Module, heads: Mapping[str, nn.Module], datamodule: Any, tasks: list[str], device: torch.device,
    objective: Objective,
) -> dict[str, dict[str, float]]:
    """``backbone`` + each task's head on that task's evaluation split: accuracy (labels) and the label-free
    scores a sweep selects by (``unlabeled``: the objective and the prediction entropy, inputs only)."""
    backbone = backbone.to(device).eval()
    scores: dict[str, dict[str, float]] = {"accuracy": {}, "objective": {}, "entropy": {}}
    for task in tasks:
        head = heads[task].to(device).eval()
        correct = seen = batches = 0
        objective_sum = entropy_sum = 0.0
        for batch in datamodule.eval_dataloader(task):
            inputs = to_device(batch["inputs"], device)
            logits = head(run_backbone(backbone, inputs))
            batch_correct, batch_seen, batch_objective, batch_entropy = batch_scores(
                logits, batch["labels"].to(device), inputs, objective)
            correct, seen, batches = correct + batch_correct, seen + batch_seen, batches + 1
            objective_sum, entropy_sum = objective_sum + batch_objective, entropy_sum + batch_entropy
        scores["accuracy"][task] = correct / max(seen, 1)
        scores["objective"][task] = objective_sum / max(batches, 1)
        scores["entropy"][task] = entropy_sum / max(batches, 1)
    return {"accuracy": scores["accuracy"],
            "unlabeled": finite_scores({"objective": scores["objective"], "entropy": scores["entropy"]})}


def finite_scores(scores: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float | None]]:
    """A non-finite label-free score (a broken merge) is recorded as null: results.json stays strict JSON and
    the merge is never a label-free pick."""
    return {name: {task: (v if math.isfinite(v) else None) for task, v in values.items()} for name, values in scores.items()}
