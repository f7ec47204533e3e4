"""Objectives that match each task's fine-tuned model (its *expert*) on the task's unlabeled inputs.

Entropy and information maximisation reward a confident merge; these reward a merge that does what the expert does,
which is what "keep each fine-tuned model's accuracy" asks (ProDistill, SAMerging, Expert Merging, DivMerge). Every
pool holds the experts, so their outputs on the unlabeled inputs are free signal; they are computed once per input
before learning (adamerge/objectives/expert_targets.py) and handed to the loss as ``expert``.

- ``expert_kl``: ``T² · mean_x KL(softmax(z_e/T) ‖ softmax(z/T))`` between the expert's logits ``z_e`` and the
  merged model's ``z`` (temperature ``T``; the ``T²`` keeps the gradient's scale independent of ``T``, as in
  knowledge distillation). ``divergence=js``: the Jensen–Shannon divergence instead (symmetric, bounded by ln 2).
  Per token for causal LMs, over the unpadded positions.
- ``feature_matching``: distance between the merged backbone's features (what the head reads) and the expert's on
  the same inputs: ``mse`` (mean squared difference per element, divided by the expert features' mean square when
  ``relative``) or ``cosine`` (mean of ``1 − cos``). For backbones whose heads are no classifiers.
- ``weighted_sum``: ``Σ_i w_i · L_i`` of registered objectives, configured, e.g.
  ``terms: [{name: expert_kl, weight: 1.0}, {name: information_maximization, weight: 0.5}]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adamerge.objectives.label_free import at_least_float32, masked_mean
from adamerge.objectives.registry import OBJECTIVES, ExpertOutputs, Objective, ObjectiveError, register_objective


def _positions(values: Tensor, mask: Tensor | None) -> Tensor:
    """Per-example (or per-token) values averaged over the examples, or the unpadded tokens given a mask."""
    if values.ndim == 2 and mask is not None:
        return masked_mean(values, mask)
    return values.mean()


@register_objective
class ExpertKL(Objective):
    name = "expert_kl"
    expert_needs = frozenset({"logits"})
    DIVERGENCES = ("kl", "js")

    def __init__(self, temperature: float = 1.0, divergence: str = "kl") -> None:
        super().__init__(normalize=False)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0 \
                or not math.isfinite(temperature):
            raise ObjectiveError(f"objective 'expert_kl': temperature must be a finite number > 0, got {temperature!r}")
        if divergence not in self.DIVERGENCES:
            raise ObjectiveError(f"objective 'expert_kl': divergence must be one of {self.DIVERGENCES}, got {divergence!r}")
        self.temperature, self.divergence = float(temperature), divergence

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "temperature": self.temperature, "divergence": self.divergence}

    def loss(self, logits: Tensor, mask: Tensor | None, *, expert: ExpertOutputs | None = None, **_: Any) -> Tensor:
        target = expert.logits.to(logits.device)
        if target.shape != logits.shape:
            raise ObjectiveError(f"objective 'expert_kl': the expert's logits {tuple(target.shape)} do not match the "
                                 f"merged model's {tuple(logits.shape)}")
        t = self.temperature
        log_q = torch.log_softmax(at_least_float32(logits) / t, dim=-1)
        log_p = torch.log_softmax(at_least_float32(target) / t, dim=-1).to(log_q.dtype)
        if self.divergence == "kl":
            per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
        else:  # Jensen–Shannon: the mean of both KLs to the mixture
            log_m = torch.logsumexp(torch.stack([log_p, log_q]), dim=0) - math.log(2.0)
            per_position = 0.5 * ((log_p.exp() * (log_p - log_m)).sum(-1) + (log_q.exp() * (log_q - log_m)).sum(-1))
        return _positions(per_position, mask) * t * t


@register_objective
class FeatureMatching(Objective):
    name = "feature_matching"
    expert_needs = frozenset({"features"})
    DISTANCES = ("mse", "cosine")

    def __init__(self, distance: str = "mse", relative: bool = True) -> None:
        super().__init__(normalize=False)
        if distance not in self.DISTANCES:
            raise ObjectiveError(f"objective 'feature_matching': distance must be one of {self.DISTANCES}, got {distance!r}")
        if not isinstance(relative, bool):
            raise ObjectiveError(f"objective 'feature_matching': relative must be true or false, got {relative!r}")
        self.distance, self.relative = distance, relative

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "distance": self.distance, "relative": self.relative}

    def loss(self, logits: Tensor, mask: Tensor | None, *, features: Tensor | None = None,
             expert: ExpertOutputs | None = None, **_: Any) -> Tensor:
        merged = at_least_float32(features)
        target = expert.features.to(merged.device, merged.dtype)
        if target.shape != merged.shape:
            raise ObjectiveError(f"objective 'feature_matching': the expert's features {tuple(target.shape)} do not "
                                 f"match the merged backbone's {tuple(merged.shape)}")
        # Positions: one per example ([N, D]) or per token ([N, T, D]); the feature vector is the last dimension,
        # anything between is flattened into it (a feature map [N, C, H, W] compares as one vector per example).
        per_token = mask is not None and merged.ndim == 3 and mask.shape == merged.shape[:2]
        if not per_token:
            merged, target, mask = merged.flatten(1), target.flatten(1), None
        if self.distance == "cosine":
            return _positions(1.0 - torch.nn.functional.cosine_similarity(merged, target, dim=-1, eps=1e-8), mask)
        squared = _positions((merged - target).pow(2).mean(-1), mask)
        if self.relative:  # scale-free across backbones and tasks: 1.0 is as far as the zero vector
            squared = squared / _positions(target.pow(2).mean(-1), mask).clamp_min(1e-12)
        return squared


@register_objective
class WeightedSum(Objective):
    """``Σ_i weight_i · term_i``: any registered objectives combined by configuration."""

    name = "weighted_sum"
    # Matching the experts, plus half of information maximisation's confidence and class balance.
    DEFAULT_TERMS = ({"name": "expert_kl", "weight": 1.0}, {"name": "information_maximization", "weight": 0.5})

    def __init__(self, terms: Sequence[Mapping[str, Any]] = DEFAULT_TERMS) -> None:
        super().__init__(normalize=False)
        if isinstance(terms, (str, bytes)) or not isinstance(terms, Sequence) or not terms:
            raise ObjectiveError("objective 'weighted_sum': terms must be a non-empty list of {name, weight, ...settings}, "
                                 f"got {terms!r}")
        self.terms: list[tuple[float, Objective]] = []
        for index, term in enumerate(terms):
            if not isinstance(term, Mapping) or "name" not in term:
                raise ObjectiveError(f"objective 'weighted_sum': terms[{index}] must be a mapping with a name, got {term!r}")
            settings = dict(term)
            name, weight = settings.pop("name"), settings.pop("weight", 1.0)
            if name == self.name or name not in OBJECTIVES:
                raise ObjectiveError(f"objective 'weighted_sum': terms[{index}].name={name!r} is not an objective to sum; "
                                     f"choose from {sorted(set(OBJECTIVES) - {self.name})}")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
                raise ObjectiveError(f"objective 'weighted_sum': terms[{index}].weight={weight!r} must be a finite number >= 0")
            try:
                self.terms.append((float(weight), OBJECTIVES[name](**settings)))
            except TypeError as error:
                raise ObjectiveError(f"objective 'weighted_sum': terms[{index}] ({name}): {error}") from None

    @property
    def per_token(self) -> bool:  # type: ignore[override]
        return all(term.per_token for _, term in self.terms)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(term.needs for _, term in self.terms))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "terms": [{**term.config(), "weight": weight} for weight, term in self.terms]}

    def loss(self, logits: Tensor, mask: Tensor | None, **inputs: Any) -> Tensor:
        total = None
        for weight, term in self.terms:
            value = weight * term.loss(logits, mask, **inputs)
            total = value if total is None else total + value
        return total
