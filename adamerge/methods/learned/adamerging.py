"""Learned methods: AdaMerging (task-wise / layer-wise) and AdaMerging++ on TIES-trimmed vectors.

They need unlabeled test data and the trainer, so the registry holds their hyperparameters and
this module turns a name + hyperparameters into the LightningModule that learns them. Every learned method
also takes ``base`` / ``base_hparams``: learn over a data-free method's per-task vectors (adamerge/methods/learned/bases.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from adamerge.methods import checks
from adamerge.methods.learned.bases import (
    BASE_FORMS, BASE_MERGE, RESIDUAL_BOUNDS, apply_base, resolve_base, resolve_residual_base, with_residual_base,
)
from adamerge.methods.learned.merged_streamed import merged_model_class
from adamerge.methods.registry import HparamValidator, LearnedBuilder, get_method, register_method
from adamerge.objectives import Objective, build_objective
from adamerge.pool.key_filters import resolve_layer_groups
from adamerge.pool.modelpool import ModelPool
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.adapted_heads import attach
from adamerge.training.alignment import ALIGNMENT_TASK, AlignmentVector
from adamerge.training.heads_config import REPORT_KEY, head_settings
from adamerge.training.module import AdaMergingModule

ADAMERGING_DEFAULTS: dict[str, Any] = {
    "init_value": 0.3,
    "lr": 1e-3,
    "betas": (0.9, 0.999),
    "weight_decay": 0.0,
    "clamp": True,  # the official code clamps λ to [0, 1]; FusionBench does not
    "autocast_dtype": None,  # "bfloat16" / "float16" for autocast on the forward passes
    # Layer-wise rows: null/"tensor" = one per tensor, "block" = one per transformer block,
    # {pattern, other} = custom block regex, or an explicit list of row indices.
    "layer_groups": None,
}

# Every learned method's: the data-free method it learns on top of (None: the raw task vectors), that method's
# hyperparameters, and how (adamerge/methods/learned/bases.py): "residual" keeps the base merge whole under a learned per-layer scale plus
# per-task corrections starting at 0; "split" learns over the base's per-task vectors.
LEARN_ON_TOP_DEFAULTS: dict[str, Any] = {"base": None, "base_hparams": None, "base_form": "residual"}



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
        autocast_dtype: str | None,
        layer_groups: Any = None,
        objective: Objective | None = None,
    ) -> AdaMergingModule:
        merged = merged_model_class(task_vectors)(
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

    # A plain AdaMergingModule over a dense MergedModel: what trainer=fsdp shards (adamerge.training.sharding).
    build.shardable = True
    return build


def register_learned(name: str, builder: LearnedBuilder, defaults: Mapping[str, Any], description: str,
                     validate: HparamValidator | None = None) -> None:
    """Register a learned method; ``base`` / ``base_hparams`` are added to its hyperparameters and checked."""

    def validate_with_base(num_tasks: int, hparams: Mapping[str, Any]) -> None:
        if validate is not None:
            validate(num_tasks, hparams)
        checks.check_choice(name, "base_form", hparams["base_form"], BASE_FORMS)
        if hparams["base"] is not None and hparams["base_form"] == "residual":
            resolve_residual_base(name, hparams["base"], hparams["base_hparams"], num_tasks)
        else:
            resolve_base(name, hparams["base"], hparams["base_hparams"], num_tasks)

    register_method(name, kind="learned", defaults={**LEARN_ON_TOP_DEFAULTS, **defaults}, description=description,
                    validate=validate_with_base, build=builder)


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
        # The paper's AdaMerging++ learns over the TIES-trimmed per-task vectors: the split form.
        {**ADAMERGING_DEFAULTS, "base": "ties", "base_hparams": {"top_k": 0.2, "scope": "model"}, "base_form": "split"},
        f"AdaMerging++: {_granularity.replace('_', '-')} AdaMerging over TIES-trimmed task vectors",
        _adamerging_validator(f"adamerging_{_granularity}_plus_plus"),
    )

# Layer-wise AdaMerging on top of the data-free Iso-CTS in the residual form -- it starts exactly at Iso-CTS and learns
# per-layer corrections, so it cannot start below it. The recommended merge where the model is too large for a
# per-element mask (it streams: modelpool.streaming; it shards: trainer=fsdp); elsewhere
# concrete_task_arithmetic_on_iso_cts learned better on every study zoo (bench/learned_study.py).
register_learned(
    "adamerging_layer_wise_on_iso_cts",
    _adamerging_builder("layer_wise"),
    {**ADAMERGING_DEFAULTS, "base": "iso_cts", "base_form": "residual"},
    "Layer-wise AdaMerging on top of Iso-CTS: θ0 + a_l·(Iso-CTS − θ0)_l + Σ_k c_{k,l} τ_{k,l}, from a = 1, c = 0",
    _adamerging_validator("adamerging_layer_wise_on_iso_cts"),
)


def build_learned(
    name: str,
    backbone: nn.Module,
    task_vectors: TaskVectors,
    heads: Mapping[str, nn.Module],
    objective: Objective | None = None,
    alignment: AlignmentVector | None = None,
    **hparams: Any,
) -> AdaMergingModule:
    """The LightningModule that learns method ``name`` (hyperparameters checked against the registry).

    ``objective`` is what it minimises on the unlabeled batches (default: the paper's entropy); any
    objective composes with any learned method. ``alignment`` (:mod:`adamerge.training.alignment`) is merged as one more
    task vector, after ``base``, with its own starting coefficient and a floor. Protected tasks are added to the
    returned module with ``module.protect(...)``.
    """
    spec = get_method(name)
    if spec.kind != "learned":
        raise ValueError(f"method {name!r} is data-free; use adamerge.merge() for it")
    hparams = spec.resolve_hparams(hparams)
    resolved = dict(hparams)
    base, base_form = hparams.pop("base"), hparams.pop("base_form")
    residual = base is not None and base_form == "residual"
    if residual:  # θ0 + a·(θ_base − θ0) + Σ c_k τ_k: a starts at 1, the corrections c at 0 (adamerge/methods/learned/bases.py)
        base_hparams = resolve_residual_base(name, base, hparams.pop("base_hparams"), task_vectors.num_tasks)
        task_vectors = with_residual_base(task_vectors, base, base_hparams)
        hparams["init_value"] = [0.0] * (task_vectors.num_tasks - 1) + [1.0]
    else:
        base_hparams = resolve_base(name, base, hparams.pop("base_hparams"), task_vectors.num_tasks)
        task_vectors = apply_base(task_vectors, base, base_hparams)
    if alignment is not None:
        hparams["init_value"] = alignment.initial_coefficients(hparams["init_value"], task_vectors.num_tasks)
        task_vectors = alignment.appended_to(task_vectors)
    module = spec.build(backbone, task_vectors, heads, objective=objective, **hparams)
    if residual and module.merged.clamp is not None:
        module.merged.clamp = RESIDUAL_BOUNDS["corrections"]
        module.merged.set_coefficient_bounds(BASE_MERGE, *RESIDUAL_BOUNDS["base_scale"])
    if alignment is not None:
        module.merged.set_coefficient_floor(ALIGNMENT_TASK, alignment.min_coefficient)
    # What its export records (adamerge.export.from_run.export_learned): the method, every hyperparameter, the alignment vector.
    module.method_name, module.method_hyperparameters, module.alignment = name, resolved, alignment
    return module


def build_learned_module(
    pool: ModelPool,
    method: str,
    objective: str | Mapping[str, Any] | Objective = "weighted_sum",
    *,
    datamodule: Any = None,
    task_vectors: TaskVectors | None = None,
    alignment: AlignmentVector | None = None,
    heads: Any = None,
    **hyperparameters: Any,
) -> AdaMergingModule:
    """The LightningModule that learns ``method`` on ``pool``, for a Lightning ``Trainer`` of the caller's own.

    ``objective``: a registered name (the command's default, ``weighted_sum``: expert_kl + 0.5 · information_maximization), ``{"name": ..., **settings}`` or an
    :class:`~adamerge.objectives.Objective`. ``hyperparameters`` override the method's documented defaults
    (``conf/method/<method>.yaml``). ``datamodule``: the data it will be fitted on; given, each task's expert runs once
    over its rows here (adamerge.objectives.expert_targets), for an expert-matching objective and the agreement signal -- an
    objective that compares with the experts needs it. ``task_vectors``: the pool's, when already loaded (the command
    loads them once for every method it runs); else all of the pool's tasks are loaded here. ``heads``: ``"frozen"``
    (default: each task keeps its fine-tuned head), ``"adapt"``, ``{"mode": "adapt", "confidence_threshold": ...,
    "schedule": "after" | "together", ...}`` or a :class:`~adamerge.training.heads_config.HeadSettings`: each task's
    head is re-learned on its expert's confident predictions (:mod:`adamerge.training.adapted_heads`) during ``fit``.
    Fit it with ``trainer.fit(module, datamodule=...)``, then export it with :func:`adamerge.export_learned`.
    """
    if isinstance(objective, str):
        objective = build_objective(objective)
    elif isinstance(objective, Mapping):
        objective = build_objective(**objective)
    vectors = task_vectors if task_vectors is not None else pool.task_vectors()
    # The merged model never writes its module's parameters: θ0 is the pool's own, not a second copy.
    module = build_learned(method, pool.shared_backbone(), vectors, pool.heads, objective=objective, alignment=alignment,
                           **hyperparameters)
    if datamodule is not None:
        from adamerge.objectives.expert_targets import ExpertTargets

        datamodule.setup("fit")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from adamerge.methods.learned.merged_streamed import expert_backbones

        module.use_experts(ExpertTargets.for_objective(pool, vectors, datamodule, device, objective,
                                                       backbone=expert_backbones(pool, vectors),
                                                       logits=head_settings(heads).adapt))
    attach(module, heads, datamodule)  # heads: adapt -- per-task copies of the heads that learn; frozen: nothing
    return module


def learned_outcome(module: AdaMergingModule) -> dict[str, Any]:
    """What a fitted learned module measured, as its results and its export record it: the accuracy of its last
    validation, the learned coefficients, the objective, the protected tasks' scores and the adapted heads' report."""
    outcome = {"accuracy": dict(module.last_accuracy), "coefficients": module.coefficients(),
               "objective": module.objective.config()}
    if module.merged.task_names != module.task_names:  # the tasks, then an alignment vector
        outcome["coefficient_columns"] = list(module.merged.task_names)
    if module.protection is not None:
        outcome["protected"] = module.protection.report()
    if module.evaluations and module.evaluations[-1].get("expert_agreement"):
        outcome["expert_agreement"] = dict(module.evaluations[-1]["expert_agreement"])
    if module.adapted_heads is not None:  # heads: adapt -- kept pseudo-label shares and the heads' losses
        outcome[REPORT_KEY] = module.adapted_heads.report()
    return outcome
