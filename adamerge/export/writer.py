"""Exporting a fused model as a self-describing directory, and loading it back.

An export holds the weights (``model.safetensors``), each task's frozen head (``heads/<task>.safetensors``,
see :mod:`adamerge.export.heads`), ``merge_config.json`` (how the model was made, how to rebuild its
architecture and heads, the class names and input preprocessing of every task), a model card (``README.md``
and ``coefficients.png``, :mod:`adamerge.export.model_card`) and, for transformers models, everything
``save_pretrained`` writes, so the result also opens with plain ``AutoModel.from_pretrained`` (and, with
``per_task_hf``, one ``tasks/<task>/`` classifier per task for ``AutoModelForSequenceClassification``).
Exports are written to a temporary sibling directory and renamed into place: a crash leaves either the old
export or the new one, never a half-written directory.

``merge_config.json`` records the sha256 of every other file of the export, so that
:func:`adamerge.export.loading.load_merged` can refuse one that was modified, truncated or corrupted.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import importlib.metadata
import json
import math
import os
import platform
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from adamerge.errors import ExportError
from adamerge.storage.atomic import DiskFullError, fsync_path, is_disk_full
from adamerge.storage.manifest import file_hashes

__all__ = ["MERGE_CONFIG", "WEIGHTS", "ExportError", "export_merged"]

MERGE_CONFIG = "merge_config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # save_pretrained shards models above 50GB
RECORDED_VERSIONS = ("torch", "transformers", "lightning", "safetensors", "adamerge")


def _is_transformers_model(model: nn.Module) -> bool:
    # Checked by MRO name so that exporting a plain module never pays for importing transformers.
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in RECORDED_VERSIONS:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _jsonable(value: Any, where: str) -> Any:
    """Strict-JSON copy of ``value``; non-finite floats become null (``allow_nan`` JSON is not JSON)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.detach().cpu().tolist(), where)
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":  # arrays and numpy scalars
        return _jsonable(value.tolist(), where)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value, where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value), where)
    if isinstance(value, Mapping):  # includes OmegaConf's DictConfig
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (Sequence, set, frozenset)) and not isinstance(value, (bytes, bytearray)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ExportError(f"{where} is a {type(value).__name__}, which cannot be written to {MERGE_CONFIG}")


def _architecture(model: nn.Module, architecture: Mapping[str, Any] | None) -> dict[str, Any]:
    if _is_transformers_model(model):
        return {**_jsonable(architecture or {}, "architecture"), "transformers_class": type(model).__name__}
    if architecture is not None:
        recorded = _jsonable(architecture, "architecture")
        if not isinstance(recorded.get("_target_"), str):
            raise ExportError("architecture must be a Hydra-style dict with a '_target_' naming the class to build")
        return recorded
    return {"class": f"{type(model).__module__}.{type(model).__qualname__}", "rebuildable": False}


def _check_extra_name(name: str, reserved: Sequence[str]) -> None:
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise ExportError(f"extra file name {name!r} must be a relative path inside the export")
    if parts and parts[0] in (MERGE_CONFIG, WEIGHTS, WEIGHTS_INDEX, *reserved):
        raise ExportError(f"extra file name {name!r} would replace the export's own {parts[0]}")


def _copy_extra(source: Path | bytes, target: Path) -> None:
    """Copy one extra file (or a directory's contents) without ever replacing a file already written."""
    if isinstance(source, (bytes, bytearray)):
        pairs = [(None, target)]
    elif source.is_dir():
        pairs = [(f, target / f.relative_to(source)) for f in sorted(source.rglob("*")) if f.is_file()]
    else:
        pairs = [(source, target)]
    for src, dst in pairs:
        if dst.exists():
            raise ExportError(f"extra file {dst.name!r} collides with a file the export already has")
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src is None:
            dst.write_bytes(bytes(source))
        else:
            shutil.copyfile(src, dst)


def _write_json(path: Path, content: dict[str, Any]) -> None:
    path.write_text(json.dumps(content, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _fsync_tree(root: Path) -> None:
    for path in [*sorted(root.rglob("*"), reverse=True), root]:  # files before the directories naming them
        fsync_path(path)


def export_merged(
    model: nn.Module,
    directory: str | Path,
    *,
    merge_config: Mapping[str, Any],
    architecture: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    extra_files: Mapping[str, Path | bytes] | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    class_names: Mapping[str, Sequence[str] | None] | None = None,
    preprocessors: Mapping[str, Any] | None = None,
    per_task_hf: bool = False,
    license: str | None = None,
    model_card: bool = True,
    sign: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (the merged backbone), the task ``heads`` and ``merge_config`` to ``directory`` atomically.

    ``class_names`` (e.g. the datasets' ``ClassLabel`` names; a head's own names win) and ``preprocessors``
    (each task's data preprocessor, so raw images / sentences can be classified after loading) are recorded
    per task. ``per_task_hf`` also writes ``tasks/<task>/`` transformers classifiers (sequence-classification
    heads on a transformers body only), each with a copy of the top-level extra files (the tokenizer).
    ``license`` is the model card's license (default: what the sources' own model cards declare).
    ``sign`` (``{key: <EC private key PEM>}`` or ``{certificate: ..., key: ..., chain: [...]}``) signs every file,
    ``merge_config.json`` included, into ``model.sig`` (:mod:`adamerge.export.signing`). Returns the directory.
    """
    from adamerge.export.heads import HEADS_DIR, head_records, write_head_files
    from adamerge.methods.learned.merged import MergedModel
    from adamerge.export.model_card import HEATMAP, MODEL_CARD, write_model_card

    directory = Path(directory).expanduser().absolute()
    if isinstance(model, MergedModel):
        raise ExportError("export the fused module from merge_and_unload(), not the MergedModel wrapper")
    if directory.exists():
        if not overwrite:
            raise ExportError(f"{directory} already exists; pass overwrite=True to replace it")
        if not directory.is_dir() or (any(directory.iterdir()) and not (directory / MERGE_CONFIG).is_file()):
            raise ExportError(f"{directory} exists and is not an export (no {MERGE_CONFIG}); refusing to replace it")
    # Everything that can fail on bad arguments fails here, before a byte is written.
    reserved = [HEADS_DIR, *([MODEL_CARD, HEATMAP] if model_card else []), *(["tasks"] if per_task_hf else [])]
    extras = {name: src if isinstance(src, (bytes, bytearray)) else Path(src) for name, src in (extra_files or {}).items()}
    for name, source in extras.items():
        _check_extra_name(name, reserved)
        if isinstance(source, Path) and not source.exists():
            raise ExportError(f"extra file {name!r}: {source} does not exist")
    if sign is not None:
        from adamerge.export.signing import check_sign_config

        check_sign_config(sign, where="sign")
    records = head_records(heads or {}, class_names, preprocessors)
    if per_task_hf:
        _check_per_task_hf(model, records)
    config = {
        **_jsonable(dict(merge_config), "merge_config"),
        "architecture": _architecture(model, architecture),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        if _is_transformers_model(model):
            model.save_pretrained(staging)  # owns model.safetensors (and drops tied copies itself)
            if not (staging / WEIGHTS).is_file() and not (staging / WEIGHTS_INDEX).is_file():
                raise ExportError(f"save_pretrained wrote no {WEIGHTS} for {type(model).__name__}")
        else:
            save_model(model, str(staging / WEIGHTS), metadata={"format": "pt"})
        write_head_files(staging, heads or {}, records)
        if per_task_hf:
            _write_task_classifiers(staging, model, heads or {}, records, extras)
        for name, source in extras.items():  # after the export's own files, so a clash is caught, not lost
            _copy_extra(source, staging / name)
        if (staging / MERGE_CONFIG).exists():
            raise ExportError(f"an extra file collides with the export's own {MERGE_CONFIG}")
        if records:
            config["heads"] = _jsonable(records, "heads")
        if model_card:
            write_model_card(staging, config, name=directory.name, license=license)
        # Written last, over the bytes actually on disk: the loader checks every file against these.
        _write_json(staging / MERGE_CONFIG, {**config, "files": file_hashes(staging, exclude={MERGE_CONFIG})})
        if sign is not None:  # over the final bytes, before the rename: an export appears signed or not at all
            from adamerge.export.signing import sign_export

            sign_export(staging, sign)
        _fsync_tree(staging)
        _swap_into_place(staging, directory)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise DiskFullError(directory, _weight_bytes(model, heads or {}), error, at_least=True) from error
        raise
    return directory


def _weight_bytes(model: nn.Module, heads: Mapping[str, nn.Module]) -> int:
    """The bytes of the backbone's and the heads' tensors: what an export needs at least (the rest is small)."""
    modules = [model, *heads.values()]
    return sum(t.numel() * t.element_size() for module in modules for t in module.state_dict().values())


def _check_per_task_hf(model: nn.Module, records: Mapping[str, Mapping[str, Any]]) -> None:
    if not _is_transformers_model(model):
        raise ExportError(f"per_task_hf needs a transformers backbone, not {type(model).__name__}: it writes "
                          "one AutoModelForSequenceClassification directory per task")
    other = {task: record["kind"] for task, record in records.items() if record["kind"] != "sequence_classification"}
    if not records or other:
        raise ExportError(f"per_task_hf needs a transformers sequence-classification head for every task; "
                          f"{'no heads were given' if not records else f'these tasks have other heads: {other}'}")


def _write_task_classifiers(staging: Path, model: nn.Module, heads: Mapping[str, nn.Module],
                            records: dict[str, dict[str, Any]], extras: Mapping[str, Path | bytes]) -> None:
    """``tasks/<task>/``: the task's classifier around the merged body, plus the top-level extra files."""
    from adamerge.export.hf_tasks import save_task_classifier

    for task, head in heads.items():
        relative = save_task_classifier(staging, task, model, head, records[task]["class_names"])
        records[task]["transformers_dir"] = relative
        for name, source in extras.items():
            if len(Path(name).parts) == 1 and (isinstance(source, (bytes, bytearray)) or source.is_file()):
                _copy_extra(source, staging / relative / name)


def _swap_into_place(staging: Path, directory: Path) -> None:
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(directory, old)
    try:
        os.replace(staging, directory)
    except BaseException:
        if old is not None:
            os.replace(old, directory)
        raise
    fsync_path(directory.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
