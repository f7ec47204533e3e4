"""The pretrained model as a 'method': the zero-shot / probe baseline every merge is compared with."""

from __future__ import annotations

import torch
from torch import Tensor

from adamerge.methods.registry import register_method
from adamerge.pool.lora import LoRATaskVectors
from adamerge.pool.task_vectors import TaskVectors


@register_method("pretrained", defaults={}, description="The pretrained backbone (θ0) with every task's head")
def pretrained(task_vectors: TaskVectors | LoRATaskVectors) -> dict[str, Tensor]:
    if isinstance(task_vectors, LoRATaskVectors):  # adapters: the shapes are θ0's, no delta is formed
        return {name: torch.zeros(task_vectors.pretrained[name].shape) for name in task_vectors.names}
    return {name: torch.zeros(v.shape[1:]) for name, v in task_vectors.vectors.items()}
