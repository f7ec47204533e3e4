"""Data-free merge methods, each a composition of :mod:`adamerge.methods.data_free.steps`.

Every method is ``fn(task_vectors, **hparams) -> deltas`` with float32 deltas per tensor, so
that the merged model is ``θ = θ0 + delta``. Hyperparameter defaults are the keyword defaults
of the function (the registry reads them from the signature); ``conf/method/<name>.yaml``
repeats them for Hydra and a test keeps the two equal.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adamerge.methods.checks import check_choice, check_range, check_scaling, fail
from adamerge.methods.data_free import steps
from adamerge.methods.data_free.streamed import merge_streamed
from adamerge.methods.registry import get_method, register_method
from adamerge.pool.lora import LoRATaskVectors
from adamerge.pool.task_vectors import TaskVectors

Deltas = dict[str, Tensor]
COMBINES: tuple[str, ...] = ("task_arithmetic", "ties")


# ------------------------------------------------------------------------- hyperparameter checks


def _check_top_k(method: str, value: Any) -> None:
    check_range(
        method, "top_k", value, low_open=True, high_open=False, hint=" (a fraction: 0.2 keeps the top 20%)"
    )


def _check_scaling(method: str, value: Any, num_tasks: int, *, per_task: bool) -> None:
    check_scaling(method, "scaling_coefficient", value, num_tasks, per_task=per_task)


def _validate_weight_average(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    """Weight averaging has no hyperparameters."""


def _validate_task_arithmetic(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    _check_scaling("task_arithmetic", hparams["scaling_coefficient"], num_tasks, per_task=True)


def _validate_ties(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    _check_top_k("ties", hparams["top_k"])
    _check_scaling("ties", hparams["scaling_coefficient"], num_tasks, per_task=False)
    check_choice("ties", "scope", hparams["scope"], steps.SCOPES)


def _validate_dare(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    check_range("dare", "drop_rate", hparams["drop_rate"], low_open=False, high_open=True)
    if not isinstance(hparams["seed"], int) or isinstance(hparams["seed"], bool):
        raise fail("dare", "seed", hparams["seed"], "must be an integer")
    if not isinstance(hparams["rescale"], bool):
        raise fail("dare", "rescale", hparams["rescale"], "must be true or false")
    check_choice("dare", "combine", hparams["combine"], COMBINES)
    per_task = hparams["combine"] == "task_arithmetic"
    _check_scaling("dare", hparams["scaling_coefficient"], num_tasks, per_task=per_task)
    _check_top_k("dare", hparams["top_k"])
    check_choice("dare", "scope", hparams["scope"], steps.SCOPES)


def _validate_breadcrumbs(num_tasks: int, hparams: Mapping[str, Any]) -> None:
    beta, gamma = hparams["top_beta"], hparams["bottom_gamma"]
    check_range("breadcrumbs", "top_beta", beta, low_open=False, high_open=True)
    check_range("breadcrumbs", "bottom_gamma", gamma, low_open=False, high_open=True)
    if beta + gamma >= 1:
        raise fail(
            "breadcrumbs", "top_beta + bottom_gamma", beta + gamma, "must be < 1 (some band must remain)"
        )
    _check_scaling("breadcrumbs", hparams["scaling_coefficient"], num_tasks, per_task=True)


def static_method(name: str, validate: Callable[[int, Mapping[str, Any]], None]) -> Callable:
    """Register ``fn`` as a static method whose hyperparameters are checked on every call.

    Used by every data-free method module (this one, :mod:`~adamerge.methods.data_free.pcb`,
    :mod:`~adamerge.methods.data_free.tsv`, :mod:`~adamerge.methods.data_free.isotropic`, :mod:`~adamerge.methods.data_free.wudi`).
    """

    def decorator(fn: Callable[..., Deltas]) -> Callable[..., Deltas]:
        @functools.wraps(fn)  # keeps fn's signature, from which the registry reads the defaults
        def checked(task_vectors: TaskVectors, **hparams: Any) -> Deltas:
            resolved = spec.resolve_hparams(hparams)
            validate(task_vectors.num_tasks, resolved)
            if isinstance(task_vectors, LoRATaskVectors):  # adapters: each weight's K dense deltas when read
                task_vectors = task_vectors.as_streamed()
            if getattr(task_vectors, "streamed", False):  # a streamed pool: block by block (data_free.streamed)
                return merge_streamed(task_vectors, name, fn, resolved)
            return fn(task_vectors, **resolved)

        register_method(name, kind="static", validate=validate)(checked)
        spec = get_method(name)
        return checked

    return decorator



# ------------------------------------------------------------------------------------ the methods


@static_method("weight_average", _validate_weight_average)
def weight_average(task_vectors: TaskVectors) -> Deltas:
    """Weight averaging: θ = mean_k θ_k, i.e. delta = mean_k τ_k."""
    return {name: x.float().mean(dim=0) for name, x in task_vectors.vectors.items()}


@static_method("task_arithmetic", _validate_task_arithmetic)
def task_arithmetic(
    task_vectors: TaskVectors, *, scaling_coefficient: float | Sequence[float] = 0.3
) -> Deltas:
    """Task arithmetic (Ilharco et al. 2023): θ = θ0 + λ Σ_k τ_k; λ may be one value per task."""
    return steps.scaled_sum(task_vectors.vectors, scaling_coefficient)


@static_method("ties", _validate_ties)
def ties(
    task_vectors: TaskVectors, *, top_k: float = 0.2, scaling_coefficient: float = 0.3, scope: str = "model"
) -> Deltas:
    """TIES (Yadav et al. 2023): trim to the top-k by magnitude, elect signs, disjoint mean, × λ."""
    return steps.ties_combine(task_vectors.vectors, top_k, scaling_coefficient, scope)


@static_method("dare", _validate_dare)
def dare(
    task_vectors: TaskVectors,
    *,
    drop_rate: float = 0.5,
    seed: int = 0,
    rescale: bool = True,
    combine: str = "task_arithmetic",
    scaling_coefficient: float | Sequence[float] = 0.3,
    top_k: float = 0.2,
    scope: str = "model",
) -> Deltas:
    """DARE (Yu et al. 2024): random drop with rescale, then task arithmetic or TIES (top_k, scope).

    One CPU generator seeded with ``seed`` draws the masks of all tensors in order, so a merge
    is reproducible whatever device the task vectors are on.
    """
    dropped = dare_dropped(task_vectors.vectors, drop_rate, seed, rescale)
    if combine == "ties":
        return steps.ties_combine(dropped, top_k, scaling_coefficient, scope)
    return steps.scaled_sum(dropped, scaling_coefficient)


@static_method("breadcrumbs", _validate_breadcrumbs)
def breadcrumbs(
    task_vectors: TaskVectors,
    *,
    top_beta: float = 0.01,
    bottom_gamma: float = 0.9,
    scaling_coefficient: float | Sequence[float] = 0.3,
) -> Deltas:
    """Model Breadcrumbs (Davari & Belilovsky 2023): keep a magnitude band, then task arithmetic.

    Per tensor and task, the top β fraction by magnitude (outliers) and the bottom γ are zeroed.
    """
    return steps.scaled_sum(breadcrumbs_masked(task_vectors.vectors, top_beta, bottom_gamma), scaling_coefficient)


def dare_dropped(vectors: Mapping[str, Tensor], drop_rate: float, seed: int, rescale: bool) -> dict[str, Tensor]:
    """DARE's per-task vectors: each entry dropped with probability ``drop_rate`` (rescaled by 1/(1-p))."""
    generator = torch.Generator().manual_seed(seed)
    return {name: steps.dare_drop(x, drop_rate, generator, rescale=rescale) for name, x in vectors.items()}


def breadcrumbs_masked(vectors: Mapping[str, Tensor], top_beta: float, bottom_gamma: float) -> dict[str, Tensor]:
    """Breadcrumbs' per-task vectors: the top β and bottom γ fractions by magnitude zeroed, per tensor and task."""
    return {name: torch.where(steps.breadcrumbs_mask(x, top_beta, bottom_gamma), x.float(), 0.0)
            for name, x in vectors.items()}
