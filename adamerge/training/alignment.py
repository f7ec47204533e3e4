"""An alignment vector in the merge: ``aligned − base`` as one more task vector whose coefficient has a floor.

MergeAlign (Thakkar et al. 2024) keeps a model's alignment through a merge by merging its alignment vector (an
instruct / safety-tuned model minus its base) along with the experts. Here it is appended to a learned method's task
vectors as an extra, *unscored* task -- no head, no data, no objective term: its coefficient starts at ``init_value``
and is clamped to at least ``min_coefficient`` after every optimizer step (AdaMerging's [0, 1] clamp, where it is
on, still bounds it above). It is appended after ``method.base`` has processed the experts' vectors, whole (TIES or
DARE never trim it), and under AdaRank its singular-component mask is held at its initial value; the Concrete
methods' mask is shared by every vector by construction, so it scales this one too. Data-free merges add it at
``init_value`` to their result; ``pretrained`` and ``individual`` stay the unmerged references.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from adamerge.errors import ConfigError
from adamerge.pool.checkpoints import describe_source
from adamerge.pool.task_vectors import TaskVectors

ALIGNMENT_TASK = "alignment"
ALIGNMENT_DEFAULTS: dict[str, Any] = {"aligned": None, "base": None, "init_value": 1.0, "min_coefficient": 0.5}


def check_alignment_settings(settings: Mapping[str, Any]) -> None:
    """``protected.alignment``: known keys, an aligned checkpoint, and ``0 <= min_coefficient <= init_value``."""
    unknown = sorted(set(settings) - set(ALIGNMENT_DEFAULTS))
    if unknown:
        raise ConfigError(f"protected.alignment has unknown setting(s) {unknown}; allowed: {sorted(ALIGNMENT_DEFAULTS)}")
    values = {**ALIGNMENT_DEFAULTS, **settings}
    if not values["aligned"]:
        raise ConfigError("protected.alignment.aligned is missing: the aligned (instruct / safety-tuned) checkpoint")
    for key in ("init_value", "min_coefficient"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ConfigError(f"protected.alignment.{key}={value!r} is invalid: it must be a finite number >= 0")
    if values["init_value"] < values["min_coefficient"]:
        raise ConfigError(f"protected.alignment.init_value={values['init_value']} is below its own floor "
                          f"min_coefficient={values['min_coefficient']}")


@dataclass(frozen=True)
class AlignmentSettings:
    """``protected.alignment``, validated: the aligned checkpoint, the base it was tuned from (None: the pool's
    pretrained model), and where its coefficient starts and its floor."""

    aligned: Any
    base: Any = None
    init_value: float = 1.0
    min_coefficient: float = 0.5

    @classmethod
    def parse(cls, settings: Mapping[str, Any]) -> AlignmentSettings:
        """The node's settings checked (:func:`check_alignment_settings`), defaults filled in."""
        check_alignment_settings(settings)
        values = {**ALIGNMENT_DEFAULTS, **settings}
        return cls(values["aligned"], values["base"], values["init_value"], values["min_coefficient"])


@dataclass
class AlignmentVector:
    """``vectors[name]`` = aligned − base for every merged tensor, and how its coefficient starts and is bounded."""

    vectors: dict[str, Tensor]
    init_value: float = 1.0
    min_coefficient: float = 0.5
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_alignment_settings({"aligned": self.sources.get("aligned", "given"), "init_value": self.init_value,
                                  "min_coefficient": self.min_coefficient})

    def appended_to(self, task_vectors: TaskVectors) -> TaskVectors:
        if ALIGNMENT_TASK in task_vectors.task_names:
            raise ConfigError(f"a pool task is named {ALIGNMENT_TASK!r}, the name the alignment vector takes: rename it")
        return task_vectors.with_task(ALIGNMENT_TASK, self.vectors, scored=False)

    def initial_coefficients(self, init_value: float | Sequence[float], num_tasks: int) -> list[float]:
        """A learned method's ``init_value`` (one value, or one per task) with the alignment vector's appended."""
        per_task = [float(v) for v in init_value] if isinstance(init_value, Sequence) else [float(init_value)] * num_tasks
        return [*per_task, float(self.init_value)]

    def added_to(self, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A data-free merge's ``θ − θ0`` with the alignment vector added at ``init_value``."""
        return {name: delta + self.init_value * self.vectors[name].to(delta.dtype) if name in self.vectors else delta
                for name, delta in deltas.items()}

    def config(self) -> dict[str, Any]:
        return {"sources": dict(self.sources), "init_value": self.init_value, "min_coefficient": self.min_coefficient}


def load_alignment_vector(pool: Any, aligned: Any, base: Any = None, init_value: float = 1.0,
                          min_coefficient: float = 0.5) -> AlignmentVector:
    """``aligned − base`` (``base`` defaults to the pool's pretrained model) over the pool's merged tensors, both
    checkpoints validated against θ0 like fine-tuned ones."""
    sources = {"aligned": aligned, **({"base": base} if base is not None else {})}
    vectors = pool.vectors_of(sources)
    aligned_vector = vectors.task_vector("aligned")
    if base is not None:
        base_vector = vectors.task_vector("base")
        aligned_vector = {name: value - base_vector[name] for name, value in aligned_vector.items()}
    described = {role: describe_source(source) for role, source in sources.items()}
    return AlignmentVector(aligned_vector, float(init_value), float(min_coefficient), described)


def load_alignment(pool: Any, settings: AlignmentSettings | None) -> AlignmentVector | None:
    """The alignment vector ``settings`` describe (None: none) loaded against ``pool``."""
    if settings is None:
        return None
    return load_alignment_vector(pool, settings.aligned, settings.base, settings.init_value, settings.min_coefficient)
