"""Learned methods: AdaMerging (task-wise / layer-wise) and AdaMerging++ on TIES-trimmed vectors.

They need unlabeled test data and the trainer, so the registry holds their hyperparameters and
this module turns a name + hyperparameters into the LightningModule that learns them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from adamerge.merged import MergedModel, resolve_layer_groups
from adamerge.methods import checks
from adamerge.methods.registry import HparamValidator, get_method, register_method
from adamerge.methods.steps import SCOPES, ties_trim
from adamerge.module import AdaMergingModule
from adamerge.objectives import Objective
from adamerge.task_vectors import TaskVectors

ADAMERGING_DEFAULTS: dict[str, Any] = {
    "init_value": 0.3,
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,
    "clamp": True,  # the official code clamps λ to [0, 1]; FusionBench does not
    "ties_top_k": None,  # a fraction → AdaMerging++ (TIES-trim the task vectors first)
    "ties_scope": "model",
    "autocast_dtype": None,  # "bfloat16" / "float16" for autocast on the forward passes
    # Layer-wise rows: null/"tensor" = one per tensor, "block" = one per transformer block,
    # {pattern, other} = custom block regex, or an explicit list of row indices.
    "layer_groups": None,
}

LearnedBuilder = Callable[..., AdaMergingModule]
LEARNED_BUILDERS: dict[str, LearnedBuilder] = {}


def trim_task_vectors(task_vectors: TaskVectors, top_k: float, scope: str = "model") -> TaskVectors:
    """AdaMerging++'s pre-processing: per task keep the top-k entries that agree with the elected sign."""
    trimmed = ties_trim({n: v.float() for n, v in task_vectors.vectors.items()}, top_k, scope)
    return task_vectors.map(lambda name, _: trimmed[name])


def _adamerging_builder(granularity: str) -> LearnedBuilder:
    def build(
        backbone: nn.Module,
        task_vectors: TaskVectors,
        heads: Mapping[str, nn.Module],
        *,
        init_value: float | Sequence[float],
        lr: float,
        betas: Sequence[float],
        weight_decay: float,
        clamp: bool,
        ties_top_k: float | None,
        ties_scope: str,
        autocast_dtype: str | None,
        layer_groups: Any = None,
        objective: Objective | None = None,
    ) -> AdaMergingModule:
        if ties_top_k is not None:
            task_vectors = trim_task_vectors(task_vectors, ties_top_k, ties_scope)
        merged = MergedModel(
            backbone,
            task_vectors,
            granularity=granularity,
            init_value=init_value,
            clamp=(0.0, 1.0) if clamp else None,
            layer_groups=resolve_layer_groups(layer_groups, task_vectors.names),
        )
        return AdaMergingModule(
            merged, heads, lr=lr, betas=tuple(betas), weight_decay=weight_decay, autocast_dtype=autocast_dtype,
            objective=objective,
        )

    return build


def register_learned(name: str, builder: LearnedBuilder, defaults: Mapping[str, Any], description: str,
                     validate: HparamValidator | None = None) -> None:
    register_method(name, kind="learned", defaults=defaults, description=description, validate=validate)
    LEARNED_BUILDERS[name] = builder


def check_coefficient_learning(method: str, num_tasks: int, hparams: Mapping[str, Any]) -> None:
    """What every method that learns λ with Adam shares: init, step size, betas, clamp, autocast."""
    checks.check_scaling(method, "init_value", hparams["init_value"], num_tasks, per_task=True)
    checks.check_positive(method, "lr", hparams["lr"])
    checks.check_betas(method, hparams["betas"])
    checks.check_bool(method, "clamp", hparams["clamp"])
    checks.check_choice(method, "autocast_dtype", hparams["autocast_dtype"], checks.AUTOCAST_DTYPES)


def _adamerging_validator(name: str) -> HparamValidator:
    def validate(num_tasks: int, hparams: Mapping[str, Any]) -> None:
        check_coefficient_learning(name, num_tasks, hparams)
        checks.check_positive(name, "weight_decay", hparams["weight_decay"], allow_zero=True)
        if hparams["ties_top_k"] is not None:
            checks.check_range(name, "ties_top_k", hparams["ties_top_k"], low_open=True, high_open=False,
                               hint=" or null (a fraction: 0.2 keeps the top 20%)")
        checks.check_choice(name, "ties_scope", hparams["ties_scope"], SCOPES)
        checks.check_layer_groups(name, hparams["layer_groups"])

    return validate


for _granularity in ("task_wise", "layer_wise"):
    register_learned(
        f"adamerging_{_granularity}",
        _adamerging_builder(_granularity),
        ADAMERGING_DEFAULTS,
        f"AdaMerging with {_granularity.replace('_', '-')} coefficients learned by a test-time objective",
        _adamerging_validator(f"adamerging_{_granularity}"),
    )
    register_learned(
        f"adamerging_{_granularity}_plus_plus",
        _adamerging_builder(_granularity),
        {**ADAMERGING_DEFAULTS, "ties_top_k": 0.2},
        f"AdaMerging++: {_granularity.replace('_', '-')} AdaMerging over TIES-trimmed task vectors",
        _adamerging_validator(f"adamerging_{_granularity}_plus_plus"),
    )


def build_learned(
    name: str,
    backbone: nn.Module,
    task_vectors: TaskVectors,
    heads: Mapping[str, nn.Module],
    objective: Objective | None = None,
    **hparams: Any,
) -> AdaMergingModule:
    """The LightningModule that learns method ``name`` (hyperparameters checked against the registry).

    ``objective`` is what it minimises on the unlabeled batches (default: the paper's entropy); any
    objective composes with any learned method.
    """
    spec = get_method(name)
    if spec.kind != "learned":
        raise ValueError(f"method {name!r} is data-free; use adamerge.merge() for it")
    return LEARNED_BUILDERS[name](backbone, task_vectors, heads, objective=objective, **spec.resolve_hparams(hparams))
