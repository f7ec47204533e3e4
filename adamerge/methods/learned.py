"""Learned methods: AdaMerging (task-wise / layer-wise) and AdaMerging++ on TIES-trimmed vectors.

They need unlabeled test data and the trainer, so the registry holds their hyperparameters and
this module turns a name + hyperparameters into the LightningModule that learns them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from adamerge.merged import MergedModel, resolve_layer_groups
from adamerge.methods.registry import get_method, register_method
from adamerge.methods.steps import ties_trim
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


def register_learned(name: str, builder: LearnedBuilder, defaults: Mapping[str, Any], description: str) -> None:
    register_method(name, kind="learned", defaults=defaults, description=description)
    LEARNED_BUILDERS[name] = builder


for _granularity in ("task_wise", "layer_wise"):
    register_learned(
        f"adamerging_{_granularity}",
        _adamerging_builder(_granularity),
        ADAMERGING_DEFAULTS,
        f"AdaMerging with {_granularity.replace('_', '-')} coefficients learned by test-time entropy minimisation",
    )
    register_learned(
        f"adamerging_{_granularity}_plus_plus",
        _adamerging_builder(_granularity),
        {**ADAMERGING_DEFAULTS, "ties_top_k": 0.2},
        f"AdaMerging++: {_granularity.replace('_', '-')} AdaMerging over TIES-trimmed task vectors",
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
