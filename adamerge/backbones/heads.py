"""Frozen per-task classification heads."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adamerge.pool.checkpoints import CheckpointError


def linear_head(path: str | Path) -> nn.Linear:
    """A linear head from a safetensors file holding ``weight`` ``[C, D]`` and ``bias`` ``[C]``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classification head file not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as error:  # a truncated or foreign file: safetensors says only "invalid header"
        raise CheckpointError(f"head file {path} is not a readable safetensors file: {error}") from error
    if set(state) != {"weight", "bias"} or state["weight"].ndim != 2:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        raise CheckpointError(f"head file {path} must hold 'weight' [C, D] and 'bias' [C], found {shapes}")
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.requires_grad_(False).eval()


def save_linear_head(head: nn.Linear, path: str | Path) -> None:
    save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()}, str(path))


class Identity(nn.Module):
    """Head for backbones that already output the task's logits (causal LMs, full classifiers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(x, "logits", x)
