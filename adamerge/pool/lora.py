"""LoRA adapters as task vectors: a PEFT adapter directory is a task vector ``τ = s·B@A`` per targeted weight.

An adapter of rank 16 on every projection of a 7B model is ~40 M parameters, so a pool of K adapters is kept as
factors, never as K dense deltas: :meth:`LoRATaskVectors.delta` forms one tensor's ``Σ_k w_k s_k B_k A_k`` at a time,
as one product of the concatenated factors (``B_cat · diag(w·s) · A_cat``), which is also what autograd keeps.
``s = lora_alpha / r`` (``lora_alpha / √r`` with rsLoRA).

:func:`load_adapter` refuses what is not such a product, naming the setting: DoRA (its magnitude vectors rescale
the weight's columns), per-module rank or alpha patterns, ``modules_to_save`` (whole trained copies), trained biases,
other PEFT types; and an adapter whose base model or shapes differ from the pool's. A linear merge of the pool
(task- or layer-wise coefficients) is one adapter again: :func:`save_linear_adapter` concatenates the ranks and folds
``w·s`` into B, so ``PeftModel.from_pretrained`` loads it with no merge code at all.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adamerge.errors import ConfigError
from adamerge.pool.checkpoints import PEFT_ADAPTER_FILES, CheckpointError

__all__ = ["ADAPTER_CONFIG", "LoRAFactors", "LoRAAdapter", "LoRATaskVectors", "is_adapter_dir",
           "load_adapter", "save_linear_adapter"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = PEFT_ADAPTER_FILES
PEFT_PREFIX = "base_model.model."


def is_adapter_dir(source: Any) -> bool:
    return isinstance(source, (str, os.PathLike)) and (Path(os.fspath(source)).expanduser() / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class LoRAFactors:
    """One targeted weight ``W [out, in]``: ``ΔW = scale · B @ A`` (transposed for ``fan_in_fan_out`` layers)."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float
    fan_in_fan_out: bool = False

    def dense(self) -> Tensor:
        delta = self.scale * (self.B.float() @ self.A.float())
        return delta.T if self.fan_in_fan_out else delta


@dataclass(frozen=True)
class LoRAAdapter:
    source: str
    config: Mapping[str, Any]
    factors: Mapping[str, LoRAFactors]  # backbone weight name → factors

    @property
    def rank(self) -> int:
        return int(self.config["r"])


def _refuse(source: str, what: str) -> CheckpointError:
    return CheckpointError(f"adapter {source!r}: {what}")


def _check_config(source: str, config: Mapping[str, Any], base_model: str | None) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise _refuse(source, f"peft_type {config.get('peft_type')!r} is not LORA; only LoRA adapters are task vectors")
    if config.get("use_dora"):
        raise _refuse(source, "use_dora=true: a DoRA adapter rescales the weight's columns by learned magnitudes, so "
                              "its update is not B@A·scale; adamerge merges plain LoRA adapters only")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise _refuse(source, f"{key} {dict(config[key])} gives some modules their own rank or alpha; adamerge "
                                  "supports one r and lora_alpha per adapter")
    if config.get("modules_to_save"):
        raise _refuse(source, f"modules_to_save {config['modules_to_save']} are fully trained copies, not low-rank "
                              "updates; merge the full fine-tuned checkpoint instead")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise _refuse(source, f"bias={config.get('bias')!r}: trained biases are not part of B@A; use bias='none'")
    expected = config.get("base_model_name_or_path")
    if base_model is not None and expected and not _same_model(expected, base_model):
        raise _refuse(source, f"was trained on {expected!r}, not on the pool's pretrained model {base_model!r}")


def _same_model(a: str, b: str) -> bool:
    """Same hub id or directory; a local copy of a hub model counts when its directory is named like the id."""
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/").split("/")[-1] == b.rstrip("/").split("/")[-1]


def load_adapter(source: str | os.PathLike, shapes: Mapping[str, Sequence[int]], *,
                 base_model: str | None = None) -> LoRAAdapter:
    """Read and validate a PEFT LoRA adapter against the backbone's weight ``shapes`` (name → shape)."""
    from safetensors.torch import load_file

    name = os.fspath(source)
    directory = Path(name).expanduser()
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    _check_config(name, config, base_model)
    if not (directory / ADAPTER_WEIGHTS).is_file():
        raise _refuse(name, f"no {ADAPTER_WEIGHTS} (a pickled adapter_model.bin is not read; re-save with safetensors)")
    tensors = load_file(directory / ADAPTER_WEIGHTS, device="cpu")
    rank = int(config["r"])
    scale = config["lora_alpha"] / (math.sqrt(rank) if config.get("use_rslora") else rank)
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise _refuse(name, f"entry {key!r} is not a LoRA A/B factor of a linear layer (embedding LoRA, DoRA "
                                "magnitudes and trained tokens are not supported)")
        pairs.setdefault(f"{module}.weight", {})[kind[0]] = tensor
    factors = {}
    for weight, pair in pairs.items():
        if weight not in shapes:
            raise _refuse(name, f"targets {weight!r}, which the pool's model does not have (target_modules "
                                f"{config.get('target_modules')})")
        out_features, in_features = tuple(shapes[weight])[::-1] if fan_in_fan_out else tuple(shapes[weight])
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            got = {k: tuple(v.shape) for k, v in pair.items()}
            raise _refuse(name, f"factors of {weight!r} have shapes {got}; with r={rank} and the weight's shape "
                                f"{tuple(shapes[weight])} they must be A {(rank, in_features)} and B {(out_features, rank)}")
        factors[weight] = LoRAFactors(a, b, scale, fan_in_fan_out)
    return LoRAAdapter(name, config, factors)


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

    def memory_bytes(self) -> int:
        return sum(f.A.numel() * f.A.element_size() + f.B.numel() * f.B.element_size()
                   for adapter in self.adapters.values() for f in adapter.factors.values())

    def memory_report(self) -> dict[str, float | int | str]:
        return {"tasks": self.num_tasks, "tensors": len(self.names), "lora_adapters_mb": self.memory_bytes() / 2**20,
                "ranks": {task: adapter.rank for task, adapter in self.adapters.items()}}

    @property
    def vectors(self) -> dict[str, Tensor]:
        raise ConfigError("this merge needs every task vector as a dense tensor, which a pool of LoRA adapters never "
                          "forms; over adapters use a learned method (adamerging_task_wise / adamerging_layer_wise)")

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
