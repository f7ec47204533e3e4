"""LoRA adapters as task vectors: a PEFT adapter is a task vector ``τ = s·B@A`` per targeted weight.

An adapter of rank 16 on every projection of a 7B model is ~40 M parameters, so a pool of K adapters is kept as
factors, never as K dense deltas: :meth:`LoRATaskVectors.delta` forms one tensor's ``Σ_k w_k s_k B_k A_k`` at a time,
as one product of the concatenated factors (``B_cat · diag(w·s) · A_cat``), which is also what autograd keeps.
Reading and checking one adapter (a directory or a hub id; what is refused and why) is :mod:`adamerge.pool.peft_adapter`.
A linear merge of the pool (task- or layer-wise coefficients) is one adapter again: :func:`save_linear_adapter`
concatenates the ranks and folds ``w·s`` into B, so ``PeftModel.from_pretrained`` loads it with no merge code at all.

Data-free methods run over :meth:`LoRATaskVectors.as_streamed`: each targeted weight's K dense deltas are formed when
read and the pool is visited block by block, as a streamed pool is (:mod:`adamerge.methods.data_free.streamed`), so
one block's dense deltas exist at a time, never the whole model's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import ConfigError
from adamerge.pool.checkpoints import CheckpointError
from adamerge.pool.peft_adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, LoRAAdapter, LoRAFactors,
                                        adapter_path, is_adapter_dir, load_adapter)
from adamerge.pool.streamed import StreamedVectorsBase

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "LoRAFactors", "LoRAAdapter", "LoRATaskVectors",
           "LoRADenseVectors", "adapter_path", "is_adapter_dir", "load_adapter", "save_linear_adapter"]


class LoRATaskVectors:
    """K adapters over one pretrained state: the targeted weights' deltas, formed one tensor at a time."""

    def __init__(self, task_names: Sequence[str], pretrained: Mapping[str, Tensor],
                 adapters: Mapping[str, LoRAAdapter]) -> None:
        self.task_names = list(task_names)
        self.pretrained = dict(pretrained)
        self.adapters = dict(adapters)
        self.unscored_tasks: tuple[str, ...] = ()
        targeted = set().union(*(a.factors for a in self.adapters.values()))
        self.names = [name for name in self.pretrained if name in targeted]  # in the model's order

    @classmethod
    def from_adapters(cls, pretrained: Mapping[str, Tensor], sources: Mapping[str, Any], *,
                      base_model: str | None = None) -> LoRATaskVectors:
        shapes = {name: tuple(t.shape) for name, t in pretrained.items()}
        adapters = {task: load_adapter(source, shapes, base_model=base_model) for task, source in sources.items()}
        return cls(list(sources), pretrained, adapters)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.pretrained[name].shape)

    def memory_bytes(self) -> int:
        return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
                   for adapter in self.adapters.values() for f in adapter.factors.values())

    def memory_report(self) -> dict[str, float | int | str]:
        return {"tasks": self.num_tasks, "tensors": len(self.names), "lora_adapters_mb": self.memory_bytes() / 2**20,
                "ranks": {task: adapter.rank for task, adapter in self.adapters.items()}}

    @property
    def vectors(self) -> dict[str, Tensor]:
        raise ConfigError("this step needs every task vector as a dense tensor, which a pool of LoRA adapters never "
                          "forms; data-free methods run over the adapters block by block, and a learned method as "
                          "adamerging_task_wise / adamerging_layer_wise (or on a base, base_form=residual)")

    def as_streamed(self) -> LoRADenseVectors:
        """The adapters as streamed task vectors: a targeted weight's K dense deltas formed when read (data-free
        methods, block by block)."""
        return LoRADenseVectors(self)

    def concatenated(self, name: str) -> tuple[Tensor, Tensor, Tensor, Tensor, bool]:
        """(A_cat [R, in], B_cat [out, R], task index of each rank [R], scale of each rank [R], fan_in_fan_out) of
        the tasks whose adapters target ``name``."""
        chosen = [(k, self.adapters[t].factors[name]) for k, t in enumerate(self.task_names)
                  if name in self.adapters[t].factors]
        a = torch.cat([f.A.float() for _, f in chosen])
        b = torch.cat([f.B.float() for _, f in chosen], dim=1)
        task = torch.cat([torch.full((f.A.shape[0],), k) for k, f in chosen])
        scale = torch.cat([torch.full((f.A.shape[0],), f.scale) for _, f in chosen])
        return a, b, task, scale, chosen[0][1].fan_in_fan_out

    def delta(self, name: str, weights: Tensor) -> Tensor:
        """``Σ_k weights_k · s_k B_k A_k`` for one targeted weight, shaped like it; differentiable in ``weights``."""
        a, b, task, scale, transposed = self.concatenated(name)
        delta = (b * (weights[task] * scale)) @ a
        return delta.T if transposed else delta

    def task_vector(self, task: str | int) -> dict[str, Tensor]:
        """One task's dense delta ``s_k B_k A_k`` per targeted weight: what its expert model (θ0 + τ_k) is built from,
        one task at a time, never all K together."""
        index = task if isinstance(task, int) else self.task_names.index(task)
        weights = torch.zeros(self.num_tasks)
        weights[index] = 1.0
        return {name: self.delta(name, weights) for name in self.names}

    def state_dict_from_deltas(self, deltas: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """θ0 with ``deltas`` added to the weights they name (the rest as pretrained)."""
        state = {name: tensor.clone() for name, tensor in self.pretrained.items()}
        for name, delta in deltas.items():
            state[name] = (self.pretrained[name].float() + delta.float()).to(self.pretrained[name].dtype)
        return state

    def state_dict_from_weights(self, weights: Tensor) -> dict[str, Tensor]:
        """θ0 with every targeted weight merged: ``weights`` is ``[K]`` or one row per name ``[len(names), K]``."""
        rows = weights.expand(len(self.names), -1) if weights.ndim == 1 else weights
        state = {name: tensor.clone() for name, tensor in self.pretrained.items()}
        for row, name in zip(rows, self.names):
            state[name] = (self.pretrained[name].float() + self.delta(name, row.float())).to(self.pretrained[name].dtype)
        return state


class LoRADenseVectors(StreamedVectorsBase):
    """A pool of adapters read as streamed task vectors: ``stacked(name)`` is one targeted weight's K dense deltas
    ``s_k B_k A_k`` (zeros for a task whose adapter does not target it), in float32, formed on each read."""

    def __init__(self, adapters: LoRATaskVectors) -> None:
        self.adapters = adapters
        self.task_names = list(adapters.task_names)
        self.pretrained = adapters.pretrained
        self.names = list(adapters.names)
        self.aliases: dict[str, str] = {}
        self.unscored_tasks = tuple(adapters.unscored_tasks)
        self.dtype = torch.float32

    def stacked(self, name: str) -> Tensor:
        shape = self.pretrained[name].shape
        return torch.stack([adapter.factors[name].dense() if name in adapter.factors else torch.zeros(shape)
                            for adapter in (self.adapters.adapters[task] for task in self.task_names)])


def save_linear_adapter(vectors: LoRATaskVectors, weights: Tensor, directory: str | os.PathLike, *,
                        base_model: str | None = None) -> Path:
    """One PEFT LoRA adapter equal to the linear merge ``Σ_k w_k τ_k`` (``weights``: ``[K]`` or ``[len(names), K]``).

    Ranks are concatenated (r = Σ_k r_k) and ``w_k s_k`` is folded into each task's B; ``lora_alpha = r`` makes
    PEFT's own scale 1. Every adapter must target the same modules, so that one r serves all of them.
    """
    from safetensors.torch import save_file

    targets = {frozenset(a.factors) for a in vectors.adapters.values()}
    if len(targets) != 1:
        raise CheckpointError("a merged adapter needs every adapter to target the same modules; these differ: "
                              + "; ".join(f"{t}: {len(a.factors)} weights" for t, a in vectors.adapters.items()))
    rows = weights.expand(len(vectors.names), -1) if weights.ndim == 1 else weights
    tensors, rank = {}, 0
    for row, name in zip(rows, vectors.names):
        a, b, task, scale, _ = vectors.concatenated(name)
        module = PEFT_PREFIX + name.removesuffix(".weight")
        tensors[f"{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{module}.lora_B.weight"] = (b * (row.float()[task] * scale)).contiguous()
        rank = a.shape[0]
    first = next(iter(vectors.adapters.values())).config
    config = {**{k: v for k, v in first.items() if k not in ("r", "lora_alpha", "use_rslora", "revision")},
              "r": rank, "lora_alpha": rank, "use_rslora": False, "base_model_name_or_path": base_model or
              first.get("base_model_name_or_path"),
              "target_modules": sorted({name.removesuffix(".weight").rsplit(".", 1)[-1] for name in vectors.names})}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory
