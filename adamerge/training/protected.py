"""Protected tasks: what a learned merge must keep while it minimises its label-free objective.

A protected task is a small set scored by a loss the merge must not raise:

- ``cross_entropy``: labelled examples -- a class per example, or next-token targets with ``-100`` where nothing
  is scored (a causal LM's safety set scores its response tokens only, see :mod:`adamerge.training.safety`);
- ``kl``: unlabeled inputs scored by ``KL(p_merged ‖ p_reference)`` per example (or per unpadded token of a
  causal LM) against a reference model; ``kl_direction=reference_to_merged`` takes ``KL(p_reference ‖ p_merged)``.

Each task enters every learning step in one of two modes, with ``L`` its loss on that step's protected batch:

- ``penalty``: ``β · L`` (``weight`` β);
- ``constraint``: ``μ · max(0, L − L_ref − ε)`` (``budget`` ε); after every step the multiplier is updated by dual
  ascent, ``μ ← max(0, μ + η · (L − L_ref − ε))`` (``dual_lr`` η, ``initial_multiplier`` μ₀).

``L_ref`` is the protected loss of the task's *reference* model on the whole protected set, measured once before
the first step: for ``kl`` it is 0 by definition (the reference against itself), so the constraint reads
``KL ≤ ε``; for ``cross_entropy`` it is the reference's cross-entropy on the set. The reference is ``start`` (the
merge the learned method starts from: "learning may not raise this loss by more than ε"), ``pretrained``, one of
the pool's fine-tuned checkpoints, or any other checkpoint (an aligned model).

Protected data never enters the label-free objective: it is drawn from its own seeded stream and scored only by its
protected loss. Reports (per task, for the reference, the starting merge and the learned merge): the loss, and
the accuracy (``cross_entropy``) or the share of predictions that agree with the reference (``kl``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adamerge.data.batches import to_device
from adamerge.errors import ConfigError
from adamerge.methods import checks
from adamerge.objectives import at_least_float32
from adamerge.training.evaluation import IGNORE_INDEX, count_correct
from adamerge.training.task_batching import batch_size

PROTECTED_LOSSES = ("cross_entropy", "kl")
MODES = ("penalty", "constraint")
KL_DIRECTIONS = ("merged_to_reference", "reference_to_merged")
START = "start"  # the reference that is the learned method's own starting merge
STAGES = ("reference", "start", "end")

# Settings of a protected task that are plain values, with their defaults (the config group mirrors them).
PROTECTED_DEFAULTS: dict[str, Any] = {
    "loss": "cross_entropy",
    "mode": "penalty",
    "weight": 1.0,
    "budget": None,
    "dual_lr": 10.0,
    "initial_multiplier": 0.0,
    "batch_size": 16,
    "kl_direction": "merged_to_reference",
}


def check_protected_settings(name: str, settings: Mapping[str, Any]) -> None:
    """Loss, mode, weight / budget, dual step and batch size of protected task ``name`` (ConfigError naming them)."""
    where = f"protected.tasks.{name}"
    values = {**PROTECTED_DEFAULTS, **settings}
    for key, choices in (("loss", PROTECTED_LOSSES), ("mode", MODES), ("kl_direction", KL_DIRECTIONS)):
        if values[key] not in choices:
            raise ConfigError(f"{where}.{key}={values[key]!r} is invalid: use one of {', '.join(choices)}")
    numbers = {"weight": values["weight"], "dual_lr": values["dual_lr"], "initial_multiplier": values["initial_multiplier"]}
    if values["mode"] == "constraint" or values["budget"] is not None:
        numbers["budget"] = values["budget"]
    for key, value in numbers.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            hint = " (constraint mode needs a budget ε)" if key == "budget" and value is None else ""
            raise ConfigError(f"{where}.{key}={value!r} is invalid: it must be a finite number >= 0{hint}")
    if values["dual_lr"] == 0 and values["mode"] == "constraint":
        raise ConfigError(f"{where}.dual_lr=0 is invalid in constraint mode: the multiplier would never move")
    if not checks.is_count(values["batch_size"], minimum=1):
        raise ConfigError(f"{where}.batch_size={values['batch_size']!r} is invalid: it must be an integer >= 1")


@dataclass
class ProtectedTask:
    """One thing a merge must keep: a small set, its head, its loss, its reference and how it enters the step.

    ``inputs`` are the whole set as one batch (a tensor ``[N, ...]`` or a mapping of ``[N, ...]`` tensors, e.g.
    tokenised text); ``labels`` ``[N]`` or ``[N, T]`` (``-100``: not scored) for ``cross_entropy``. ``reference``
    is ``"start"`` or a frozen backbone module (see :mod:`adamerge.training.protected_config` for building one from a name).
    ``refusal`` (causal LMs): a :class:`adamerge.training.safety.RefusalCheck` reported with the task.
    """

    name: str
    inputs: Any
    head: nn.Module
    labels: Tensor | None = None
    loss: str = "cross_entropy"
    reference: nn.Module | str = START
    mode: str = "penalty"
    weight: float = 1.0
    budget: float | None = None
    dual_lr: float = 10.0
    initial_multiplier: float = 0.0
    batch_size: int = 16
    kl_direction: str = "merged_to_reference"
    refusal: Any = None

    def __post_init__(self) -> None:
        check_protected_settings(self.name, {key: getattr(self, key) for key in PROTECTED_DEFAULTS})
        where = f"protected.tasks.{self.name}"
        if self.size == 0:
            raise ConfigError(f"{where}: the protected set is empty")
        if self.loss == "cross_entropy" and self.labels is None:
            raise ConfigError(f"{where}: loss=cross_entropy needs labels, and its data has none (for unlabeled inputs "
                              "use loss=kl with a reference model)")
        if self.labels is not None and int(self.labels.shape[0]) != self.size:
            raise ConfigError(f"{where}: {self.labels.shape[0]} labels for {self.size} examples")
        if isinstance(self.reference, str) and self.reference != START:
            raise ConfigError(f"{where}.reference={self.reference!r}: a ProtectedTask takes 'start' or a model "
                              "(names and paths are resolved by adamerge.training.protected_config.resolve_reference)")

    @property
    def size(self) -> int:
        return batch_size(self.inputs)

    def settings(self) -> dict[str, Any]:
        """The plain settings, for results files."""
        settings = {key: getattr(self, key) for key in PROTECTED_DEFAULTS}
        settings["reference"] = self.reference if isinstance(self.reference, str) else type(self.reference).__name__
        return settings


def batch_rows(size: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The rows of step ``step``'s protected batch: seeded permutations back to back, so every example appears once
    per pass; a function of the step (no iterator state), so a resumed run draws the same batches."""
    batch_size = min(batch_size, size)
    rows: list[int] = []
    position = step * batch_size
    while len(rows) < batch_size:
        epoch, offset = divmod(position + len(rows), size)
        permutation = np.random.default_rng([seed, epoch]).permutation(size)
        rows.extend(permutation[offset: offset + batch_size - len(rows)].tolist())
    return rows


def _select(value: Any, rows: Tensor) -> Any:
    if isinstance(value, Mapping):
        return {key: _select(item, rows) for key, item in value.items()}
    return value[rows]


def task_batch(task: ProtectedTask, rows: Sequence[int], device: torch.device) -> tuple[Any, Tensor | None]:
    """Inputs and labels of ``rows``, right padding beyond the batch's longest sequence cut off, on ``device``."""
    index = torch.as_tensor(list(rows), dtype=torch.long)
    inputs, labels = _select(task.inputs, index), None if task.labels is None else task.labels[index]
    if isinstance(inputs, Mapping) and "attention_mask" in inputs:
        width = int(inputs["attention_mask"].sum(1).max())
        inputs = {key: item[:, :width] if item.ndim >= 2 else item for key, item in inputs.items()}
        if labels is not None and labels.ndim >= 2:
            labels = labels[:, :width]
    return to_device(inputs, device), None if labels is None else labels.to(device)


def protected_terms(loss: str, logits: Tensor, labels: Tensor | None, reference: Tensor | None, mask: Tensor | None,
                    kl_direction: str = "merged_to_reference") -> tuple[Tensor, Tensor, Tensor]:
    """One batch's summed loss, number of scored positions and agreeing predictions (with the labels for
    ``cross_entropy``, with the reference's for ``kl``). Scored positions: labels other than ``-100`` (cross-entropy);
    every example, or the unpadded tokens given ``mask`` (KL)."""
    if loss == "cross_entropy":
        flat = at_least_float32(logits).reshape(-1, logits.shape[-1])
        total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        correct, seen = count_correct(logits, labels)
        return total, torch.tensor(float(seen), device=logits.device), torch.tensor(float(correct), device=logits.device)
    merged, ref = torch.log_softmax(at_least_float32(logits), -1), torch.log_softmax(at_least_float32(reference), -1)
    if kl_direction == "merged_to_reference":
        divergence = (merged.exp() * (merged - ref)).sum(-1)
    else:
        divergence = (ref.exp() * (ref - merged)).sum(-1)
    valid = torch.ones_like(divergence, dtype=torch.bool) if mask is None else mask.bool()
    agree = (logits.argmax(-1) == reference.argmax(-1)) & valid
    return (divergence * valid).sum(), valid.sum().to(divergence.dtype), agree.sum().to(divergence.dtype)


def agreement_name(loss: str) -> str:
    """What the second score of a task is called: accuracy against labels, or agreement with the reference."""
    return "accuracy" if loss == "cross_entropy" else "agreement"
