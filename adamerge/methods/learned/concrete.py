"""Concrete subspace learning (Tang et al. 2023): a shared relaxed-Bernoulli mask on the task vectors.

One mask logit per element of the masked tensors is shared by every task, so a merge is
``θ = θ0 + (m / mean(m)) ⊙ Σ_k λ_k τ_k`` (per tensor mean; unmasked tensors use m = 1). Three learned
methods use it:

- ``concrete_task_arithmetic``: λ frozen at 0.3, the mask logits learn by summed entropy with a fresh
  mask sample every step.
- ``concrete_adamerging_{task,layer}_wise``: the mask meta-learned, then AdaMerging under it
  (:mod:`adamerge.methods.learned.concrete_adamerging`).

This module holds what they share (:class:`ConcreteMaskModule`, :func:`build_mask`, the mask's hyperparameters and
their checks), Concrete task arithmetic and the masks over a data-free merge (the recommended learned merge).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from adamerge.methods import checks
from adamerge.methods.learned.adamerging import register_learned
from adamerge.methods.learned.concrete_mask import ConcreteMask
from adamerge.methods.learned.merged import MergedModel
from adamerge.objectives import Objective
from adamerge.pool.key_filters import select_tensors
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.module import AdaMergingModule

EVAL_MASKS = ("continuous", "binary")
MASK_FILE = "concrete_mask.safetensors"


class ConcreteMaskModule(AdaMergingModule):
    """What every Concrete method shares: the mask, the evaluation mask and the exported artifacts."""

    def __init__(self, merged: MergedModel, heads: Mapping[str, nn.Module], mask: ConcreteMask, *,
                 eval_mask: str, **kwargs: Any) -> None:
        super().__init__(merged, heads, **kwargs)
        if eval_mask not in EVAL_MASKS:
            raise ValueError(f"eval_mask must be one of {EVAL_MASKS}, got {eval_mask!r}")
        self.mask = mask
        self.eval_mask = eval_mask

    def evaluation_mask(self) -> dict[str, Tensor]:
        return self.mask.expected_mask() if self.eval_mask == "continuous" else self.mask.binary_mask()

    def eval_weights(self) -> dict[str, Tensor]:
        return self.merged.merged_weights(mask=self.evaluation_mask())

    def mask_description(self) -> str:
        return self.eval_mask

    def export_extras(self) -> dict[str, Any]:
        """Mask statistics for merge_config.json."""
        return {"mask": {
            "eval_mask": self.mask_description(),
            "temperature": self.mask.temperature,
            "kept_fraction": self.mask.kept_fraction(),
            "kept_fraction_total": self.mask.kept_fraction_total(),
            "memory": self.mask.memory_report(),
        }}

    def save_artifacts(self, directory: str | Path) -> list[Path]:
        """Write the learned mask logits (``concrete_mask.safetensors``) into ``directory``."""
        return [self.mask.save(Path(directory) / MASK_FILE)]


class ConcreteTaskArithmeticModule(ConcreteMaskModule):
    """λ frozen; the base training step learns the mask logits with a fresh sample every step."""

    def __init__(self, merged: MergedModel, heads: Mapping[str, nn.Module], mask: ConcreteMask, **kwargs: Any) -> None:
        super().__init__(merged, heads, mask, **kwargs)
        merged.coefficients.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.mask.parameters())

    def merged_weights(self) -> dict[str, Tensor]:
        return self.merged.merged_weights(mask=self.mask.rescaled_sample())

    def after_optimizer_step(self) -> None:
        """Nothing to clamp: λ does not train."""


def build_mask(merged: MergedModel, *, temperature: float, initial_logit: float,
               mask_patterns: Sequence[str] | None, mask_path: str | None = None) -> ConcreteMask:
    """A fresh mask over the merged tensors, or the logits saved at ``mask_path`` (checked against them)."""
    shapes = {name: tensor.shape for name, tensor in merged.pretrained_tensors().items()}
    if mask_path is None:
        return ConcreteMask(shapes, temperature=temperature, initial_logit=initial_logit, patterns=mask_patterns)
    mask = ConcreteMask.load(mask_path, shapes, temperature=temperature)
    if mask_patterns is not None and set(select_tensors(list(shapes), mask_patterns)) != set(mask.names):
        raise ValueError(f"mask_path {mask_path} masks other tensors than mask_patterns {list(mask_patterns)} select")
    return mask


def build_concrete_task_arithmetic(
    backbone: nn.Module, task_vectors: TaskVectors, heads: Mapping[str, nn.Module], *,
    init_value: float | Sequence[float], temperature: float, initial_logit: float, mask_lr: float,
    betas: Sequence[float], mask_patterns: Sequence[str] | None, eval_mask: str, autocast_dtype: str | None,
    objective: Objective | None = None,
) -> ConcreteTaskArithmeticModule:
    merged = MergedModel(backbone, task_vectors, granularity="task_wise", init_value=init_value, clamp=None)
    mask = build_mask(merged, temperature=temperature, initial_logit=initial_logit, mask_patterns=mask_patterns)
    return ConcreteTaskArithmeticModule(merged, heads, mask, eval_mask=eval_mask, lr=mask_lr, betas=tuple(betas),
                                        autocast_dtype=autocast_dtype, objective=objective)


MASK_DEFAULTS: dict[str, Any] = {
    "temperature": 0.5,
    "initial_logit": 0.0,  # p = 0.5 for every element
    "mask_lr": 1e-3,
    "betas": (0.9, 0.999),
    "mask_patterns": None,  # globs / regexes of the tensors to mask; None = every merged tensor
    "eval_mask": "continuous",  # continuous: sigmoid(logits) / mean; binary: (p > 0.5) / mean
    "autocast_dtype": None,
}
CONCRETE_TA_DEFAULTS: dict[str, Any] = {"init_value": 0.3, **MASK_DEFAULTS}
# The recommended method's mask step size: the paper's 1e-3 hardly moves a logit from 0 within a few hundred steps;
# chosen by bench/learned_study.py over {1e-2, 5e-2, 1e-1} on two zoos, three seeds (1e-1 ties it; docs/methods.md).
RECOMMENDED_MASK_LR = 0.05


def check_mask_hparams(method: str, num_tasks: int, hparams: Mapping[str, Any]) -> None:
    """The hyperparameters every Concrete method's mask takes (``MASK_DEFAULTS`` and ``init_value``), checked for ``method``."""
    checks.check_scaling(method, "init_value", hparams["init_value"], num_tasks, per_task=True)
    checks.check_positive(method, "temperature", hparams["temperature"])
    if not checks.is_number(hparams["initial_logit"]):
        raise checks.fail(method, "initial_logit", hparams["initial_logit"], "must be a finite number")
    checks.check_positive(method, "mask_lr", hparams["mask_lr"])
    checks.check_betas(method, hparams["betas"])
    checks.check_patterns(method, "mask_patterns", hparams["mask_patterns"])
    checks.check_choice(method, "eval_mask", hparams["eval_mask"], EVAL_MASKS)
    checks.check_choice(method, "autocast_dtype", hparams["autocast_dtype"], checks.AUTOCAST_DTYPES)


register_learned(
    "concrete_task_arithmetic", build_concrete_task_arithmetic, CONCRETE_TA_DEFAULTS,
    "Concrete task arithmetic: a shared Concrete mask on the task vectors learned by the objective, λ fixed",
    lambda num_tasks, hparams: check_mask_hparams("concrete_task_arithmetic", num_tasks, hparams),
)
# adamerge's recommended learned merge (bench/learned_study.py, docs/methods.md "The recommended learned merge, by
# objective, base and step size"): a Concrete mask, one logit per element, learned over TSV-M's update kept whole
# (the residual form with its scale at 1 and the per-task corrections at 0, both frozen here),
# θ = θ0 + (m / mean m) ⊙ (θ_TSV-M − θ0). Its evaluation mask starts at 1 everywhere (sigmoid(0) / mean), so learning
# starts exactly at TSV-M. Over three seeds it was the best base for the mask on the demo and the text zoo and level
# with Iso-CTS on the second; the same mask over Iso-CTS stays registered below.
RECOMMENDED_METHOD = "concrete_task_arithmetic_on_tsv_merge"


def _register_mask_over(name: str, base: str, label: str) -> None:
    """A Concrete mask over ``base``'s update kept whole (the residual form, its scale and corrections frozen)."""
    register_learned(
        name, build_concrete_task_arithmetic,
        {**CONCRETE_TA_DEFAULTS, "mask_lr": RECOMMENDED_MASK_LR, "base": base, "base_form": "residual"},
        f"Concrete mask over {label}: θ0 + (m / mean m) ⊙ (θ_{label} − θ0), the mask learned per element from m = 1",
        lambda num_tasks, hparams: check_mask_hparams(name, num_tasks, hparams),
    )


_register_mask_over(RECOMMENDED_METHOD, "tsv_merge", "TSV-M")
_register_mask_over("concrete_task_arithmetic_on_iso_cts", "iso_cts", "Iso-CTS")
