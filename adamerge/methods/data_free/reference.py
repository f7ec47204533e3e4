"""The pretrained model as a 'method': the zero-shot / probe baseline every merge is compared with."""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.methods.registry import register_method
from adamerge.pool.task_vectors import TaskVectors


@register_method("pretrained", defaults={}, description="The pretrained backbone (θ0) with every task's head")
def pretrained(task_vectors: TaskVectors) -> dict[str, Tensor]:
    return {name: torch.zeros(v.shape[1:]) for name, v in task_vectors.vectors.items()}
