"""What a checkpoint holds -- tensor names, shapes and dtypes -- without reading its weights.

The memory plan (:mod:`adamerge.pool.memory_plan`) is made before anything loads, so it reads only the JSON header at
the start of each ``.safetensors`` file (a few kilobytes, even for a 70B shard) or, when only a ``config.json`` is
at hand (a hub id in the local cache, a bench), builds the model on the meta device, which allocates nothing.
Pickled checkpoints (``.bin``/``.pt``) have no header: :class:`InventoryUnavailable` says so and the plan skips.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adamerge.pool.checkpoints import SAFETENSORS_SUFFIXES, hf_dir_weight_files, looks_like_path

__all__ = ["TensorSpec", "Inventory", "InventoryUnavailable", "safetensors_header", "checkpoint_inventory",
           "meta_inventory", "model_config", "DTYPE_BYTES"]

# safetensors dtype names and torch dtype names, in bytes per element.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint8": 1, "bool": 1,
}
FLOATING = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "float64", "float32", "float16", "bfloat16"}


class InventoryUnavailable(Exception):
    """The shapes of a checkpoint cannot be known without loading it (the message says why)."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]

    @property
    def is_floating_point(self) -> bool:
        return self.dtype in FLOATING


Inventory = dict[str, TensorSpec]


def safetensors_header(path: str | os.PathLike) -> Inventory:
    """The tensors of one ``.safetensors`` file, from its header alone (8-byte length, then JSON)."""
    with open(path, "rb") as handle:
        length_bytes = handle.read(8)
        if len(length_bytes) != 8:
            raise InventoryUnavailable(f"{os.fspath(path)!r} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", length_bytes)
        # A foreign file's first 8 bytes can announce more bytes than exist (a text file: a MemoryError on read).
        if length > os.fstat(handle.fileno()).st_size - 8:
            raise InventoryUnavailable(f"{os.fspath(path)!r} is not a safetensors file: its header length {length} "
                                       "exceeds the file")
        try:
            header = json.loads(handle.read(length))
            return {name: TensorSpec(tuple(entry["shape"]), entry["dtype"])
                    for name, entry in header.items() if name != "__metadata__"}
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise InventoryUnavailable(f"{os.fspath(path)!r} has no readable safetensors header: {error}") from error


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of hub repository ``repo_id`` in the local Hugging Face cache, or None (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None


def _hub_inventory(repo_id: str, auto_class: str) -> Inventory:
    """A hub id's tensors from the local cache only: its safetensors headers, else its config on the meta device."""
    single = cached_hub_file(repo_id, "model.safetensors")
    if single is not None:
        return safetensors_header(single)
    index = cached_hub_file(repo_id, "model.safetensors.index.json")
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        paths = [cached_hub_file(repo_id, shard) for shard in shards]
        if all(p is not None for p in paths):
            return {name: spec for p in paths for name, spec in safetensors_header(p).items()}
    config = model_config(repo_id)
    if config is None:
        raise InventoryUnavailable(f"{repo_id!r} is a hub id that is not in the local cache (no config.json)")
    return meta_inventory(config, auto_class)


def checkpoint_inventory(source: Any, auto_class: str = "AutoModel") -> Inventory:
    """Tensors of a checkpoint source (a ``.safetensors`` file, a save_pretrained directory, a cached hub id)."""
    if not isinstance(source, (str, os.PathLike)):
        raise InventoryUnavailable(f"a {type(source).__name__} is not a checkpoint file the plan can read")
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
            raise InventoryUnavailable(f"{name!r} is a pickled checkpoint: its shapes are only known by loading it")
        return safetensors_header(path)
    if path.is_dir():
        files = hf_dir_weight_files(path)
        if any(f.suffix.lower() not in SAFETENSORS_SUFFIXES for f in files):
            raise InventoryUnavailable(f"{name!r} holds pickled weights: their shapes are only known by loading them")
        return {tensor: spec for f in files for tensor, spec in safetensors_header(f).items()}
    if isinstance(source, str) and not looks_like_path(name):
        return _hub_inventory(name, auto_class)
    raise InventoryUnavailable(f"{name!r} does not exist")


def model_config(source: Any) -> Mapping[str, Any] | None:
    """The ``config.json`` of a save_pretrained directory or a cached hub id, or None."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        config = path / "config.json"
    elif path.exists() or looks_like_path(os.fspath(source)):
        return None
    else:
        config = cached_hub_file(os.fspath(source), "config.json")
    return json.loads(config.read_text()) if config is not None and config.is_file() else None


def meta_inventory(config: Mapping[str, Any], auto_class: str = "AutoModelForCausalLM",
                   dtype: str | None = None) -> Inventory:
    """The tensors of the model ``config`` describes, built on the meta device (no memory, no download).

    Tied copies are listed once, as ``save_pretrained`` writes them.
    """
    import torch
    import transformers

    config = dict(config)
    model_type = config.pop("model_type")
    built = transformers.AutoConfig.for_model(model_type, **config)
    with torch.device("meta"):
        model = getattr(transformers, auto_class).from_config(built)
    state = model.state_dict()
    tied = _meta_tied(model)
    chosen = dtype or str(built.dtype if getattr(built, "dtype", None) else "float32").removeprefix("torch.")
    return {name: TensorSpec(tuple(t.shape), chosen if t.is_floating_point() else str(t.dtype).removeprefix("torch."))
            for name, t in state.items() if name not in tied}


def _meta_tied(model: Any) -> set[str]:
    """Names of a meta model's tied copies: meta tensors have no storage to compare, but tied ones are one object."""
    seen: set[int] = set()
    tied = set()
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) in seen:
            tied.add(name)
        seen.add(id(tensor))
    return tied
