"""How a learning step's objective reaches the merged weights: each task's forward, loss and backward.

The passes of :class:`~adamerge.training.module.AdaMergingModule`'s step 2 (see its docstring): ``sequential`` runs
one task at a time, so only that task's activations are alive; ``joint`` runs every task's batch through the backbone
at once and splits the output per head (:mod:`adamerge.training.task_batching` decides, or ``auto`` measures). Each
pass checks its objective is finite before any backward, so a NaN never reaches what trains.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from adamerge.backbones.blocks import find_blocks
from adamerge.data.batches import ADAPTATION
from adamerge.errors import ConfigError, NonFiniteError
from adamerge.methods.learned.merged import run_backbone
from adamerge.objectives import prediction_entropy
from adamerge.objectives.expert_targets import feature_tensor
from adamerge.training import task_batching
from adamerge.training.evaluation import Batch, entropy_mask, is_plain_entropy

__all__ = ["TaskPasses"]


class TaskPasses:
    """The per-task passes of a learning step, mixed into :class:`~adamerge.training.module.AdaMergingModule`: the
    merged backbone's outputs and each task's logits, the task's objective, and its backward -- one task at a time or
    all tasks joined (``set_task_batching``), keeping each block's activations or recomputing them
    (``set_activation_checkpointing``)."""

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.autocast_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, self.autocast_dtype))

    def task_logits(self, task: str, inputs: Any, weights: Mapping[str, Tensor] | None) -> Tensor:
        return self.task_outputs(task, inputs, weights)[1]

    def task_outputs(self, task: str, inputs: Any, weights: Mapping[str, Tensor] | None) -> tuple[Any, Tensor]:
        """The merged backbone's output (the head's input: features for feature matching) and the task's logits."""
        output = run_backbone(self.merged, inputs, weights)
        return output, self.heads[task](output)

    def _backward(self, loss: Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)
        else:
            loss.backward()

    def _task_loss(self, task: str, batch: Batch, output: Any, logits: Tensor) -> tuple[Tensor, float]:
        """The task's objective (checked finite before any backward) and its prediction entropy, logged."""
        inputs = batch["inputs"]
        mask = entropy_mask(inputs, logits)
        needs = self.objective.needs
        expert = self.expert_outputs(task, batch, ADAPTATION) if needs else None
        features = feature_tensor(output) if "features" in needs else None
        loss = self.objective(logits, mask, features=features, expert=expert)
        value = loss.item()
        if not math.isfinite(value):  # before backward: a NaN must never reach the coefficients
            raise NonFiniteError(
                f"the {self.objective.name} objective is {value} on task {task!r} at step "
                f"{self.global_step}; stopping before it reaches the merge coefficients"
            )
        if is_plain_entropy(self.objective):
            self.last_step_entropy[task] = value  # the objective is the entropy: no second pass
        else:
            with torch.no_grad():
                self.last_step_entropy[task] = prediction_entropy(logits, mask).item()
        return loss, value

    def _task_pass(self, task: str, batch: Batch, leaves: Mapping[str, Tensor]) -> float:
        with self.profile.phase("forward"):
            with self._autocast():
                output, logits = self.task_outputs(task, batch["inputs"], leaves)
            loss, value = self._task_loss(task, batch, output, logits)
        with self.profile.phase("backward"):
            self._backward(loss)
        return value

    def _joint_pass(self, batch: Mapping[str, Batch], leaves: Mapping[str, Tensor]) -> dict[str, float]:
        """All tasks' batches through the backbone at once, split per head, one backward of the summed objective."""
        inputs = [batch[task]["inputs"] for task in self.task_names]
        sizes = [task_batching.batch_size(x) for x in inputs]
        with self.profile.phase("forward"):
            with self._autocast():
                features = run_backbone(self.merged, task_batching.concatenate(inputs, self.task_names), leaves)
                per_task = task_batching.split(features, sizes, [task_batching.token_length(x) for x in inputs])
                logits = [self.heads[task](part) for task, part in zip(self.task_names, per_task)]
            objectives, total = {}, None
            for task, output, task_logits in zip(self.task_names, per_task, logits):
                loss, objectives[task] = self._task_loss(task, batch[task], output, task_logits)
                total = loss if total is None else total + loss
        with self.profile.phase("backward"):
            self._backward(total)
        return objectives

    def set_task_batching(self, mode: str) -> None:
        """``sequential`` / ``joint`` / ``auto`` (see :mod:`adamerge.training.task_batching`); joint is refused for a
        backbone whose examples would interact."""
        self.task_batching = task_batching.check_mode(mode, self.merged.module)
        self._resolved_batching: str | None = None if mode == "auto" else mode

    @property
    def task_batching_used(self) -> str:
        """The mode the steps ran with (``auto`` until its first step decided)."""
        return self._resolved_batching or self.task_batching

    def resolved_task_batching(self, batch: Mapping[str, Batch], leaves: Mapping[str, Tensor]) -> str:
        """``sequential`` / ``joint``; ``auto`` is decided once, on the first step (see task_batching.choose)."""
        if self._resolved_batching is None:
            self._resolved_batching = task_batching.choose(self, batch, leaves)
        return self._resolved_batching

    def set_activation_checkpointing(self, setting: bool | str) -> None:
        """Recompute each of the backbone's blocks in the backward instead of keeping its activations: one block's
        activations alive instead of all of them, for one more forward per step. ``setting``: False, True (the blocks
        :func:`~adamerge.backbones.blocks.find_blocks` picks) or the path of the module list of blocks. Only a merge
        made module by module can do it (the recomputation merges again); refused otherwise."""
        if setting is False:
            self.merged.checkpoint_blocks = None
            return
        if not self.merges_per_module:
            raise ConfigError(
                "activation_checkpointing=true needs a merge made module by module (a streamed pool, "
                "modelpool.streaming=disk or host, or a pool of LoRA adapters, without protected tasks): a merge "
                "formed whole up front would be gone when the backward recomputes a block")
        path = "auto" if setting is True else setting
        _, blocks = find_blocks(self.merged.module, path, setting="activation_checkpointing")
        self.merged.checkpoint_blocks = tuple(blocks)
