"""The small steps data-free merges are built from: sparsify, elect signs, combine.

Every step is a pure function on stacked task vectors ``x`` of shape ``[K, *shape]`` (float;
compute is float32) or on a dict of them, so each is tested alone and methods are compositions.

Counting and ties, everywhere in this module: a fraction ``f`` of ``n`` entries selects
``ceil(f·n)`` entries when keeping (top-k) and ``floor(f·n)`` when dropping (Breadcrumbs), with
``f`` read as the nearest simple fraction so that ``0.2 · 60`` is 12, not 13 from float noise.
Entries are then selected by a magnitude *threshold*, so an entry's fate depends only on its
magnitude: entries tied with the boundary entry share its fate (top-k keeps every tie of the
n-th largest, so it may keep more than n; Breadcrumbs drops every tie of a dropped boundary).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Literal

import torch
from torch import Tensor

from adamerge.methods.checks import is_number

Scope = Literal["model", "tensor"]
SCOPES: tuple[str, ...] = ("model", "tensor")


def _exact(fraction: float) -> Fraction:
    return Fraction(fraction).limit_denominator(10**9)


def count_to_keep(fraction: float, numel: int) -> int:
    """``ceil(fraction · numel)``, at least 1 for a non-empty tensor."""
    return min(numel, max(1, math.ceil(_exact(fraction) * numel))) if numel else 0


def count_to_drop(fraction: float, numel: int) -> int:
    """``floor(fraction · numel)``."""
    return math.floor(_exact(fraction) * numel)


def ceil_count(fraction: float, numel: int) -> int:
    """``ceil(fraction · numel)``, with no lower bound (0 for ``fraction = 0``)."""
    return math.ceil(_exact(fraction) * numel)


def _check_fraction(name: str, value: float, *, low_open: bool = True, high_open: bool = False) -> None:
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def _nth_largest(magnitudes: Tensor, n: int) -> Tensor:
    """Per row of ``[K, m]`` magnitudes, the n-th largest value (1-based), shape ``[K]``."""
    return magnitudes.kthvalue(magnitudes.shape[1] - n + 1, dim=1).values


def broadcast_per_task(per_task: Tensor, x: Tensor) -> Tensor:
    """``[K]`` values shaped to broadcast against ``x`` (``[K, *shape]``)."""
    return per_task.reshape(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------------------------------- sparsify


def topk_mask(x: Tensor, fraction: float) -> Tensor:
    """Boolean mask keeping, per task, the entries of the tensor with the largest magnitudes.

    Keeps ``|x| ≥`` the n-th largest ``|x|`` of that task, ``n = ceil(fraction · numel)``; every
    entry tied with the n-th largest is kept too. ``fraction`` is in (0, 1].
    """
    _check_fraction("fraction", fraction)
    flat = x.detach().reshape(x.shape[0], -1).abs().float()
    n = count_to_keep(fraction, flat.shape[1])
    if n == flat.shape[1]:
        return torch.ones_like(x, dtype=torch.bool)
    return x.abs().float() >= broadcast_per_task(_nth_largest(flat, n), x)


def topk_masks(vectors: Mapping[str, Tensor], fraction: float, scope: Scope = "model") -> dict[str, Tensor]:
    """:func:`topk_mask` over a dict of stacked tensors.

    ``scope="tensor"`` ranks each tensor on its own. ``scope="model"`` ranks each task over all
    its entries at once, one threshold per task, as the official TIES code does on the
    flattened model; the ranking uses one float32 concatenation of one task at a time.
    """
    _check_fraction("fraction", fraction)
    _check_scope(scope)
    if scope == "tensor":
        return {name: topk_mask(x, fraction) for name, x in vectors.items()}
    if not vectors:
        return {}
    num_tasks = next(iter(vectors.values())).shape[0]
    thresholds = []
    for k in range(num_tasks):
        magnitudes = torch.cat([x[k].detach().reshape(-1).abs().float() for x in vectors.values()])
        n = count_to_keep(fraction, magnitudes.numel())
        keep_all = n == magnitudes.numel()  # also covers a model of empty tensors
        thresholds.append(magnitudes.new_zeros(()) if keep_all else _nth_largest(magnitudes[None], n)[0])
        del magnitudes
    threshold = torch.stack(thresholds)
    return {name: x.abs().float() >= broadcast_per_task(threshold.to(x.device), x) for name, x in vectors.items()}


def dare_mask(x: Tensor, drop_rate: float, generator: torch.Generator) -> Tensor:
    """Boolean keep mask, each entry kept independently with probability ``1 − drop_rate``.

    Draws on ``generator``'s device and moves the mask to ``x``'s, so a CPU generator gives the
    same mask whatever device the task vectors live on.
    """
    _check_fraction("drop_rate", drop_rate, low_open=False, high_open=True)
    draws = torch.rand(x.shape, generator=generator, device=generator.device)
    return (draws >= drop_rate).to(x.device)


def dare_drop(x: Tensor, drop_rate: float, generator: torch.Generator, *, rescale: bool = True) -> Tensor:
    """DARE: drop entries with probability ``drop_rate``; survivors × ``1/(1 − drop_rate)`` if ``rescale``.

    The rescale keeps every entry's expectation equal to the original.
    """
    kept = x.float() * dare_mask(x, drop_rate, generator)
    return kept / (1.0 - drop_rate) if rescale else kept


def breadcrumbs_mask(x: Tensor, top_beta: float, bottom_gamma: float) -> Tensor:
    """Boolean mask keeping, per task, the band between the largest and the smallest magnitudes.

    Drops the ``floor(top_beta · numel)`` largest-magnitude entries (outliers) and the
    ``floor(bottom_gamma · numel)`` smallest; entries tied with a dropped boundary are dropped too.
    """
    _check_fraction("top_beta", top_beta, low_open=False, high_open=True)
    _check_fraction("bottom_gamma", bottom_gamma, low_open=False, high_open=True)
    if top_beta + bottom_gamma >= 1:
        raise ValueError(f"top_beta + bottom_gamma must be < 1, got {top_beta} + {bottom_gamma}")
    flat = x.detach().reshape(x.shape[0], -1).abs().float()
    numel = flat.shape[1]
    keep = torch.ones_like(flat, dtype=torch.bool)
    n_bottom = count_to_drop(bottom_gamma, numel)
    if n_bottom:
        keep &= flat > flat.kthvalue(n_bottom, dim=1, keepdim=True).values
    n_top = count_to_drop(top_beta, numel)
    if n_top:
        keep &= flat < _nth_largest(flat, n_top)[:, None]
    return keep.reshape(x.shape)


# ------------------------------------------------------------------------------------ sign election


def majority_sign(signs: Tensor) -> float:
    """+1 or −1: the sign held by more entries of ``signs`` (values in {−1, 0, 1}); +1 on a tie."""
    balance = int((signs > 0).sum()) - int((signs < 0).sum())
    return -1.0 if balance < 0 else 1.0


def elect_sign(x: Tensor, fallback: float | None = None) -> Tensor:
    """Per entry, ``sign(Σ_k x_k)`` as float ±1, shape ``x.shape[1:]``.

    Entries whose sum is exactly 0 take ``fallback``; by default the majority of the elected
    signs of this tensor (the official TIES "majority" rule: the sign of the sum of the signs),
    and +1 when those balance too.
    """
    signs = torch.sign(x.float().sum(dim=0))
    if fallback is None:
        fallback = majority_sign(signs)
    return torch.where(signs == 0, torch.full_like(signs, fallback), signs)


def elect_signs(vectors: Mapping[str, Tensor], scope: Scope = "model") -> dict[str, Tensor]:
    """:func:`elect_sign` over a dict; with ``scope="model"`` the zero-sum fallback is the
    majority over the whole model (the official code works on the flattened model)."""
    _check_scope(scope)
    if scope == "tensor":
        return {name: elect_sign(x) for name, x in vectors.items()}
    sums = {name: torch.sign(x.float().sum(dim=0)) for name, x in vectors.items()}
    balance = sum(int((s > 0).sum()) - int((s < 0).sum()) for s in sums.values())
    fallback = -1.0 if balance < 0 else 1.0
    return {name: torch.where(s == 0, torch.full_like(s, fallback), s) for name, s in sums.items()}


def agrees_with(x: Tensor, sign: Tensor) -> Tensor:
    """Mask of the non-zero entries of each task whose sign equals the elected ``sign`` (±1)."""
    return x * sign > 0


# ------------------------------------------------------------------------------------------ combine


def disjoint_mean(x: Tensor, sign: Tensor) -> Tensor:
    """Per entry, the mean over the tasks that agree with ``sign`` (0 where none does).

    Divides by the number of agreeing tasks, not by K, so a parameter one task changed keeps
    that task's full update.
    """
    x = x.float()
    agree = agrees_with(x, sign)
    total = torch.where(agree, x, 0.0).sum(dim=0)
    return total / agree.sum(dim=0, dtype=torch.float32).clamp(min=1)


def ties_trim(vectors: Mapping[str, Tensor], fraction: float, scope: Scope = "model") -> dict[str, Tensor]:
    """TIES without the final mean: per task keep the top ``fraction`` by magnitude, elect signs,
    and zero the entries that disagree with the elected sign. Returns float32 ``[K, *shape]``.

    This is AdaMerging++'s pre-processing; the learned coefficients then weight these vectors.
    """
    masks = topk_masks(vectors, fraction, scope)
    trimmed = {name: torch.where(masks.pop(name), x.float(), 0.0) for name, x in vectors.items()}
    signs = elect_signs(trimmed, scope)
    return {name: torch.where(agrees_with(x, signs[name]), x, 0.0) for name, x in trimmed.items()}


def scaled_sum(vectors: Mapping[str, Tensor], scaling_coefficient: float | Sequence[float]) -> dict[str, Tensor]:
    """``Σ_k λ_k x_k`` per tensor, with one λ for all tasks or one per task."""
    if is_number(scaling_coefficient):
        return {name: float(scaling_coefficient) * x.float().sum(dim=0) for name, x in vectors.items()}
    weights = torch.tensor([float(v) for v in scaling_coefficient], dtype=torch.float32)
    return {name: torch.tensordot(weights.to(x.device), x.float(), dims=1) for name, x in vectors.items()}


def ties_combine(
    vectors: Mapping[str, Tensor], top_k: float, scaling_coefficient: float, scope: str
) -> dict[str, Tensor]:
    """TIES' trim, elect and disjoint mean × λ (``scope``: thresholds and signs per model or per tensor)."""
    masks = topk_masks(vectors, top_k, scope)
    trimmed = {name: torch.where(masks.pop(name), x.float(), 0.0) for name, x in vectors.items()}
    signs = elect_signs(trimmed, scope)
    return {name: scaling_coefficient * disjoint_mean(x, signs[name]) for name, x in trimmed.items()}
