"""The AdaMerging learning step as a LightningModule.

Only the merge coefficients (and, for Concrete methods, mask logits) train. One step:

1. merge once: ``θ(λ)`` for every merged tensor (graph to λ kept);
2. detach ``θ`` into leaf tensors and run forward + backward one task at a time, so only one task's
   activations are alive and ``dL/dθ`` accumulates in the leaves' ``.grad``;
3. one backward through the merge: ``dL/dλ = ⟨τ, dL/dθ⟩`` -- the merge graph is traversed once per
   step, not once per task.

Step 2's passes (sequential or joint, autocast, activation checkpointing) are
:class:`~adamerge.training.task_passes.TaskPasses`, its validation hooks (per-task scores, the label-free report)
:class:`~adamerge.training.evaluation.ValidationHooks` and its checkpoint hooks (what a resumed run needs)
:class:`~adamerge.training.resume.ResumableState`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from torch import Tensor, nn

from adamerge.errors import ConfigError, NonFiniteError
from adamerge.methods.learned.merged import MergedModel
from adamerge.objectives import Entropy, ExpertOutputs, Objective, ObjectiveError
from adamerge.training import sharding
from adamerge.training.evaluation import Batch, ValidationHooks
from adamerge.training.profiling import StepProfile
from adamerge.training.protection import Protection
from adamerge.training.resume import ResumableState, restore_rng
from adamerge.training.task_passes import TaskPasses

if TYPE_CHECKING:
    from adamerge.objectives.expert_targets import ExpertTargets
    from adamerge.training.adapted_heads import AdaptedHeads
    from adamerge.training.protected import ProtectedTask

__all__ = ["AdaMergingModule", "Batch", "NonFiniteError"]


class AdaMergingModule(TaskPasses, ValidationHooks, ResumableState, L.LightningModule):
    """Learns merge coefficients of ``merged`` by the summed per-task label-free ``objective``.

    ``heads[task]`` maps backbone outputs to that task's logits and stays frozen. Every evaluation also
    measures the objective on each task's evaluation inputs and the predictions; the first evaluation (the
    runner's, before learning) is the reference that later ones report prediction changes against.
    """

    def __init__(
        self,
        merged: MergedModel,
        heads: Mapping[str, nn.Module],
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        autocast_dtype: str | None = None,
        objective: Objective | None = None,
        task_batching_mode: str = "sequential",
    ) -> None:
        super().__init__()
        # Vectors merged without a task of their own (an alignment vector) have no head, data or objective.
        scored = [task for task in merged.task_names if task not in merged.unscored_tasks]
        missing = [task for task in scored if task not in heads]
        if missing:
            raise ValueError(f"no classification head for tasks {missing}; heads given for {sorted(heads)}")
        self.merged = merged
        self.heads = nn.ModuleDict({task: heads[task] for task in scored}).requires_grad_(False)
        self.lr = lr
        self.betas = tuple(betas)
        self.weight_decay = weight_decay
        self.autocast_dtype = autocast_dtype
        self.objective = objective if objective is not None else Entropy()
        self.automatic_optimization = False
        self.task_names = scored
        self.protection: Protection | None = None  # protected tasks' losses join every step; see protect()
        self.last_accuracy: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        # One entry per evaluation: per-task accuracy, objective and fraction of predictions changed.
        self.evaluations: list[dict[str, dict[str, float]]] = []
        self.last_step_entropy: dict[str, float] = {}
        self._eval_weights: dict[str, Tensor] | None = None
        self._first_predictions: dict[tuple[str, int], Tensor] | None = None
        self._predictions: dict[tuple[str, int], Tensor] = {}
        self._totals: dict[str, list[float]] = {}
        # Checkpoints hold only what learns (the frozen backbone and heads are rebuilt from the pool), so
        # loading one is not strict about the frozen keys; resumable_state_keys() checks the rest.
        self.strict_loading = False
        # "stop": a NaN/Inf objective or gradient ends the run with NonFiniteError; "skip": that step makes no
        # update (recorded in skipped_steps) and learning goes on.
        self.on_nonfinite = "stop"
        self.set_task_batching(task_batching_mode)
        self.skipped_steps: list[dict[str, Any]] = []
        self._rng_to_restore: dict[str, Any] | None = None
        # Each task's expert outputs on its inputs, for expert-matching objectives and agreement; see use_experts().
        self.expert_targets: ExpertTargets | None = None
        self.profile = StepProfile()
        self._last_step_end: float | None = None
        # heads: adapt (adamerge.training.adapted_heads.attach): the per-task head copies that learn; None: frozen heads.
        self.adapted_heads: AdaptedHeads | None = None

    def train(self, mode: bool = True) -> AdaMergingModule:
        """Keep the frozen backbone and heads in eval mode even while Lightning 'trains'.

        The entropy objective is defined on the deterministic model (BatchNorm running statistics,
        no dropout); train-mode BatchNorm would also overwrite the pretrained statistics.
        """
        super().train(mode)
        self.merged.module.eval()
        self.heads.eval()
        if self.protection is not None:
            self.protection.eval()
        return self

    def protect(self, tasks: Sequence[ProtectedTask], seed: int = 0, eval_batch_size: int = 64) -> Protection:
        """Add protected tasks (:mod:`adamerge.training.protected`): each step also lowers their losses (penalty) or keeps them
        within budget (constraint), and every evaluation scores them. Call before learning: the current merge is the
        ``start`` reference."""
        self.protection = Protection(tasks, seed=seed, eval_batch_size=eval_batch_size)
        self.protection.attach(self)
        return self.protection

    def use_experts(self, targets: ExpertTargets) -> None:
        """Read each task's expert outputs from ``targets``: expert-matching objectives need them, and with them every
        evaluation reports how often the merge agrees with each expert."""
        self.expert_targets = targets

    def check_experts(self) -> None:
        """An objective that compares with the experts cannot run without their outputs: say so before any step."""
        if self.objective.needs and (self.expert_targets is None or not set(self.objective.needs) <= set(self.expert_targets.needs)):
            raise ObjectiveError(f"objective {self.objective.name!r} needs each task's expert {sorted(self.objective.needs)}; "
                                 "call module.use_experts(ExpertTargets(...)) first (the runner does)")

    def expert_outputs(self, task: str, batch: Batch, split: int) -> ExpertOutputs | None:
        """The task's expert outputs on ``batch`` (None without expert targets or a row index)."""
        if self.expert_targets is None or "index" not in batch:
            return None
        return self.expert_targets.lookup(task, split, batch)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (:class:`~adamerge.training.sharding.ShardedMergeStrategy`) shard θ0 and the task
        vectors over the ranks with FSDP2; under any other strategy the merge stays as it was built."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if not isinstance(strategy, sharding.ShardedMergeStrategy):
            sharding.refuse_other_sharding(strategy)
            return
        method = getattr(self, "method_name", type(self).__name__)
        if type(self) is not AdaMergingModule:  # a subclass changes what is merged (masks, ranks, blocks in turn)
            raise ConfigError(sharding.method_refusal(method))
        if self.adapted_heads is not None:
            raise ConfigError(f"method {method!r}: {sharding.HEADS_REFUSAL}")
        sharding.shard_merged_model(self.merged, strategy, method)

    def on_fit_start(self) -> None:
        # Lightning 2.2+ keeps each submodule's mode as the caller left it (it never calls train() at fit start), so a
        # Python API user's train-mode backbone would learn with batch statistics and overwrite the pretrained ones.
        self.train()
        self.check_experts()
        if self.adapted_heads is not None:  # heads: adapt -- count each task's confident pseudo-labels
            self.adapted_heads.setup(self)

    def on_train_end(self) -> None:
        if self.adapted_heads is not None:  # heads: adapt -- schedule=after fits the heads now; both report losses
            self.adapted_heads.finish(self)

    # -- what trains ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.merged.coefficients]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        trainable = {id(p) for p in self.trainable_parameters()}
        extra = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in trainable]
        if extra:
            raise RuntimeError(f"only merge coefficients may train, but these require grad: {extra[:5]}")
        return torch.optim.Adam(self.trainable_parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    @property
    def merges_per_module(self) -> bool:
        """Whether steps and evaluations merge module by module (the merged model's ``merge_per_module``, which a
        streamed pool turns on): never with protected tasks, whose losses take the whole merge."""
        return bool(self.merged.merge_per_module) and self.protection is None

    def merged_weights(self) -> dict[str, Tensor]:
        """The merge used by the learning step; Concrete methods add their sampled mask here."""
        return self.merged.merged_weights()

    def eval_weights(self) -> dict[str, Tensor]:
        """The merge used for evaluation and export (Concrete methods choose their eval mask)."""
        return self.merged.merged_weights()

    def after_optimizer_step(self) -> None:
        self.merged.clamp_coefficients_()

    # -- the learning step (the per-task passes are TaskPasses') -------------------------------------
    def accumulate_gradients(self, batch: Mapping[str, Batch], weights: Mapping[str, Tensor] | None) -> dict[str, float]:
        """Steps 2 and 3 of the module docstring for one merge ``weights`` (graph to what trains).

        Returns the objective of every task's batch (their mean prediction entropies go to
        ``last_step_entropy``). ``task_batching`` decides how step 2 runs: ``sequential`` (one task's
        activations alive at a time) or ``joint`` (one forward + backward over all tasks' batches).
        """
        # Per-module merging (weights None): each module forms its merge in the pass, so the objective's backward
        # reaches the coefficients directly; otherwise the passes differentiate detached copies (leaves) of the merge.
        leaves = None if weights is None else {name: w.detach().requires_grad_(True) for name, w in weights.items()}
        self.last_step_entropy = {}
        if self.resolved_task_batching(batch, leaves) == "joint":
            objectives = self._joint_pass(batch, leaves)
        else:
            objectives = {task: self._task_pass(task, batch[task], leaves) for task in self.task_names}
        if self.protection is not None:  # its own batches and losses: protected data never enters the objective
            self.protection.accumulate(self, leaves)
        used = [name for name, leaf in (leaves or {}).items() if leaf.grad is not None]
        if used:
            with self.profile.phase("merge"):  # dL/dλ = <τ, dL/dθ>: the merge graph's backward
                torch.autograd.backward([weights[n] for n in used], [leaves[n].grad for n in used])
        if isinstance(self.merged, sharding.ShardedMergedModel):  # outside FSDP: averaged here, as DDP would
            sharding.average_gradients(self.trainable_parameters(), self.trainer.strategy)
        for parameter in self.trainable_parameters():
            if parameter.grad is not None and not torch.isfinite(parameter.grad).all():
                raise NonFiniteError(f"non-finite gradient of what trains at step {self.global_step} "
                                     f"(objectives {objectives}); stopping before the optimizer step")
        return objectives

    def training_step(self, batch: Mapping[str, Batch], batch_idx: int) -> Tensor | None:
        objectives = self.coefficient_step(batch, self.optimizers())
        return None if objectives is None else self.log_step(objectives)

    def coefficient_step(self, batch: Mapping[str, Batch], optimizer: Any) -> dict[str, float] | None:
        """One step of ``optimizer`` on the merge's objective; None when a non-finite step was skipped."""
        optimizer.zero_grad(set_to_none=True)
        with self.profile.phase("merge"):  # per-module merging forms it inside the forward instead
            weights = None if self.merges_per_module else self.merged_weights()
        try:
            objectives = self.accumulate_gradients(batch, weights)
        except NonFiniteError as error:
            return self.skip_step(error, optimizer)
        with self.profile.phase("optimizer"):
            optimizer.step()
            self.after_optimizer_step()
        return objectives

    def skip_step(self, error: NonFiniteError, optimizer: Any) -> None:
        """Under ``on_nonfinite="skip"``: drop the step's gradients and count the step without an update.

        ``optimizer.step()`` still runs, with no gradients (Adam leaves such parameters untouched), so the
        step counts toward ``max_steps`` and the unlabeled stream stays aligned with the step for resume.
        """
        if self.on_nonfinite != "skip":
            raise error
        step = self.global_step
        for parameter in self.trainable_parameters():
            parameter.grad = None
        optimizer.step()
        self.skipped_steps.append({"step": step, "reason": str(error)})
        self.history.append({"step": step, "objective": None, "entropy": None})
        self.log("train/skipped_steps", float(len(self.skipped_steps)), batch_size=1)
        return None

    def log_step(self, objectives: Mapping[str, float]) -> Tensor:
        """Log the step's summed objective and per-task objective and entropy; keep them in ``history``. A step
        with protected tasks also updates their multipliers here (once per step, after its update)."""
        if self.protection is not None:
            for task, values in self.protection.update_multipliers().items():
                for key, value in values.items():
                    self.log(f"train/protected/{task}/{key}", value, batch_size=1)
        total, entropy = sum(objectives.values()), sum(self.last_step_entropy.values())
        self.log("train/objective", total, prog_bar=True, batch_size=1)
        self.log("train/entropy", entropy, batch_size=1)
        for task, value in objectives.items():
            self.log(f"train/objective/{task}", value, batch_size=1)
        for task, value in self.last_step_entropy.items():
            self.log(f"train/entropy/{task}", value, batch_size=1)
        self.history.append({"step": self.global_step, "objective": total, "entropy": entropy})
        return torch.tensor(total)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None
        self.profile.device = self.device
        if self._last_step_end is not None:  # fetching this batch, plus the loop's own bookkeeping
            self.profile.add("data", time.perf_counter() - self._last_step_end)
        if self.adapted_heads is not None:  # heads: adapt, schedule=together -- the heads' step on this batch
            self.adapted_heads.step(self, batch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.profile.end_step()
        self._last_step_end = time.perf_counter()

    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """The fused model (frozen backbone with the evaluation merge baked in)."""
        return self.merged.merge_and_unload_with(self.eval_weights())

    def coefficients(self) -> list:
        return self.merged.coefficients_as_list()
