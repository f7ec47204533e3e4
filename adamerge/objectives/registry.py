"""The objectives' registry and their base class: what every label-free test-time objective is.

An objective maps one task's logits (``[N, C]``, or ``[N, T, V]`` per token for causal LMs with a padding mask) to
a scalar loss; learned methods sum it over tasks. Each registers under its ``name`` (:func:`register_objective`),
mirrored one file per name by the Hydra group ``conf/objective/``; :func:`build_objective` builds one by name.
The built-in ones live in :mod:`adamerge.objectives.label_free` and :mod:`adamerge.objectives.expert`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from adamerge.errors import AdamergeError


class ObjectiveError(AdamergeError, ValueError):
    """An objective cannot be used as configured or on these logits; the message names both."""


@dataclass(frozen=True)
class ExpertOutputs:
    """What a task's fine-tuned model (its expert) gives on the inputs of one batch, computed once before learning
    (adamerge/objectives/expert_targets.py): its logits and its backbone features, each None when no objective needs it,
    and its arg-max predictions (all the agreement signal reads: kept instead of the logits when nothing else needs
    them -- one integer per example or token rather than one value per class)."""

    logits: Tensor | None = None
    features: Tensor | None = None
    predictions: Tensor | None = None


class Objective(ABC):
    """A label-free loss over one task's logits. Subclasses register under ``name``."""

    name: ClassVar[str]
    per_token: ClassVar[bool] = True  # defined for [N, T, V] logits of causal LMs
    # What of the task's expert the loss reads ("logits", "features"); empty: the merged model's logits alone.
    expert_needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, normalize: bool = False) -> None:
        self.normalize = bool(normalize)

    @property
    def needs(self) -> frozenset[str]:
        """The expert outputs this objective reads (an instance property: a weighted sum unites its terms')."""
        return self.expert_needs

    def __call__(self, logits: Tensor, mask: Tensor | None = None, *, features: Tensor | None = None,
                 expert: ExpertOutputs | None = None) -> Tensor:
        """The loss of one task's batch; ``mask`` marks the valid positions of per-token logits, ``features`` are the
        merged backbone's outputs (what the head reads) and ``expert`` the task's expert outputs on the same inputs."""
        if logits.ndim < 2:
            raise ObjectiveError(f"objective {self.name!r} needs logits of shape [N, C] or [N, T, V], got {tuple(logits.shape)}")
        if logits.ndim > 2 and not self.per_token:
            raise ObjectiveError(
                f"objective {self.name!r} is not defined for per-token logits {tuple(logits.shape)} "
                "(a causal language model): use objective=entropy, confident_entropy or expert_kl"
            )
        for need in sorted(self.needs):
            if expert is None or getattr(expert, need) is None:
                raise ObjectiveError(f"objective {self.name!r} compares with each task's expert and needs the expert's "
                                     f"{need} on this batch, but none were given")
        if "features" in self.needs and features is None:
            raise ObjectiveError(f"objective {self.name!r} needs the merged backbone's features, but none were given")
        return self.loss(logits, mask, features=features, expert=expert)

    @abstractmethod
    def loss(self, logits: Tensor, mask: Tensor | None, *, features: Tensor | None = None,
             expert: ExpertOutputs | None = None) -> Tensor: ...

    def config(self) -> dict[str, Any]:
        """Name and settings, for results files and the export's merge_config.json."""
        return {"name": self.name, **{k: v for k, v in vars(self).items() if not k.startswith("_")}}

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({settings})"


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(cls: type[Objective]) -> type[Objective]:
    """Register an objective class under its ``name`` (mirrored by ``conf/objective/<name>.yaml``)."""
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as ``name``; an unknown name raises ObjectiveError listing the registered ones."""
    if name not in OBJECTIVES:
        raise ObjectiveError(f"unknown objective {name!r}; registered: {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


def available_objectives() -> list[str]:
    return sorted(OBJECTIVES)


def build_objective(name: str = "entropy", **settings: Any) -> Objective:
    """The objective registered as ``name`` with ``settings``; unknown names or settings raise ObjectiveError."""
    objective = get_objective(name)
    try:
        return objective(**settings)
    except TypeError as error:
        raise ObjectiveError(f"objective {name!r}: {error}") from None
