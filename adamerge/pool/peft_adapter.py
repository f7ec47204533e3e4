"""One PEFT LoRA adapter on disk: where it is (a directory, or a hub id's cached snapshot) and what it holds, checked.

:func:`load_adapter` reads ``adapter_config.json`` and ``adapter_model.safetensors`` and refuses what is not a plain
``s·B@A`` update of linear layers, naming the setting: DoRA (its magnitude vectors rescale the weight's columns),
per-module rank or alpha patterns, ``modules_to_save`` (whole trained copies), trained biases, other PEFT types; and
an adapter whose base model or shapes differ from the pool's. ``s = lora_alpha / r`` (``lora_alpha / √r`` with
rsLoRA). K adapters as task vectors are :mod:`adamerge.pool.lora`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from adamerge.pool.checkpoints import PEFT_ADAPTER_FILES, CheckpointError, hub_offline, looks_like_path

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "LoRAFactors", "LoRAAdapter", "adapter_path",
           "is_adapter_dir", "load_adapter"]

ADAPTER_CONFIG, ADAPTER_WEIGHTS = PEFT_ADAPTER_FILES
PEFT_PREFIX = "base_model.model."


def adapter_path(source: Any) -> Path | None:
    """The local directory of a PEFT adapter: ``source`` itself when it holds ``adapter_config.json``, or a hub id's
    snapshot of its adapter files (from the local cache; downloaded when the hub is reachable and HF_HUB_OFFLINE is
    not set). None when ``source`` is not an adapter (a full checkpoint, or a hub id without adapter_config.json)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    name = os.fspath(source)
    path = Path(name).expanduser()
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if path.exists() or not isinstance(source, str) or looks_like_path(name):
        return None
    return _hub_adapter(name)


def _hub_adapter(repo_id: str) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    from adamerge.pool.inventory import cached_hub_file

    config = cached_hub_file(repo_id, ADAPTER_CONFIG)
    if config is None and hub_offline():
        return None  # not an adapter this machine has: loaded as a full checkpoint, whose error says it is not cached
    if config is None:
        try:
            config = Path(hf_hub_download(repo_id, ADAPTER_CONFIG))
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
            return None  # no adapter_config.json there: a full model's id (or an unreachable hub: said when it loads)
    weights = config.parent / ADAPTER_WEIGHTS
    if not weights.is_file() and not hub_offline():
        try:
            hf_hub_download(repo_id, ADAPTER_WEIGHTS)
        except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):
            pass  # load_adapter names the missing file
    return config.parent


def is_adapter_dir(source: Any) -> bool:
    return adapter_path(source) is not None


@dataclass(frozen=True)
class LoRAFactors:
    """One targeted weight ``W [out, in]``: ``ΔW = scale · B @ A`` (transposed for ``fan_in_fan_out`` layers)."""

    A: Tensor  # [r, in]
    B: Tensor  # [out, r]
    scale: float
    fan_in_fan_out: bool = False

    def dense(self) -> Tensor:
        delta = (self.B.float() * self.scale) @ self.A.float()  # the order LoRATaskVectors.delta folds the scale in
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
    directory = adapter_path(source) or Path(name).expanduser()
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
