"""How a merge is scored: each batch, a data-free merge over every task's evaluation split, and a learned merge at
every validation of its LightningModule.

Accuracy needs labels; the label-free scores do not: the objective on the evaluation inputs, the mean prediction
entropy, the share of predictions that agree with each task's expert (given the experts' outputs) and, for a learned
merge, the share of predictions that changed since its first evaluation (the runner's, before learning).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from adamerge.data.batches import EVALUATION, to_device
from adamerge.methods.learned.merged import run_backbone
from adamerge.objectives import Entropy, ExpertOutputs, Objective, prediction_entropy
from adamerge.objectives.expert_targets import feature_tensor

if TYPE_CHECKING:
    from adamerge.objectives.expert_targets import ExpertTargets

Batch = Mapping[str, Any]

IGNORE_INDEX = -100  # the Hugging Face convention for positions without a target


def count_correct(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """Correct arg-max predictions and the number of labels counted (``-100`` entries skipped)."""
    valid = labels != IGNORE_INDEX
    return int(((logits.argmax(-1) == labels) & valid).sum()), int(valid.sum())


def entropy_mask(inputs: Any, logits: Tensor) -> Tensor | None:
    """Padding mask for per-token logits (causal LMs); ``None`` for one prediction per example."""
    if logits.ndim == 3 and isinstance(inputs, Mapping) and "attention_mask" in inputs:
        return inputs["attention_mask"]
    return None


def valid_predictions(logits: Tensor, mask: Tensor | None) -> Tensor:
    """Arg-max predictions at the valid positions (all examples, or the unpadded tokens), flat, on CPU."""
    return chosen(logits.argmax(-1), mask)


def chosen(predictions: Tensor, mask: Tensor | None) -> Tensor:
    """Predictions (arg-max indices) at the valid positions, flat, on CPU."""
    if mask is not None:
        predictions = predictions[mask.bool()]
    return predictions.flatten().to("cpu", torch.int32)


def is_plain_entropy(objective: Objective) -> bool:
    """Whether the objective's value is the mean prediction entropy itself (no second pass needed for it)."""
    return type(objective) is Entropy and not objective.normalize


SCORE_COUNTS = ("correct", "seen", "objective", "entropy", "agreed", "compared_to_expert")


def batch_scores(logits: Tensor, labels: Tensor, inputs: Any, objective: Objective, *, output: Any = None,
                 expert: ExpertOutputs | None = None) -> dict[str, float]:
    """One evaluation batch: correct predictions, labels counted, the label-free scores that runs and sweeps are
    compared by without labels (the objective and the mean prediction entropy) and, given the task expert's logits,
    the predictions that agree with the expert's (arg-max) and how many were compared (``SCORE_COUNTS``)."""
    correct, seen = count_correct(logits, labels)
    mask = entropy_mask(inputs, logits)
    features = feature_tensor(output) if output is not None and "features" in objective.needs else None
    value = float(objective(logits, mask, features=features, expert=expert))
    entropy = value if is_plain_entropy(objective) else float(prediction_entropy(logits, mask))
    agreed = compared = 0
    if expert is not None and (expert.logits is not None or expert.predictions is not None):
        merged_predictions = valid_predictions(logits, mask)
        expert_predictions = (valid_predictions(expert.logits.to(logits.device), mask) if expert.logits is not None
                              else chosen(expert.predictions.to(logits.device), mask))
        agreed, compared = int((merged_predictions == expert_predictions).sum()), merged_predictions.numel()
    return {"correct": correct, "seen": seen, "objective": value, "entropy": entropy, "agreed": agreed,
            "compared_to_expert": compared}


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


class ValidationHooks:
    """The validation (and test) hooks of :class:`~adamerge.training.module.AdaMergingModule`: every evaluation
    scores each task's evaluation split with the merge of :meth:`eval_weights` and appends the per-task scores to
    ``evaluations``; the first one is the reference the label-free report compares the last one with."""

    _COUNTS = (*SCORE_COUNTS, "batches", "changed", "compared")

    def on_validation_epoch_start(self) -> None:
        with torch.no_grad():  # None: each module merges itself in the forward (the merge is never whole)
            self._eval_weights = (None if self.merges_per_module
                                  else {n: w.detach() for n, w in self.eval_weights().items()})
        self._totals = {task: [0.0] * len(self._COUNTS) for task in self.task_names}
        self._predictions = {}

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        task = self.task_names[dataloader_idx]
        with torch.no_grad(), self._autocast():
            output, logits = self.task_outputs(task, batch["inputs"], self._eval_weights)
        scores = batch_scores(logits, batch["labels"], batch["inputs"], self.objective, output=output,
                              expert=self.expert_outputs(task, batch, EVALUATION))
        predictions = valid_predictions(logits, entropy_mask(batch["inputs"], logits))
        # The label-free signals: the objective on the evaluation inputs, and predictions that moved since
        # the first evaluation (the runner's, before learning). Labels are not used for either.
        changed = compared = 0
        if self._first_predictions is not None and (task, batch_idx) in self._first_predictions:
            before = self._first_predictions[task, batch_idx]
            changed, compared = int((before != predictions).sum()), predictions.numel()
        self._predictions[task, batch_idx] = predictions
        totals = self._totals[task]
        for index, value in enumerate((*(scores[name] for name in SCORE_COUNTS), 1, changed, compared)):
            totals[index] += value

    def on_validation_epoch_end(self) -> None:
        counts = torch.tensor([self._totals[t] for t in self.task_names], dtype=torch.float64)
        if self.trainer.world_size > 1:  # each rank saw its shard of the evaluation split
            counts = self.trainer.strategy.reduce(counts.to(self.device), reduce_op="sum").cpu()
        weights, self._eval_weights = self._eval_weights, None
        if self.trainer.sanity_checking:
            return
        if self.protection is not None:  # the first evaluation scores the starting merge, later ones the learned one
            for task, scores in self.protection.record(self, weights).items():
                for key, value in scores.items():
                    self.log(f"val/protected/{task}/{key}", value, add_dataloader_idx=False)
        columns = {name: counts[:, i].tolist() for i, name in enumerate(self._COUNTS)}
        evaluation: dict[str, dict[str, float]] = {"accuracy": {}, "objective": {}, "entropy": {}, "prediction_changed": {},
                                                   "expert_agreement": {}}
        for i, task in enumerate(self.task_names):
            if columns["compared_to_expert"][i]:  # label-free: the share of predictions equal to the task expert's
                evaluation["expert_agreement"][task] = columns["agreed"][i] / columns["compared_to_expert"][i]
            evaluation["accuracy"][task] = columns["correct"][i] / max(columns["seen"][i], 1)
            evaluation["objective"][task] = columns["objective"][i] / max(columns["batches"][i], 1)
            evaluation["entropy"][task] = columns["entropy"][i] / max(columns["batches"][i], 1)
            if self._first_predictions is not None:
                evaluation["prediction_changed"][task] = columns["changed"][i] / max(columns["compared"][i], 1)
        if self._first_predictions is None:
            self._first_predictions = self._predictions
        self._predictions = {}
        self.evaluations.append(evaluation)
        self.last_accuracy = evaluation["accuracy"]
        for task, value in self.last_accuracy.items():
            self.log(f"val/accuracy/{task}", value, add_dataloader_idx=False)
        self.log("val/average_accuracy", sum(self.last_accuracy.values()) / len(self.last_accuracy),
                 add_dataloader_idx=False, prog_bar=True)

    def label_free_report(self) -> dict[str, dict[str, float]]:
        """Per task: the objective on its evaluation inputs at the first and last evaluation, and the
        fraction of predictions the learning changed -- what a user can judge a merge by without labels."""
        if len(self.evaluations) < 2:
            return {}
        first, last = self.evaluations[0], self.evaluations[-1]
        report = {
            task: {
                "objective_start": first["objective"][task],
                "objective_end": last["objective"][task],
                "prediction_changed": last["prediction_changed"][task],
            }
            for task in self.task_names
        }
        for task in self.task_names:  # agreement with the task's expert, where the experts' outputs were given
            if task in last.get("expert_agreement", {}):
                report[task]["expert_agreement_start"] = first["expert_agreement"][task]
                report[task]["expert_agreement_end"] = last["expert_agreement"][task]
        return report

    on_test_epoch_start = on_validation_epoch_start
    test_step = validation_step
    on_test_epoch_end = on_validation_epoch_end
