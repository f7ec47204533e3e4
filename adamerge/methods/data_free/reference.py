"""The pretrained model as a 'method': the zero-shot / probe baseline every merge is compared with."""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.methods.registry import register_method
from adamerge.pool.lora import LoRATaskVectors
from adamerge.pool.task_vectors import TaskVectors


@register_method("pretrained", defaults={}, description="The pretrained backbone (θ0) with every task's head")
def pretrained(task_vectors: TaskVectors | LoRATaskVectors) -> dict[str, Tensor]:
    # Shapes only: a streamed or adapter pool forms no task vector for them.
    return {name: torch.zeros(task_vectors.shape(name)) for name in task_vectors.names}
