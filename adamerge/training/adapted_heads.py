"""Adapted heads (``heads: adapt``): each task's head re-learned on pseudo-labels from its expert's confident predictions.

By default (``heads: frozen``) every task keeps the frozen head of its fine-tuned model while the merge learns. With
``heads: adapt`` the merged model gets a copy of each task's head that learns too (the pool's heads are never
modified). Its labels are pseudo-labels, never the data's labels:

- the pseudo-label of an unlabeled input is the arg-max of the task expert's logits on it, kept only where the
  expert's softmax probability of it is at least ``confidence_threshold`` (:mod:`adamerge.training.heads_config`);
- the head's loss is the cross-entropy of the merged model's logits through the adapted head against the kept
  pseudo-labels. It trains the head only: the backbone's output is detached, so the merge coefficients go on learning
  from the method's own objective, unchanged;
- a task none of whose inputs is kept is warned about and its head stays as it was.

The settings, the pseudo-label rule, which heads can adapt (and what of them learns) and what the records say are
:mod:`adamerge.training.heads_config`.

``schedule`` says when the heads learn:

- ``after`` (default): the merge learns with the frozen heads; once it has finished, the merged backbone's outputs on
  each task's adaptation inputs are computed once (the final evaluation merge) and the head takes ``head_steps`` Adam
  steps (``head_lr``) on them, one cached batch per step. This is the same whatever the learned method does in its own
  steps;
- ``together``: every learning step is also a step of the heads: before the method's own step, the current evaluation
  merge runs (no gradient) on the step's batch of each task and one Adam step (``head_lr``) on the heads follows. It
  is a separate Adam with the same per-parameter update a parameter group of the method's optimizer would make: the
  learned methods do not share one optimizer (Concrete AdaMerging has three, progressive distillation resets its own
  per block, and it never runs a head), so a separate one is what composes with all of them. It costs one extra forward
  per task per step (no backward through the backbone).

Relation to SyMerge (Jung et al., ICML 2026; github.com/AIM-SKKU/SyMerge), whose idea this follows: like SyMerge,
the supervision is the expert's arg-max on the unlabeled inputs and what re-learns is the task's classification layer
(for CLIP, the zero-shot head's class weights), trained jointly with the merge (our ``together``). Where this differs:
SyMerge has no fixed threshold -- it keeps an input when the expert and the merged model agree, or when the expert is
at least as confident as the merged model -- where this keeps inputs by a fixed threshold on the expert's confidence,
which does not move while the head learns; SyMerge minimises that one cross-entropy for the coefficients and the head
together (one Adam, lr 1e-2), where here the coefficients keep the method's own objective and the cross-entropy trains
the heads only; SyMerge's zero-shot head also gets a bias, where ours keeps the export's zero-shot head form (no bias);
``after`` (heads fitted on the finished merge) is not in SyMerge.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.data.batches import ADAPTATION, to_device
from adamerge.errors import ConfigError, NonFiniteError
from adamerge.methods.learned.merged import run_backbone
from adamerge.training.evaluation import IGNORE_INDEX, entropy_mask
from adamerge.training.heads_config import (
    HeadSettings, adaptable_copy, head_settings, learnable_parameters, learning, pseudo_label_loss, pseudo_labels,
)

log = logging.getLogger(__name__)


class AdaptedHeads:
    """Each task's adapted head for one learned module; see the module docstring. Built by :func:`attach`."""

    def __init__(self, settings: HeadSettings, originals: Mapping[str, nn.Module], tasks: Sequence[str],
                 datamodule: Any = None) -> None:
        self.settings, self.tasks, self.datamodule = settings, list(tasks), datamodule
        self.originals = {task: originals[task] for task in self.tasks}  # the pool's: read, never changed
        self.heads = {task: adaptable_copy(task, originals[task]) for task in self.tasks}
        self.kept: dict[str, dict[str, int]] = {}  # per task: pseudo-labels kept, predictions counted
        self.losses: dict[str, dict[str, float | None]] = {}
        self.loss_history: dict[str, list[float]] = {task: [] for task in self.tasks}
        self.optimizer: torch.optim.Optimizer | None = None  # schedule=together: one Adam over every head

    # -- what the module calls --------------------------------------------------------------------------------
    def setup(self, module: Any) -> None:
        """At the start of learning: count each task's confident pseudo-labels (warn where there are none)."""
        self._check_experts(module)
        if not self.kept:
            self.kept = {task: self._count_kept(module, task) for task in self.tasks}
        for task, counts in self.kept.items():
            if counts["kept"] == 0:
                log.warning("heads: adapt: none of task %r's %d adaptation inputs has an expert confidence >= %s; its "
                            "head stays as it was (lower heads.confidence_threshold to adapt it)", task,
                            counts["inputs"], self.settings.confidence_threshold)

    def step(self, module: Any, batch: Mapping[str, Mapping[str, Any]]) -> None:
        """schedule=together: one Adam step of the heads on this learning step's batches, through the current merge."""
        if self.settings.schedule != "together":
            return
        module.profile.seconds.setdefault("heads", 0.0)  # the step profile's own phases do not include it
        with module.profile.phase("heads"):
            self._together_step(module, batch)

    def _together_step(self, module: Any, batch: Mapping[str, Mapping[str, Any]]) -> None:
        optimizer = self._optimizer()
        optimizer.zero_grad(set_to_none=True)
        weights = _frozen_weights(module)
        for task in self.tasks:
            if self.kept and self.kept[task]["kept"] == 0:
                continue
            task_batch = batch[task]
            expert = module.expert_outputs(task, task_batch, ADAPTATION)
            if expert is None:
                raise ConfigError("heads.schedule=together reads each batch's expert predictions by the row index its "
                                  "batches carry (a MultiTaskDataModule's do); this batch of task "
                                  f"{task!r} has no 'index'")
            output, labels = self._outputs_and_labels(module, task_batch["inputs"], expert.logits, weights)
            if not (labels != IGNORE_INDEX).any():
                continue
            with learning(self.heads[task]):  # backward inside: a parameter frozen again gets no gradient
                with module._autocast():
                    loss = pseudo_label_loss(self.heads[task](output), labels)
                _check_finite(loss, task, f" at step {module.global_step}")
                loss.backward()
            self.loss_history[task].append(loss.item())
            module.log(f"train/head_loss/{task}", loss.item(), batch_size=1)
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:  # the heads are outside DDP's gradient averaging
            for parameter in optimizer.param_groups[0]["params"]:  # every rank takes part, with or without a grad
                grad = parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
                parameter.grad = trainer.strategy.reduce(grad, reduce_op="mean")
        optimizer.step()

    def finish(self, module: Any) -> None:
        """At the end of learning: schedule=after fits the heads now; both measure the pseudo-label loss of the
        original and the adapted head on the final merge's outputs."""
        self._check_experts(module)
        weights = _frozen_weights(module)
        with torch.enable_grad():
            for task in self.tasks:
                batches = self._cached_outputs(module, task, weights)
                original = copy.deepcopy(self.originals[task]).to(module.device)  # the pool's own stays where it is
                self.losses[task] = {"loss_frozen": _mean_loss(original, batches, module)}
                if self.settings.schedule == "after" and batches:
                    self._fit(module, task, batches)
                self.losses[task]["loss_adapted"] = _mean_loss(self.heads[task], batches, module)
                del batches

    # -- reporting, resume --------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        """results.json's ``head_adaptation``: the settings, and per task the kept share and the losses."""
        tasks = {}
        for task in self.tasks:
            counts = self.kept.get(task, {"kept": 0, "inputs": 0})
            tasks[task] = {"kept_share": counts["kept"] / max(counts["inputs"], 1), **counts,
                           "adapted": counts["kept"] > 0, **self.losses.get(task, {})}
        return {**self.settings.config(), "tasks": tasks, "loss_history": {t: list(v) for t, v in self.loss_history.items()}}

    def state(self) -> dict[str, Any]:
        return {"heads": {task: {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
                          for task, head in self.heads.items()},
                "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
                "kept": dict(self.kept), "loss_history": {t: list(v) for t, v in self.loss_history.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        for task, head in self.heads.items():
            head.load_state_dict(state["heads"][task])
        if state.get("optimizer") is not None:
            self._optimizer().load_state_dict(state["optimizer"])
        self.kept = dict(state["kept"])
        self.loss_history = {t: list(v) for t, v in state["loss_history"].items()}

    # -- internals ------------------------------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.optimizer is None:
            parameters = [p for task in self.tasks for p in learnable_parameters(self.heads[task])]
            self.optimizer = torch.optim.Adam(parameters, lr=self.settings.head_lr)
        return self.optimizer

    def _check_experts(self, module: Any) -> None:
        if module.expert_targets is None or "logits" not in module.expert_targets.needs:
            raise ConfigError("heads.mode=adapt learns each head on its expert's predictions, but the module has no "
                              "experts' logits: build it with build_learned_module(..., datamodule=...) or call "
                              "module.use_experts(ExpertTargets(...)) (the runner does)")

    def _splits(self, module: Any) -> Any:
        source = self.datamodule if self.datamodule is not None else getattr(getattr(module, "_trainer", None),
                                                                               "datamodule", None)
        if source is None or not hasattr(source, "split_batches"):
            raise ConfigError("heads.mode=adapt reads each task's adaptation inputs from the datamodule (split_batches): "
                              "fit with trainer.fit(module, datamodule=...) or pass datamodule= to build_learned_module")
        return source

    def _batches(self, module: Any, task: str, batch_size: int | None = None) -> Iterator[tuple[Any, Tensor]]:
        """The inputs of every adaptation batch of ``task`` with its expert's logits on them (cached once per row)."""
        for batch in self._splits(module).split_batches(task, ADAPTATION, batch_size):
            expert = module.expert_targets.lookup(task, ADAPTATION, batch)
            yield batch["inputs"], expert.logits

    def _count_kept(self, module: Any, task: str) -> dict[str, int]:
        kept = inputs = 0
        for batch_inputs, logits in self._batches(module, task):
            mask = entropy_mask(batch_inputs, logits)
            _, keep = pseudo_labels(logits, self.settings.confidence_threshold, mask)
            kept += int(keep.sum())
            inputs += int(mask.sum()) if mask is not None else int(keep.numel())
        return {"kept": kept, "inputs": inputs}

    def _outputs_and_labels(self, module: Any, inputs: Any, expert_logits: Tensor,
                            weights: Mapping[str, Tensor]) -> tuple[Any, Tensor]:
        """The merged backbone's output (no gradient) and the kept pseudo-labels, on the module's device."""
        inputs = to_device(inputs, module.device)
        with torch.no_grad(), module._autocast():
            output = run_backbone(module.merged, inputs, weights)
        labels, _ = pseudo_labels(expert_logits.to(module.device), self.settings.confidence_threshold,
                                  entropy_mask(inputs, expert_logits))
        return output, labels

    def _cached_outputs(self, module: Any, task: str, weights: Mapping[str, Tensor]) -> list[tuple[Any, Tensor]]:
        """The final merge's outputs on every adaptation batch of ``task`` that has a kept pseudo-label."""
        cached = []
        for inputs, logits in self._batches(module, task, self.settings.batch_size):
            output, labels = self._outputs_and_labels(module, inputs, logits, weights)
            if (labels != IGNORE_INDEX).any():
                cached.append((output, labels))
        return cached

    def _fit(self, module: Any, task: str, batches: list[tuple[Any, Tensor]]) -> None:
        """schedule=after: ``head_steps`` Adam steps on the cached batches, each pass over them in a seeded order."""
        head = self.heads[task]
        optimizer = torch.optim.Adam(learnable_parameters(head), lr=self.settings.head_lr)
        generator = torch.Generator().manual_seed(self.tasks.index(task))
        order: list[int] = []
        with learning(head):
            for _ in range(self.settings.head_steps):
                if not order:
                    order = torch.randperm(len(batches), generator=generator).tolist()
                output, labels = batches[order.pop()]
                optimizer.zero_grad(set_to_none=True)
                with module._autocast():
                    loss = pseudo_label_loss(head(output), labels)
                _check_finite(loss, task, f" at head step {len(self.loss_history[task])}")
                loss.backward()
                optimizer.step()
                self.loss_history[task].append(loss.item())


def _check_finite(loss: Tensor, task: str, where: str) -> None:
    if not math.isfinite(loss.item()):  # before backward: a NaN must never reach the head
        raise NonFiniteError(f"heads: the pseudo-label loss of task {task!r} is {loss.item()}{where}; stopping before "
                             "it reaches the head")


def _frozen_weights(module: Any) -> dict[str, Tensor]:
    """The module's evaluation merge, without a graph: what its validation and export use."""
    with torch.no_grad():
        return {name: weight.detach() for name, weight in module.eval_weights().items()}


@torch.no_grad()
def _mean_loss(head: nn.Module, batches: Sequence[tuple[Any, Tensor]], module: Any) -> float | None:
    """The pseudo-label cross-entropy of ``head`` over every kept pseudo-label of ``batches`` (None: none kept)."""
    total = count = 0.0
    for output, labels in batches:
        with module._autocast():
            total += float(pseudo_label_loss(head(output), labels, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    return total / count if count else None


def attach(module: Any, heads: Any = None, datamodule: Any = None) -> AdaptedHeads | None:
    """Give ``module`` adapted heads per ``heads`` (see :func:`head_settings`); nothing (None) for frozen heads.

    The module's heads become per-task copies that learn; ``module.heads`` had the pool's, which are not changed.
    ``datamodule``: where each task's adaptation inputs are read (default: the trainer's datamodule)."""
    settings = head_settings(heads)
    if not settings.adapt:
        return None
    adapted = AdaptedHeads(settings, module.heads, module.task_names, datamodule)
    module.heads = nn.ModuleDict(adapted.heads)
    module.adapted_heads = adapted
    return adapted
