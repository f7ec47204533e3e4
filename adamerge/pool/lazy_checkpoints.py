"""Checkpoints read lazily: one tensor at a time, memory-mapped from safetensors, never the whole file.

:func:`lazy_state_dict` turns a checkpoint source into a :class:`LazyStateDict`, a ``Mapping[str, Tensor]`` whose
names, shapes and dtypes come from the safetensors headers (a few kilobytes, even for a 70B shard) and whose values
are read on access with ``safetensors.safe_open`` -- the returned tensor is backed by the file's memory map, so a
tensor costs resident memory only while something holds it, and the file is never read whole. Sources:

* a ``.safetensors`` file;
* a sharded set: a ``model.safetensors.index.json`` file or a directory holding one (``model-0000x-of-0000y``);
* a ``save_pretrained`` directory (``model.safetensors`` or the index), as
  :func:`adamerge.pool.checkpoints.hf_dir_weight_files` finds them;
* a hub id already in the local cache (its safetensors files; nothing is downloaded);
* a state dict or ``nn.Module`` already in memory, used as it is (there is nothing left to stream).

Pickled checkpoints (``.bin``/``.pt``/``.pth``/``.ckpt``, ``pytorch_model.bin`` directories) cannot be memory-mapped
safely: they are refused with a :class:`~adamerge.pool.checkpoints.CheckpointError` that says to convert them to
safetensors (or to turn streaming off, which loads them whole as before).

Validation is :func:`adamerge.pool.validation.validate_finetuned` itself, split where the data is: names, shapes and
floating-point-ness are checked on meta tensors built from the headers before any tensor is read (:func:`meta_state`);
NaN/Inf are checked per tensor when it is read (:func:`adamerge.pool.validation.check_finite`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adamerge.pool.checkpoints import (
    PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, CheckpointError, hf_dir_weight_files, looks_like_path,
)
from adamerge.pool.inventory import InventoryUnavailable, TensorSpec, safetensors_header
from adamerge.pool.validation import check_finite

__all__ = ["LazyStateDict", "lazy_state_dict", "meta_state", "tensor_spec", "INDEX_SUFFIX"]

INDEX_SUFFIX = ".safetensors.index.json"
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
                 "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _convert_hint(what: str) -> str:
    return (f"{what} cannot be memory-mapped safely, so it cannot be streamed: convert it to safetensors "
            "(e.g. transformers' save_pretrained(..., safe_serialization=True) or safetensors.torch.save_file), or set "
            "modelpool.streaming=false to load it whole")


class LazyStateDict(Mapping[str, Tensor]):
    """A checkpoint's tensors, each read from its safetensors file when accessed (memory-mapped, never cached).

    ``files`` maps each exposed name to ``(file, name in that file)``; ``specs`` gives its shape and dtype (from the
    header). Every read is checked for NaN/Inf unless ``check_finite`` is off.
    """

    def __init__(self, files: Mapping[str, tuple[Path, str]], specs: Mapping[str, TensorSpec], *, source: str,
                 check_finite: bool = True) -> None:
        self._files = dict(files)
        self.specs: dict[str, TensorSpec] = {name: specs[name] for name in self._files}
        self.source = source
        self.check_finite = check_finite
        self.reads = 0  # tensors read so far (tests and benches count passes with it)
        # What was checked finite already: a learning step reads the same tensors (and bands) again every step, and
        # a scan for NaN/Inf on every read was 40 % of a streamed step (the Qwen bench).
        self._checked: set[Any] = set()

    def __getitem__(self, name: str) -> Tensor:
        tensor = self._read(name)
        self.reads += 1
        return tensor

    def rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (first dimension) of ``name``, read alone from the file: a large matrix (an embedding)
        can be merged a band of rows at a time without ever being read whole."""
        return self._read(name, (start, stop))

    def _read(self, name: str, rows: tuple[int, int] | None = None) -> Tensor:
        """``name`` (or its rows ``start:stop``) from its file, checked for NaN/Inf the first time it is read."""
        if name not in self._files:
            raise KeyError(name)
        from safetensors import SafetensorError, safe_open

        path, key = self._files[name]
        label = name if rows is None else f"{name}[{rows[0]}:{rows[1]}]"
        try:
            # Opened per read and closed at once: the tensor keeps its pages mapped only while it is alive.
            with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
                tensor = handle.get_tensor(key) if rows is None else handle.get_slice(key)[rows[0]:rows[1]]
        except (SafetensorError, OSError) as error:
            what = "" if rows is None else f"rows {rows[0]}:{rows[1]} of "
            raise CheckpointError(f"cannot read {what}{name!r} from {str(path)!r}: {error}") from error
        checked = name if rows is None else (name, *rows)
        if self.check_finite and name not in self._checked and checked not in self._checked:
            check_finite(label, tensor, f"checkpoint {self.source!r}")
            self._checked.add(checked)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __repr__(self) -> str:
        return f"LazyStateDict({self.source!r}, {len(self)} tensors)"

    @property
    def files(self) -> list[Path]:
        return sorted({path for path, _ in self._files.values()})

    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.specs.values())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.specs[name].shape

    def subset(self, names: Iterable[str]) -> LazyStateDict:
        """The same checkpoint restricted to ``names`` (in that order); nothing is read."""
        return LazyStateDict({n: self._files[n] for n in names}, self.specs, source=self.source,
                             check_finite=self.check_finite)

    def renamed(self, mapping: Mapping[str, str]) -> LazyStateDict:
        """A view whose name ``new`` reads this checkpoint's ``mapping[new]`` (key alignment); nothing is read."""
        return LazyStateDict({new: self._files[old] for new, old in mapping.items()},
                             {new: self.specs[old] for new, old in mapping.items()}, source=self.source,
                             check_finite=self.check_finite)


def tensor_spec(tensor: Tensor) -> TensorSpec:
    """A tensor's shape and dtype as a header would give them (for in-memory states next to lazy ones)."""
    return TensorSpec(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))


def specs_of(state: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
    """Shapes and dtypes of a lazy or in-memory state, reading no data."""
    if isinstance(state, LazyStateDict):
        return dict(state.specs)
    return {name: tensor_spec(tensor) for name, tensor in state.items()}


def _header(path: Path) -> dict[str, TensorSpec]:
    try:
        return safetensors_header(path)
    except (InventoryUnavailable, OSError) as error:
        raise CheckpointError(f"cannot read the safetensors header of {str(path)!r}: {error}") from error


def _from_files(files: list[Path], source: str, check_finite: bool) -> LazyStateDict:
    located: dict[str, tuple[Path, str]] = {}
    specs: dict[str, TensorSpec] = {}
    for path in files:
        if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
            raise CheckpointError(f"{source!r}: {_convert_hint(f'the pickled weight file {path.name!r}')}")
        for name, spec in _header(path).items():
            if name in located:
                raise CheckpointError(f"parameter {name!r} appears in more than one shard of {source!r}")
            located[name], specs[name] = (path, name), spec
    return LazyStateDict(located, specs, source=source, check_finite=check_finite)


def _index_files(index: Path) -> list[Path]:
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        raise CheckpointError(f"malformed shard index {str(index)!r}: {error}") from error
    missing = [s for s in shards if not (index.parent / s).is_file()]
    if missing:
        raise CheckpointError(f"shard index {str(index)!r} refers to missing files: {', '.join(missing)}")
    return [index.parent / s for s in shards]


def _cached_hub_files(repo_id: str) -> list[Path] | None:
    from adamerge.pool.inventory import cached_hub_file

    single = cached_hub_file(repo_id, "model.safetensors")
    if single is not None:
        return [single]
    index = cached_hub_file(repo_id, "model.safetensors.index.json")
    if index is None:
        return None
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    paths = [cached_hub_file(repo_id, shard) for shard in shards]
    return paths if all(p is not None for p in paths) else None


def lazy_state_dict(source: Any, *, check_finite: bool = True) -> Mapping[str, Tensor]:
    """A :class:`LazyStateDict` over ``source`` (see the module docstring), or the in-memory state it already is."""
    if isinstance(source, LazyStateDict):
        return source
    if isinstance(source, torch.nn.Module):
        return {k: v.detach() for k, v in source.state_dict().items()}
    if isinstance(source, Mapping):
        from adamerge.pool.checkpoints import load_state_dict

        return load_state_dict(source)  # checks it is a mapping of names to tensors
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"cannot stream a checkpoint from a {type(source).__name__}: pass a safetensors file, a "
                              "shard index, a save_pretrained directory, an nn.Module or a state dict")
    name = os.fspath(source)
    path = Path(name).expanduser()
    if path.is_dir():
        return _from_files(hf_dir_weight_files(path), name, check_finite)
    if path.is_file():
        if path.name.endswith(INDEX_SUFFIX):
            return _from_files(_index_files(path), name, check_finite)
        if path.suffix.lower() in PICKLE_SUFFIXES or path.name.endswith(".bin.index.json"):
            raise CheckpointError(f"{name!r}: {_convert_hint('a pickled checkpoint')}")
        if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
            raise CheckpointError(f"unsupported checkpoint file {name!r}: streaming reads .safetensors files, shard "
                                  f"indexes ({INDEX_SUFFIX}) and save_pretrained directories")
        return _from_files([path], name, check_finite)
    if isinstance(source, str) and not looks_like_path(name):
        files = _cached_hub_files(name)
        if files is None:
            raise CheckpointError(f"{name!r} is a hub id whose safetensors weights are not in the local cache; "
                                  "streaming reads local files only: download it first (huggingface-cli download) "
                                  "or set modelpool.streaming=false")
        return _from_files(files, name, check_finite)
    raise CheckpointError(f"file not found: {name}")


def meta_state(state: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """A lazy state as meta tensors (shapes and dtypes from its headers, no data), for
    :func:`adamerge.pool.validation.validate_finetuned`, which checks names, shapes and dtypes from them and leaves the
    values' NaN/Inf check to each read; an in-memory state as it is (checked whole, as today)."""
    if not isinstance(state, LazyStateDict):
        return state
    return {name: torch.empty(spec.shape, dtype=_TORCH_DTYPES.get(spec.dtype, torch.uint8), device="meta")
            for name, spec in state.specs.items()}
