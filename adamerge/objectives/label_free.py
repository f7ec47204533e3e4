"""Label-free test-time objectives: what a learned merge minimises on each task's unlabeled batch.

Every objective maps one task's logits (``[N, C]``, or ``[N, T, V]`` per token for causal LMs with a padding
mask) to a scalar loss (:class:`~adamerge.objectives.registry.Objective`); learned methods sum it over tasks.
``p = softmax(logits)``, ``H`` is Shannon entropy
in nats, ``C`` the number of classes.

- ``entropy`` (AdaMerging, Yang et al. 2024): mean ``H(p(x))``. Rewards confidence, right or wrong, so it
  can make a task confidently wrong (confirmation bias).
- ``information_maximization`` (SHOT, Liang et al. 2020): mean ``H(p(x)) − w · H(mean_x p(x))``; the second
  term wants the batch's predictions spread over the classes, so a merge cannot lower the loss by pushing a
  task into a few classes. Undefined per token (the batch mean over a whole vocabulary is no class prior).
- ``confident_entropy`` (EATA, Niu et al. 2022; SAR, 2023): mean ``H`` over the examples with
  ``H < threshold · ln C`` only (optionally weighted by ``exp(E0 − H)``, EATA); high-entropy examples carry
  the noisiest gradients. A batch with no confident example contributes zero.

``normalize=True`` divides every entropy by ``ln C`` so a 10-class and a 397-class task weigh alike in the sum.

Expert-matching objectives (adamerge/objectives/expert.py: ``expert_kl``, ``feature_matching``) compare the merged
model with each task's own fine-tuned model (its *expert*) on the same unlabeled inputs instead of rewarding
confidence; ``weighted_sum`` adds any of them with weights. They receive the expert's outputs through ``expert``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from adamerge.methods.learned.merged_per_module import bands
from adamerge.objectives.registry import Objective, ObjectiveError, register_objective


def at_least_float32(logits: Tensor) -> Tensor:
    """bf16/fp16 logits are upcast for a stable softmax; float64 ones stay float64."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


ENTROPY_CHUNK_ELEMENTS = 1 << 22  # logits upcast and softmaxed at a time: 16 MiB in float32


class _TokenEntropy(torch.autograd.Function):
    """``H(softmax(z))`` per row, computed a chunk of rows at a time, forward and backward: autograd keeps the logits
    (alive anyway) and the entropies, not the log-probabilities, probabilities and their product -- four copies of a
    causal LM's ``tokens × vocabulary`` logits. ``∂H/∂z_j = −p_j (log p_j + H)``, recomputed per chunk."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor) -> Tensor:
        flat = logits.reshape(-1, logits.shape[-1])
        out = torch.empty(flat.shape[0], dtype=torch.promote_types(logits.dtype, torch.float32), device=logits.device)
        for start, stop in _row_chunks(flat):
            log_probs = torch.log_softmax(at_least_float32(flat[start:stop]), dim=-1)
            out[start:stop] = -(log_probs.exp() * log_probs).sum(-1)
        ctx.save_for_backward(logits, out)
        return out.reshape(logits.shape[:-1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        logits, entropy = ctx.saved_tensors
        flat, grad = logits.reshape(-1, logits.shape[-1]), grad.reshape(-1)
        out = torch.empty_like(flat)
        for start, stop in _row_chunks(flat):
            log_probs = torch.log_softmax(at_least_float32(flat[start:stop]), dim=-1)
            probs = log_probs.exp()
            part = log_probs.add_(entropy[start:stop, None]).mul_(probs).mul_(-grad[start:stop, None].to(probs.dtype))
            out[start:stop] = part.to(out.dtype)
        return out.reshape(logits.shape)


def _row_chunks(flat: Tensor) -> list[tuple[int, int]]:
    return bands(*flat.shape, ENTROPY_CHUNK_ELEMENTS)


def token_entropy(logits: Tensor) -> Tensor:
    """``H(softmax(logits))`` along the last dimension, in float32 (one value per example or token); chunked over
    rows, forward and backward, so no float32 copy of the whole logits is kept (:class:`_TokenEntropy`)."""
    return _TokenEntropy.apply(logits)


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values``, over the positions where ``mask`` is non-zero when one is given."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def prediction_entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over the batch (and valid positions, given a mask)."""
    return masked_mean(token_entropy(logits), mask)


def entropy_scale(num_classes: int, normalize: bool) -> float:
    """``ln C`` when normalising (1 for a one-class head, whose entropy is always 0), else 1."""
    return math.log(num_classes) if normalize and num_classes > 1 else 1.0


@register_objective
class Entropy(Objective):
    name = "entropy"

    def loss(self, logits: Tensor, mask: Tensor | None, **_: Any) -> Tensor:
        return prediction_entropy(logits, mask) / entropy_scale(logits.shape[-1], self.normalize)


@register_objective
class InformationMaximization(Objective):
    name = "information_maximization"
    per_token = False

    def __init__(self, diversity_weight: float = 1.0, normalize: bool = False) -> None:
        super().__init__(normalize)
        if not diversity_weight >= 0:
            raise ObjectiveError(f"objective 'information_maximization': diversity_weight must be >= 0, got {diversity_weight}")
        self.diversity_weight = float(diversity_weight)

    def loss(self, logits: Tensor, mask: Tensor | None, **_: Any) -> Tensor:
        probs = torch.softmax(at_least_float32(logits), dim=-1)
        mean_entropy = token_entropy(logits).mean()
        marginal = probs.mean(0)
        diversity = -(marginal * torch.log(marginal.clamp_min(1e-12))).sum()
        return (mean_entropy - self.diversity_weight * diversity) / entropy_scale(logits.shape[-1], self.normalize)


@register_objective
class ConfidentEntropy(Objective):
    name = "confident_entropy"
    WEIGHTINGS = ("none", "eata")

    def __init__(self, threshold: float = 0.4, weighting: str = "none", normalize: bool = False) -> None:
        super().__init__(normalize)
        if not 0 < threshold <= 1:
            raise ObjectiveError(f"objective 'confident_entropy': threshold is a fraction of ln C in (0, 1], got {threshold}")
        if weighting not in self.WEIGHTINGS:
            raise ObjectiveError(f"objective 'confident_entropy': weighting must be one of {self.WEIGHTINGS}, got {weighting!r}")
        self.threshold, self.weighting = float(threshold), weighting

    def loss(self, logits: Tensor, mask: Tensor | None, **_: Any) -> Tensor:
        entropy = token_entropy(logits)
        margin = self.threshold * math.log(logits.shape[-1]) if logits.shape[-1] > 1 else 0.0
        selected = entropy < margin
        if mask is not None:
            selected = selected & mask.bool()
        weight = selected.to(entropy.dtype)
        if self.weighting == "eata":
            weight = weight * torch.exp(margin - entropy.detach())
        loss = (weight * entropy).sum() / selected.sum().clamp_min(1).to(entropy.dtype)
        return loss / entropy_scale(logits.shape[-1], self.normalize)
