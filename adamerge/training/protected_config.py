"""Protected tasks and the alignment vector from the ``protected`` config group (``conf/protected/``).

The group's node::

    tasks:                      # name -> one protected task (adamerge.training.protected)
      digits:
        data: {path: ..., split: train}   # a task's data as in data.tasks (any format; preprocessor: data's)
        max_samples: 64                   # a seeded subset, kept whole in memory
        loss: cross_entropy               # or kl (unlabeled inputs against a reference model)
        reference: null                   # start | pretrained | <pool task> | <checkpoint>; null: see below
        head: null                        # null: the pool task of the same name's head; a pool task name; {_target_}
        mode: constraint                  # or penalty
        weight: 1.0                       # β (penalty)
        budget: 0.05                      # ε (constraint), in the loss's units (nats)
        dual_lr: 10.0                     # η of μ's dual ascent
        initial_multiplier: 0.0
        batch_size: 16
        kl_direction: merged_to_reference
        refusal: null                     # causal LMs: {prompts, max_samples, max_new_tokens, guard, batch_size}
    alignment: null             # {aligned, base, init_value, min_coefficient} (adamerge.training.alignment)

A ``null`` reference is ``start`` for cross-entropy and, for KL, the task's own fine-tuned checkpoint when the
task is one of the pool's (a KL task outside the pool must name its reference).

:func:`parse_protected` validates the node -- as composed (strings, ``_target_`` mappings) before anything loads,
or instantiated -- into a :class:`ProtectedSettings`; :func:`build_protected_tasks` builds the tasks from one.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from adamerge.data.datamodule import MultiTaskDataModule
from adamerge.data.tasks import TaskData, seeded_subset
from adamerge.errors import ConfigError
from adamerge.methods.checks import is_count
from adamerge.pool.checkpoints import CheckpointError, looks_like_path
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.alignment import AlignmentSettings
from adamerge.training.protected import PROTECTED_DEFAULTS, START, ProtectedTask, check_protected_settings

TASK_SETTINGS = {*PROTECTED_DEFAULTS, "data", "max_samples", "reference", "head", "refusal"}
REFUSAL_DEFAULTS: dict[str, Any] = {"prompts": None, "max_samples": 64, "max_new_tokens": 48, "guard": None,
                                    "batch_size": 16}
MAX_SAMPLES = 512  # default size of a protected set: "a small labelled set", kept whole in memory
PRETRAINED = "pretrained"


def _check_path(key: str, value: Any) -> None:
    if isinstance(value, str) and looks_like_path(value) and not os.path.exists(os.path.expanduser(value)):
        raise CheckpointError(f"{key}={value!r}: no such file or directory")


@dataclass(frozen=True)
class RefusalSettings:
    """``protected.tasks.<name>.refusal``: how often a causal LM refuses the task's prompts (or ``prompts``, another
    dataset), answering greedily with up to ``max_new_tokens`` tokens; ``guard`` judges an answer safe."""

    prompts: Mapping[str, Any] | None = None
    max_samples: int = 64
    max_new_tokens: int = 48
    guard: Any = None
    batch_size: int = 16


@dataclass(frozen=True)
class ProtectedTaskSettings:
    """One protected task's settings (the keys of the node above): its data, the size of its subset, its reference
    and head (a name, a path or an instantiated module), the refusal check, and ``terms`` -- the loss and how it
    enters each step (:data:`~adamerge.training.protected.PROTECTED_DEFAULTS`: only the keys given)."""

    name: str
    data: Mapping[str, Any]
    max_samples: int | None = MAX_SAMPLES
    reference: Any = None
    head: Any = None
    refusal: RefusalSettings | None = None
    terms: Mapping[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> str:
        return self.terms.get("loss", PROTECTED_DEFAULTS["loss"])


@dataclass(frozen=True)
class ProtectedSettings:
    """The ``protected`` group: the protected tasks and the alignment vector (None: none)."""

    tasks: tuple[ProtectedTaskSettings, ...] = ()
    alignment: AlignmentSettings | None = None


def parse_protected(node: Mapping[str, Any] | None, pool_tasks: Collection[str]) -> ProtectedSettings:
    """Every protected task's and the alignment vector's settings, checked from the node alone (before loading);
    ``pool_tasks`` are the pool's task names, which a reference may name."""
    node = node or {}
    unknown = sorted(set(node) - {"tasks", "alignment"})
    if unknown:
        raise ConfigError(f"protected has unknown key(s) {unknown}; it holds 'tasks' and 'alignment'")
    pool_tasks = set(pool_tasks)
    tasks = []
    for name, spec in (node.get("tasks") or {}).items():
        where = f"protected.tasks.{name}"
        if not isinstance(spec, Mapping):
            raise ConfigError(f"{where} must be a mapping of settings, got {spec!r}")
        if unknown := sorted(set(spec) - TASK_SETTINGS):
            raise ConfigError(f"{where} has unknown setting(s) {unknown}; allowed: {sorted(TASK_SETTINGS)}")
        terms = {key: spec[key] for key in PROTECTED_DEFAULTS if key in spec}
        check_protected_settings(name, terms)
        data = spec.get("data")
        if not isinstance(data, Mapping) or not data.get("path"):
            raise ConfigError(f"{where}.data must give the protected set's path (data: {{path: ...}}), got {data!r}")
        _check_path(f"{where}.data.path", data["path"])
        if unknown_data := sorted(set(data) - {f for f in TaskData.__dataclass_fields__ if f != "name"}):
            raise ConfigError(f"{where}.data has unknown field(s) {unknown_data}")
        if spec.get("max_samples") is not None and not is_count(spec["max_samples"], minimum=1):
            raise ConfigError(f"{where}.max_samples={spec['max_samples']!r} is invalid: an integer >= 1, or null")
        reference = spec.get("reference")
        if spec.get("loss", "cross_entropy") == "kl" and reference is None and name not in pool_tasks:
            raise ConfigError(f"{where}.reference is needed: loss=kl compares the merge with a reference model, and "
                              f"{name!r} is no pool task to default to (give start, pretrained, a pool task or a path)")
        if reference not in (None, START, PRETRAINED) and reference not in pool_tasks:
            _check_path(f"{where}.reference", reference)
        tasks.append(ProtectedTaskSettings(
            name=name, data=dict(data), max_samples=spec.get("max_samples", MAX_SAMPLES), reference=reference,
            head=spec.get("head"), refusal=_parse_refusal(where, spec.get("refusal")), terms=terms))
    alignment = None
    if node.get("alignment"):
        alignment = AlignmentSettings.parse(node["alignment"])
        for key in ("aligned", "base"):
            _check_path(f"protected.alignment.{key}", getattr(alignment, key))
    return ProtectedSettings(tuple(tasks), alignment)


def _parse_refusal(where: str, refusal: Any) -> RefusalSettings | None:
    if refusal is None:
        return None
    if not isinstance(refusal, Mapping):
        raise ConfigError(f"{where}.refusal must be null or a mapping with keys {sorted(REFUSAL_DEFAULTS)}, got {refusal!r}")
    if unknown := sorted(set(refusal) - set(REFUSAL_DEFAULTS)):
        raise ConfigError(f"{where}.refusal has unknown setting(s) {unknown}; allowed: {sorted(REFUSAL_DEFAULTS)}")
    for key in ("max_samples", "max_new_tokens", "batch_size"):
        if key in refusal and not is_count(refusal[key], minimum=1):
            raise ConfigError(f"{where}.refusal.{key}={refusal[key]!r} is invalid: it must be an integer >= 1")
    return RefusalSettings(**{**REFUSAL_DEFAULTS, **refusal}) if refusal else None  # {}: no refusal check


def reference_spec(name: str, spec: Any, loss: str, task_vectors: TaskVectors) -> Any:
    """The reference a task names, its default filled in: for KL the pool task of the same name, else ``start``."""
    if spec is not None:
        return spec
    return name if loss == "kl" and name in task_vectors.task_names else START


def resolve_reference(name: str, spec: Any, loss: str, pool: Any, task_vectors: TaskVectors) -> nn.Module | str:
    """``start``, or a frozen backbone: ``pretrained`` (θ0), a pool task's fine-tuned model, or a checkpoint."""
    spec = reference_spec(name, spec, loss, task_vectors)
    if spec == START:
        return START
    if spec == PRETRAINED:
        return pool.fresh_backbone().eval().requires_grad_(False)
    if spec in task_vectors.task_names:
        return pool.backbone_with(task_vectors, spec).requires_grad_(False)
    try:
        return pool.backbone_from(spec)
    except CheckpointError as error:
        raise CheckpointError(f"protected.tasks.{name}.reference: {error}") from error


def _shared_reference(built: dict, name: str, spec: Any, loss: str, pool: Any, task_vectors: TaskVectors) -> Any:
    """:func:`resolve_reference`, built once per distinct reference and reused."""
    key = reference_spec(name, spec, loss, task_vectors)
    if not isinstance(key, str):
        return resolve_reference(name, key, loss, pool, task_vectors)
    if key not in built:
        built[key] = resolve_reference(name, spec, loss, pool, task_vectors)
    return built[key]


def resolve_head(name: str, spec: Any, pool: Any) -> nn.Module:
    """The head scoring a protected task: a module (an instantiated ``_target_``), or a pool task's head by name
    (default: the task of the same name)."""
    if isinstance(spec, nn.Module):
        return spec
    task = name if spec is None else spec
    if task not in pool.heads:
        raise ConfigError(f"protected.tasks.{name}.head: no pool task {task!r} to take the head of (pool tasks: "
                          f"{sorted(pool.heads)}); give a head config, e.g. {{_target_: adamerge.backbones.heads.Identity}} "
                          "for causal LMs")
    return pool.heads[task]


def _task_data(name: str, data: Mapping[str, Any], preprocessor: Any, seed: int) -> MultiTaskDataModule:
    data = {"split": "train", **data}
    module = MultiTaskDataModule({name: data}, preprocessor=preprocessor, seed=seed)
    module.setup()
    return module


def build_refusal_check(name: str, spec: RefusalSettings, data: MultiTaskDataModule, seed: int) -> Any:
    """The task's :class:`~adamerge.training.safety.RefusalCheck`: greedy answers to its prompts (or ``spec.prompts``,
    another dataset), rendered by its ChatPreprocessor without the responses."""
    from adamerge.training.safety import ChatPreprocessor, RefusalCheck, resolve_guard

    preprocessor = data.tasks[name].preprocessor or data.preprocessor
    if not isinstance(preprocessor, ChatPreprocessor):
        raise ConfigError(f"protected.tasks.{name}.refusal needs prompts for a causal LM: its data's preprocessor must "
                          f"be adamerge.training.safety.ChatPreprocessor, got {type(preprocessor).__name__}")
    prompts = preprocessor.prompt_only()
    source = data
    if spec.prompts is not None:
        source = _task_data(name, {**spec.prompts, "preprocessor": prompts}, None, seed)
    rows = seeded_subset(source.raw_splits(name)[0], spec.max_samples, seed)
    missing = [c for c in prompts.required_columns if c not in rows.column_names]
    if missing:
        raise ConfigError(f"protected.tasks.{name}.refusal.prompts: no column {missing}; columns: {rows.column_names}")
    return RefusalCheck(prompts=[str(p) for p in rows[prompts.text_column]], inputs=prompts(rows[:])["inputs"],
                        tokenizer=prompts._tokenizer(), max_new_tokens=int(spec.max_new_tokens),
                        guard=resolve_guard(spec.guard, f"protected.tasks.{name}.refusal.guard"),
                        batch_size=int(spec.batch_size))


def build_protected_tasks(settings: ProtectedSettings, pool: Any, task_vectors: TaskVectors, preprocessor: Any,
                          seed: int = 0) -> list[ProtectedTask]:
    """The protected tasks of ``settings`` (parsed from the instantiated node: ``_target_`` entries already built):
    data loaded and encoded, heads and reference models resolved against ``pool`` and its raw ``task_vectors``.
    ``preprocessor`` is the run data's, used where a protected set gives none."""
    tasks, references = [], {}  # two tasks naming the same reference share one frozen model
    for spec in settings.tasks:
        name, loss = spec.name, spec.loss
        data = _task_data(name, spec.data, preprocessor, seed)
        encoded = data.encode_all(name, spec.max_samples)
        refusal = build_refusal_check(name, spec.refusal, data, seed) if spec.refusal is not None else None
        tasks.append(ProtectedTask(
            name=name, inputs=encoded["inputs"], labels=encoded.get("labels") if loss == "cross_entropy" else None,
            head=resolve_head(name, spec.head, pool),
            reference=_shared_reference(references, name, spec.reference, loss, pool, task_vectors),
            refusal=refusal, **spec.terms,
        ))
    return tasks
