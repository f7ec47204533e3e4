"""Concrete AdaMerging (Tang et al. 2023): the shared Concrete mask meta-learned, then AdaMerging under it.

``concrete_adamerging_{task,layer}_wise``: stage 1 (``global_step < meta_steps``) meta-learns the mask by a
first-order bi-level step: reset λ to 0.3, one inner Adam step on λ (mask detached) on the first half of each task's
batch, then an outer Adam step on the logits with a fresh mask sample, the updated λ held fixed and the second half of
each batch as the fresh data. Stage 2 freezes the mask, resets λ to 0.3 and runs ordinary AdaMerging for the remaining
``max_steps - meta_steps`` steps. The mask and what every Concrete method shares: :mod:`adamerge.methods.learned.concrete`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from adamerge.errors import NonFiniteError
from adamerge.methods import checks
from adamerge.methods.learned.adamerging import check_coefficient_learning, register_learned
from adamerge.methods.learned.concrete import MASK_DEFAULTS, ConcreteMaskModule, build_mask, check_mask_hparams
from adamerge.methods.learned.concrete_mask import ConcreteMask
from adamerge.methods.learned.merged import MergedModel
from adamerge.methods.registry import HparamValidator, LearnedBuilder
from adamerge.objectives import Objective
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.module import Batch

STAGE2_MASKS = ("eval", "sample")


def split_batch(batch: Mapping[str, Batch]) -> tuple[dict[str, Batch], dict[str, Batch]]:
    """Each task's batch cut in two halves along the example dimension: (inner-step, outer-step) data."""

    def halves(value: Any) -> tuple[Any, Any]:
        if isinstance(value, Mapping):
            pairs = {key: halves(item) for key, item in value.items()}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        if isinstance(value, (Tensor, list, tuple)):
            if len(value) < 2:
                raise ValueError("Concrete AdaMerging's meta step needs at least 2 examples per task batch")
            return value[: len(value) // 2], value[len(value) // 2 :]
        return value, value

    first, second = halves({task: dict(task_batch) for task, task_batch in batch.items()})
    return first, second


class ConcreteAdaMergingModule(ConcreteMaskModule):
    """Stage 1 meta-learns the mask (first-order bi-level), stage 2 is AdaMerging under the frozen mask.

    The stage follows ``global_step``: stage 1 while it is below ``meta_steps``. ``stage2_mask`` is
    ``"eval"`` (freeze the deterministic ``eval_mask``, so learning and evaluation see one merge) or
    ``"sample"`` (one relaxed sample, as the reference code; evaluation and export then use it too).
    """

    def __init__(self, merged: MergedModel, heads: Mapping[str, nn.Module], mask: ConcreteMask, *,
                 mask_lr: float, inner_lr: float, meta_steps: int, stage2_mask: str, **kwargs: Any) -> None:
        super().__init__(merged, heads, mask, **kwargs)
        if stage2_mask not in STAGE2_MASKS:
            raise ValueError(f"stage2_mask must be one of {STAGE2_MASKS}, got {stage2_mask!r}")
        if meta_steps < 0:
            raise ValueError(f"meta_steps must be >= 0, got {meta_steps}")
        self.mask_lr, self.inner_lr, self.meta_steps, self.stage2_mask = mask_lr, inner_lr, int(meta_steps), stage2_mask
        self.register_buffer("initial_coefficients", merged.coefficients.detach().clone())
        self.frozen_mask: dict[str, Tensor] | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [self.merged.coefficients, *self.mask.parameters()]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """[outer (mask logits), inner (λ, lr=inner_lr), stage 2 (λ, lr)]; Adam state persists as in the reference."""
        super().configure_optimizers()  # the check that nothing else trains
        adam = {"betas": self.betas, "weight_decay": self.weight_decay}
        return [
            torch.optim.Adam(self.mask.parameters(), lr=self.mask_lr, **adam),
            torch.optim.Adam([self.merged.coefficients], lr=self.inner_lr, **adam),
            torch.optim.Adam([self.merged.coefficients], lr=self.lr, **adam),
        ]

    def in_meta_stage(self) -> bool:
        return self.frozen_mask is None and self.global_step < self.meta_steps

    @torch.no_grad()
    def reset_coefficients(self) -> None:
        self.merged.coefficients.copy_(self.initial_coefficients)

    @torch.no_grad()
    def freeze_mask(self) -> None:
        """Enter stage 2: fix the mask, stop its gradient and restart λ from its initial value."""
        self.mask.requires_grad_(False)
        mask = self.mask.rescaled_sample() if self.stage2_mask == "sample" else self.evaluation_mask()
        self.frozen_mask = {name: m.detach() for name, m in mask.items()}
        self.reset_coefficients()

    def extra_resume_state(self) -> dict[str, Any]:
        """Stage 2's frozen mask (with ``stage2_mask=sample`` a random draw, so it is kept, not recomputed)."""
        return {"frozen_mask": dict(self.frozen_mask) if self.frozen_mask is not None else None}

    def load_extra_resume_state(self, state: Mapping[str, Any]) -> None:
        if state.get("frozen_mask") is not None:
            self.mask.requires_grad_(False)
            self.frozen_mask = dict(state["frozen_mask"])  # moved to the module's device in on_train_start

    def merged_weights(self) -> dict[str, Tensor]:
        """The stage-2 merge under the frozen mask (before stage 2: under the current eval mask)."""
        mask = self.frozen_mask if self.frozen_mask is not None else self.evaluation_mask()
        return self.merged.merged_weights(mask=mask)

    def eval_weights(self) -> dict[str, Tensor]:
        return self.merged_weights()

    def mask_description(self) -> str:
        return "relaxed_sample" if self.frozen_mask is not None and self.stage2_mask == "sample" else self.eval_mask

    def on_train_start(self) -> None:
        if self.frozen_mask is not None:
            self.frozen_mask = {name: m.to(self.device) for name, m in self.frozen_mask.items()}
        max_steps = self.trainer.max_steps
        if self.frozen_mask is None and 0 <= max_steps <= self.meta_steps:
            warnings.warn(f"max_steps={max_steps} <= meta_steps={self.meta_steps}: Concrete AdaMerging will "
                          "only meta-learn the mask; set max_steps = meta_steps + AdaMerging steps", stacklevel=2)

    def meta_step(self, batch: Mapping[str, Batch], outer: Any, inner: torch.optim.Optimizer) -> dict[str, float]:
        """One first-order bi-level step; returns the outer (fresh-data) objective per task."""
        inner_batch, outer_batch = split_batch(batch)
        self.reset_coefficients()
        inner.zero_grad(set_to_none=True)
        with self.profile.phase("merge"), torch.no_grad():  # the inner step must not reach the mask logits
            inner_mask = self.mask.rescaled_sample()
        with self.profile.phase("merge"):
            inner_weights = self.merged.merged_weights(mask=inner_mask)
        self.accumulate_gradients(inner_batch, inner_weights)
        with self.profile.phase("optimizer"):
            inner.step()

        outer.zero_grad(set_to_none=True)
        adapted = self.merged.coefficients.detach()  # no differentiation through the inner step
        with self.profile.phase("merge"):
            weights = self.merged.merged_weights(mask=self.mask.rescaled_sample(), coefficients=adapted)
        objectives = self.accumulate_gradients(outer_batch, weights)
        with self.profile.phase("optimizer"):
            outer.step()
        # Between meta steps (and for evaluation during stage 1) λ is its initial value.
        self.reset_coefficients()
        self.merged.coefficients.grad = None
        return objectives

    def training_step(self, batch: Mapping[str, Batch], batch_idx: int) -> Tensor | None:
        outer, inner, adamerging = self.optimizers()
        if self.in_meta_stage():
            # The inner step uses the plain torch optimizer: Lightning counts every LightningOptimizer
            # step as a global step, and one meta step must be one step of max_steps.
            try:
                objectives = self.meta_step(batch, outer, inner.optimizer)
            except NonFiniteError as error:
                self.reset_coefficients()  # the inner step may have moved λ before the outer pass failed
                return self.skip_step(error, outer)
        else:
            if self.frozen_mask is None:
                self.freeze_mask()
            objectives = self.coefficient_step(batch, adamerging)
            if objectives is None:  # a skipped non-finite step
                return None
        self.log("train/stage", 1.0 if self.frozen_mask is None else 2.0, batch_size=1)
        return self.log_step(objectives)


def _concrete_adamerging_builder(granularity: str) -> LearnedBuilder:
    def build(
        backbone: nn.Module, task_vectors: TaskVectors, heads: Mapping[str, nn.Module], *,
        init_value: float | Sequence[float], lr: float, betas: Sequence[float], clamp: bool, temperature: float,
        initial_logit: float, mask_lr: float, inner_lr: float, meta_steps: int, stage2_mask: str, eval_mask: str,
        mask_patterns: Sequence[str] | None, mask_path: str | None, autocast_dtype: str | None,
        objective: Objective | None = None,
    ) -> ConcreteAdaMergingModule:
        merged = MergedModel(backbone, task_vectors, granularity=granularity, init_value=init_value,
                             clamp=(0.0, 1.0) if clamp else None)
        mask = build_mask(merged, temperature=temperature, initial_logit=initial_logit, mask_patterns=mask_patterns,
                          mask_path=mask_path)
        return ConcreteAdaMergingModule(
            merged, heads, mask, mask_lr=mask_lr, inner_lr=inner_lr, stage2_mask=stage2_mask, eval_mask=eval_mask,
            meta_steps=0 if mask_path is not None else meta_steps, lr=lr, betas=tuple(betas),
            autocast_dtype=autocast_dtype, objective=objective,
        )

    return build


CONCRETE_AM_DEFAULTS: dict[str, Any] = {
    "init_value": 0.3,
    "lr": 1e-3,  # stage 2 (AdaMerging)
    "clamp": True,  # stage 2 clamps λ to [0, 1]; the inner step of stage 1 does not
    **MASK_DEFAULTS,
    "inner_lr": 1.0,
    "meta_steps": 1000,  # stage 1 length; trainer.max_steps = meta_steps + AdaMerging steps
    "stage2_mask": "eval",
    "mask_path": None,  # saved logits: skip stage 1 (all max_steps are AdaMerging steps)
}


def _concrete_am_validator(method: str) -> HparamValidator:
    def validate(num_tasks: int, hparams: Mapping[str, Any]) -> None:
        check_mask_hparams(method, num_tasks, hparams)
        check_coefficient_learning(method, num_tasks, hparams)
        checks.check_positive(method, "inner_lr", hparams["inner_lr"])
        checks.check_int(method, "meta_steps", hparams["meta_steps"])
        checks.check_choice(method, "stage2_mask", hparams["stage2_mask"], STAGE2_MASKS)
        checks.check_file(method, "mask_path", hparams["mask_path"])

    return validate


for _granularity in ("task_wise", "layer_wise"):
    register_learned(
        f"concrete_adamerging_{_granularity}", _concrete_adamerging_builder(_granularity), CONCRETE_AM_DEFAULTS,
        f"Concrete AdaMerging: meta-learned shared mask, then {_granularity.replace('_', '-')} AdaMerging under it",
        _concrete_am_validator(f"concrete_adamerging_{_granularity}"),
    )
