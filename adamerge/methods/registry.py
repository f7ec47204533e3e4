"""Merge methods by name.

Every method -- the data-free ones in :mod:`adamerge.methods.data_free.static` and the learned ones that
need test data and the trainer -- is registered here with all of its hyperparameters and their
defaults, so the Hydra group ``conf/method/`` can mirror the registry one file per name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from torch import Tensor

from adamerge.errors import ConfigError


class UnknownHyperparameterError(ConfigError, TypeError):
    """A method was given a hyperparameter it does not have (a ``TypeError`` too, like a bad keyword)."""


MethodKind = Literal["static", "learned"]
METHOD_KINDS: tuple[str, ...] = ("static", "learned")

# fn(task_vectors, **hparams) -> {tensor name: float32 delta}, so that θ = θ0 + delta.
StaticMethodFn = Callable[..., dict[str, Tensor]]
# validate(num_tasks, hparams) raises ValueError naming the method, parameter and value.
HparamValidator = Callable[[int, Mapping[str, Any]], None]
# build(backbone, task_vectors, heads, *, objective, **hparams) -> the LightningModule that learns the merge.
LearnedBuilder = Callable[..., Any]


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its hyperparameters with defaults and, for static methods, the function; for learned ones,
    what builds the module that learns it (``adamerge.methods.learned.adamerging.build_learned`` calls it)."""

    name: str
    kind: MethodKind
    defaults: Mapping[str, Any]
    fn: StaticMethodFn | None
    description: str
    # Checks hyperparameter values before any checkpoint is loaded, so a typo in a range fails
    # in milliseconds rather than after reading K large checkpoints.
    validate: HparamValidator | None = field(default=None, compare=False)
    build: LearnedBuilder | None = field(default=None, compare=False)

    def resolve_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """The defaults overridden by ``hparams``; unknown names raise TypeError."""
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise UnknownHyperparameterError(
                f"method {self.name!r} got unknown hyperparameter(s) {', '.join(unknown)}; "
                f"allowed: {allowed}"
            )
        return {**self.defaults, **hparams}


_REGISTRY: dict[str, MethodSpec] = {}


def defaults_from_signature(fn: Callable[..., Any]) -> dict[str, Any]:
    """The keyword-only parameters of ``fn`` with their defaults: a static method's hyperparameters."""
    parameters = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is p.KEYWORD_ONLY}


def register_method(
    name: str,
    *,
    kind: MethodKind = "static",
    defaults: Mapping[str, Any] | None = None,
    description: str = "",
    validate: HparamValidator | None = None,
    build: LearnedBuilder | None = None,
) -> Callable[[Any], Any]:
    """Register a merge method under ``name``; raises ValueError if the name is taken.

    Static methods decorate their function, ``fn(task_vectors, **hparams) -> deltas``; without
    ``defaults`` its keyword-only parameters and their defaults are the hyperparameters. Learned
    methods are run by the trainer and have no function here: ``register_method(name,
    kind="learned", defaults=..., build=...)`` registers them at once (``build`` makes the module that
    learns them), and the decorator it returns hands back whatever it decorates untouched.
    """
    if kind not in METHOD_KINDS:
        raise ValueError(f"method {name!r}: kind must be one of {METHOD_KINDS}, got {kind!r}")
    if build is not None and kind != "learned":
        raise ValueError(f"method {name!r}: only a learned method has a build function")

    def add(fn: StaticMethodFn | None) -> None:
        if name in _REGISTRY:
            raise ValueError(f"a merge method named {name!r} is already registered")
        docstring = (fn.__doc__ or "") if fn is not None else ""
        hparams = defaults if defaults is not None or fn is None else defaults_from_signature(fn)
        _REGISTRY[name] = MethodSpec(
            name=name,
            kind=kind,
            defaults=MappingProxyType(dict(hparams or {})),
            fn=fn,
            description=description or docstring.strip().split("\n", 1)[0],
            validate=validate,
            build=build,
        )

    if kind == "learned":
        add(None)
        return lambda obj: obj

    def decorator(fn: StaticMethodFn) -> StaticMethodFn:
        if not callable(fn):
            raise ValueError(f"static method {name!r} needs a function, got {fn!r}")
        add(fn)
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:  # only a miss pays for importing every method module
        _ensure_builtin_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown merge method {name!r}; available: {', '.join(available_methods())}")
    return _REGISTRY[name]


def available_methods(kind: str | None = None) -> list[str]:
    _ensure_builtin_methods()
    if kind is not None and kind not in METHOD_KINDS:
        raise ValueError(f"kind must be one of {METHOD_KINDS} or None, got {kind!r}")
    return sorted(name for name, spec in _REGISTRY.items() if kind is None or spec.kind == kind)


# Modules whose import registers methods. Importing them lazily, on the first lookup, lets a
# caller import only the registry and still see every method, without circular imports.
BUILTIN_METHOD_MODULES: tuple[str, ...] = (
    "adamerge.methods.data_free.static",
    "adamerge.methods.data_free.pcb",
    "adamerge.methods.data_free.tsv",
    "adamerge.methods.data_free.isotropic",
    "adamerge.methods.data_free.wudi",
    "adamerge.methods.data_free.reference",
    "adamerge.methods.learned.adamerging",
    "adamerge.methods.learned.concrete",
    "adamerge.methods.learned.concrete_adamerging",
    "adamerge.methods.learned.adarank",
    "adamerge.methods.learned.progressive",
)


def _ensure_builtin_methods() -> None:
    for module in BUILTIN_METHOD_MODULES:
        importlib.import_module(module)
