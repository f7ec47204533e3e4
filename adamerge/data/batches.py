"""What one batch is, wherever it goes: ``{"inputs": ..., "labels": ..., "index": ...}``.

``inputs`` are model inputs, a tensor (images) or a mapping of tensors (tokenised text); ``labels`` the classes
(evaluation only); ``index`` the batch's row numbers in its split, by which each task's expert outputs are looked up.
A task's rows come from one of two splits: ``ADAPTATION`` (the unlabeled inputs learning draws from) and
``EVALUATION`` (the labelled split every evaluation scores). Nothing here imports Lightning: a loaded export uses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

ADAPTATION, EVALUATION = 0, 1  # a task's two splits: unlabeled inputs learning draws from, labelled evaluation


def to_device(inputs: Any, device: torch.device) -> Any:
    """A batch's inputs (a tensor, or a mapping of tensors such as tokenised text) on ``device``."""
    if isinstance(inputs, Mapping):
        return {key: to_device(value, device) for key, value in inputs.items()}
    return inputs.to(device) if isinstance(inputs, Tensor) else inputs
