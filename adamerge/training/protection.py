"""The protected tasks of one learned merge at run time: each step's protected terms, the multipliers' dual
ascent, ``L_ref`` and the reports (what a protected task is and how it is scored: :mod:`adamerge.training.protected`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from adamerge.errors import ConfigError, NonFiniteError
from adamerge.methods.learned.merged import MergedModel, run_backbone
from adamerge.training.evaluation import entropy_mask
from adamerge.training.profiling import StepProfile
from adamerge.training.protected import START, STAGES, ProtectedTask, agreement_name, batch_rows, protected_terms, task_batch


class LearningModule(Protocol):
    """What protection reads of the learning module it serves (:class:`~adamerge.training.module.AdaMergingModule`)."""

    merged: MergedModel
    global_rank: int
    global_step: int
    profile: StepProfile

    def eval_weights(self) -> dict[str, Tensor]: ...

    def _autocast(self) -> contextlib.AbstractContextManager: ...

    def _backward(self, loss: Tensor) -> None: ...


class Protection(nn.Module):
    """The protected tasks of one learned merge: the step's protected terms, the multipliers, ``L_ref`` and reports.

    The sets stay on the CPU (batches move to the merge's device); heads and reference models are submodules, so
    they follow the learning module across devices. ``seed`` orders each task's stream of protected batches.
    """

    def __init__(self, tasks: Sequence[ProtectedTask], seed: int = 0, eval_batch_size: int = 64) -> None:
        super().__init__()
        names = [task.name for task in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"protected task names must be unique, got {names}")
        self.tasks = {task.name: task for task in tasks}
        self.heads = nn.ModuleDict({task.name: task.head for task in tasks}).requires_grad_(False)
        models = {task.name: task.reference for task in tasks if isinstance(task.reference, nn.Module)}
        self.references = nn.ModuleDict(models).requires_grad_(False)
        self.seed, self.eval_batch_size = int(seed), int(eval_batch_size)
        self.multipliers = {task.name: float(task.initial_multiplier) for task in tasks}
        self.reference_loss: dict[str, float] = {}
        self.scores: dict[str, dict[str, dict[str, float]]] = {}  # stage -> task -> scores
        self.last_losses: dict[str, float] = {}
        self.history: list[dict[str, dict[str, float]]] = []
        self._start_names: list[str] = []

    def train(self, mode: bool = True) -> Protection:
        return super().train(False)  # frozen heads and references are scored deterministically, like the merge

    # -- references --------------------------------------------------------------------------------------------------
    def attach(self, module: LearningModule) -> None:
        """Keep ``module``'s starting merge (its evaluation weights now, before learning) for KL tasks whose reference
        is ``start``: they need its logits at every step. (A cross-entropy task needs only ``L_ref``, measured on the
        merge before the first update, so no copy of the weights is kept for it.)"""
        if not any(task.reference == START and task.loss == "kl" for task in self.tasks.values()):
            return
        with torch.no_grad():
            weights = module.eval_weights()
        self._start_names = list(weights)
        for index, weight in enumerate(weights.values()):
            self.register_buffer(f"_start_{index}", weight.detach().clone(), persistent=False)

    def start_weights(self) -> dict[str, Tensor]:
        return {name: getattr(self, f"_start_{index}") for index, name in enumerate(self._start_names)}

    @torch.no_grad()
    def reference_logits(self, name: str, inputs: Any, merged: MergedModel | None) -> Tensor:
        if self.tasks[name].reference == START:
            if merged is None:
                raise ValueError(f"protected task {name!r}: its reference is the starting merge of a learned method")
            return self.heads[name](run_backbone(merged, inputs, self.start_weights()))
        return self.heads[name](run_backbone(self.references[name], inputs))

    def has_reference(self, name: str, merged: MergedModel | None) -> bool:
        return self.tasks[name].reference != START or merged is not None

    def ensure_reference_loss(self, module: LearningModule, start: Mapping[str, Tensor] | None = None) -> bool:
        """Measure ``L_ref`` (and the reference's scores) once, before the first update: the runner's first
        evaluation or the first step (a resumed run restores it from its checkpoint). ``start``: the starting
        merge's weights when the caller already has them. True when it measured them now."""
        if len(self.reference_loss) == len(self.tasks):
            return False
        merged = module.merged
        if start is None:
            with torch.no_grad():
                start = self.start_weights() if self._start_names else {
                    n: w.detach() for n, w in module.eval_weights().items()}

        def logits(name: str, inputs: Any) -> Tensor:
            if self.tasks[name].reference == START:
                return self.heads[name](run_backbone(merged, inputs, start))
            return self.reference_logits(name, inputs, merged)

        scores = self.evaluate(logits, merged.coefficients.device, merged)
        self.scores["reference"] = scores
        for name, task in self.tasks.items():
            self.reference_loss[name] = 0.0 if task.loss == "kl" else scores[name]["loss"]
        return True

    # -- the learning step -------------------------------------------------------------------------------------------
    def scale(self, name: str, loss: float) -> float:
        """The factor of the step's protected loss: β, or μ while the constraint is violated (0 otherwise)."""
        task = self.tasks[name]
        if task.mode == "penalty":
            return task.weight
        return self.multipliers[name] if loss - self.reference_loss[name] - task.budget > 0 else 0.0

    def accumulate(self, module: LearningModule, leaves: Mapping[str, Tensor]) -> None:
        """Forward and backward of every protected task's batch through the merge ``leaves`` (gradients accumulate in
        the leaves, next to the objective's). The losses are kept for the multipliers' update."""
        self.ensure_reference_loss(module)
        device = next(iter(leaves.values())).device
        seed = self.seed + 100_003 * module.global_rank  # DDP ranks draw different protected batches
        for index, (name, task) in enumerate(self.tasks.items()):
            rows = batch_rows(task.size, task.batch_size, module.global_step, seed + 7919 * index)
            inputs, labels = task_batch(task, rows, device)
            with module.profile.phase("forward"):
                with module._autocast():
                    logits = self.heads[name](run_backbone(module.merged, inputs, leaves))
                    reference = self.reference_logits(name, inputs, module.merged) if task.loss == "kl" else None
                total, count, _ = protected_terms(task.loss, logits, labels, reference, entropy_mask(inputs, logits),
                                                  task.kl_direction)
                loss = total / count.clamp_min(1.0)
                value = loss.item()
            if not math.isfinite(value):
                raise NonFiniteError(f"the {task.loss} loss of protected task {name!r} is {value} at step "
                                     f"{module.global_step}; stopping before it reaches the merge coefficients")
            scale = self.scale(name, value)
            if scale > 0:
                with module.profile.phase("backward"):
                    module._backward(scale * loss)
            self.last_losses[name] = value

    def update_multipliers(self) -> dict[str, dict[str, float]]:
        """Dual ascent after a step: ``μ ← max(0, μ + η (L − L_ref − ε))`` per constraint; returns the step's record."""
        record = {}
        for name, value in self.last_losses.items():
            task = self.tasks[name]
            if task.mode == "constraint":
                violation = value - self.reference_loss[name] - task.budget
                self.multipliers[name] = max(0.0, self.multipliers[name] + task.dual_lr * violation)
            record[name] = {"loss": value, "multiplier": self.multipliers[name]}
        self.last_losses = {}
        self.history.append(record)
        return record

    # -- evaluation --------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, logits: Callable[[str, Any], Tensor], device: torch.device, merged: MergedModel | None = None,
                 names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """Loss and accuracy / agreement of ``logits(task, inputs)`` over each whole protected set (of ``names``, by
        default all; a KL task whose reference is the starting merge needs ``merged``, else it is left out)."""
        out = {}
        for name, task in self.tasks.items():
            if (names is not None and name not in names) or (task.loss == "kl" and not self.has_reference(name, merged)):
                continue
            sums = torch.zeros(3, dtype=torch.float64)
            for start in range(0, task.size, self.eval_batch_size):
                inputs, labels = task_batch(task, range(start, min(start + self.eval_batch_size, task.size)), device)
                predicted = logits(name, inputs)
                reference = self.reference_logits(name, inputs, merged) if task.loss == "kl" else None
                terms = protected_terms(task.loss, predicted, labels, reference, entropy_mask(inputs, predicted),
                                        task.kl_direction)
                sums += torch.tensor([float(t) for t in terms], dtype=torch.float64)
            count = max(float(sums[1]), 1.0)
            out[name] = {"loss": float(sums[0]) / count, agreement_name(task.loss): float(sums[2]) / count}
            if task.refusal is not None:
                out[name].update(task.refusal.evaluate(lambda x, name=name: logits(name, x), device))
        return out

    def record(self, module: LearningModule, weights: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
        """Score the merge ``weights`` of ``module``: the first call is the starting merge (``start``, with the
        reference measured first), every later one the learned merge (``end``)."""
        merged = module.merged
        stage = "end" if "start" in self.scores else "start"
        measured = self.ensure_reference_loss(module, weights if stage == "start" else None)
        # A task whose reference is the starting merge was just scored on these very weights: not again.
        scored = self.scores["reference"] if measured else {}
        again = [name for name, task in self.tasks.items() if not (task.reference == START and name in scored)]
        device = next(iter(weights.values())).device
        scores = self.evaluate(lambda name, inputs: self.heads[name](run_backbone(merged, inputs, weights)),
                               device, merged, names=again)
        self.scores[stage] = {name: scores[name] if name in scores else dict(scored[name]) for name in self.tasks
                              if name in scores or name in scored}
        return self.scores[stage]

    def report(self) -> dict[str, dict[str, Any]]:
        """Per task: its settings, ``L_ref``, the scores of every stage measured, the final multiplier, whether the
        learned merge kept its budget, and the per-step loss and multiplier (results.json's ``protected``)."""
        out = {}
        for name, task in self.tasks.items():
            entry: dict[str, Any] = {**task.settings(), "reference_loss": self.reference_loss.get(name),
                                     "scores": {stage: self.scores[stage][name] for stage in STAGES
                                                if name in self.scores.get(stage, {})}}
            end = entry["scores"].get("end")
            if task.mode == "constraint" and end is not None and name in self.reference_loss:
                entry["excess_loss"] = end["loss"] - self.reference_loss[name]
                entry["within_budget"] = entry["excess_loss"] <= task.budget
                entry["multiplier"] = self.multipliers[name]
            entry["loss_history"] = [step[name]["loss"] for step in self.history if name in step]
            entry["multiplier_history"] = [step[name]["multiplier"] for step in self.history if name in step]
            out[name] = entry
        return out

    # -- resume ------------------------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {"multipliers": dict(self.multipliers), "reference_loss": dict(self.reference_loss),
                "scores": {stage: dict(scores) for stage, scores in self.scores.items()}, "history": list(self.history)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.multipliers, self.reference_loss = dict(state["multipliers"]), dict(state["reference_loss"])
        self.scores, self.history = dict(state["scores"]), list(state["history"])


def static_scores(tasks: Sequence[ProtectedTask], backbone: nn.Module, device: torch.device) -> dict[str, Any]:
    """The protected scores of a data-free merge ``backbone`` (and of the tasks' reference models): what a
    comparison shows next to the learned methods' reports."""
    protection = Protection(tasks).to(device)
    backbone = backbone.to(device).eval()
    merge = protection.evaluate(lambda name, inputs: protection.heads[name](run_backbone(backbone, inputs)), device)
    with_models = [task.name for task in tasks if task.reference != START]
    reference = protection.evaluate(lambda name, inputs: protection.reference_logits(name, inputs, None), device,
                                    names=with_models)
    return {name: {**task.settings(), "scores": {stage: scores[name] for stage, scores in
                                                 (("reference", reference), ("end", merge)) if name in scores}}
            for name, task in protection.tasks.items() if name in merge}
