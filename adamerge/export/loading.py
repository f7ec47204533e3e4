"""Loading an export back, safely: the bytes are the ones exported, and the export chooses no code to run.

An export is made to be shared, so loading one must be as safe as loading a safetensors file:

- every file is checked against the sha256 that ``merge_config.json`` records (``verify=False`` opts out);
- the architecture is rebuilt only from an allow-list: adamerge's own backbones (``TRUSTED_ARCHITECTURES``),
  or concrete ``transformers`` model classes (``from_pretrained``, never remote code). Anything else is
  refused with its name; pass ``model=`` (a module you built) or ``trust=[name]`` to load it anyway;
- architecture arguments must be plain values: a nested ``_target_`` (a callable hidden in an argument) or
  Hydra's ``_args_`` / ``_partial_`` keys are refused, so nothing in the file is ever called;
- task heads are rebuilt by kind from their safetensors files (:mod:`adamerge.export.heads`), under the same rules.

:func:`load_merged` returns the multi-task model (backbone + every task's head), or one task's model;
:func:`load_backbone` returns the merged backbone alone (what ``load_merged`` returned before heads were
exported, and the only way to open an export written without heads).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, load_model
from torch import nn

from adamerge.export.writer import MERGE_CONFIG, WEIGHTS, WEIGHTS_INDEX, ExportError
from adamerge.storage.manifest import find_damage
from adamerge.storage.renamed import recorded_target

if TYPE_CHECKING:
    from adamerge.export.multitask import MultiTaskModel, TaskModel

__all__ = ["TRUSTED_ARCHITECTURES", "load_backbone", "load_merged", "read_merge_config", "verify_export"]

# The backbones adamerge itself defines and exports with a ``_target_`` record.
TRUSTED_ARCHITECTURES = frozenset({
    "adamerge.backbones.efficientnet.EfficientNetLite0",
    "adamerge.backbones.efficientnet.efficientnet_lite0",
})


def read_merge_config(path: str | Path) -> dict[str, Any]:
    """The ``merge_config.json`` of an export directory (or the file itself)."""
    path = Path(path).expanduser()
    file = path / MERGE_CONFIG if path.is_dir() else path
    if not path.exists():
        raise ExportError(f"no export at {path}: the path does not exist")
    if not file.is_file():
        raise ExportError(f"{path} is not an export: it has no {MERGE_CONFIG}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ExportError(f"{file} is not valid JSON: {exc}") from exc
    _check_layout(config, file)
    return config


def _check_layout(config: Any, file: Path) -> None:
    """Refuse a merge_config.json whose parts the loader reads have the wrong JSON type, naming the part: an export
    is shared, so its file may be hand-edited or forged, and must fail as a bad export, not as a crash."""
    if not isinstance(config, dict):
        raise ExportError(f"{file} is not an export's config: it holds a JSON {type(config).__name__}, not an object")
    architecture = config.get("architecture")
    if architecture is not None and not isinstance(architecture, dict):
        raise ExportError(f"{file}: architecture must be an object, not {architecture!r}")
    for key in ("_target_", "transformers_class", "class"):
        if isinstance(architecture, dict) and key in architecture and not isinstance(architecture[key], str):
            raise ExportError(f"{file}: architecture.{key} must be a string, not {architecture[key]!r}")
    files = config.get("files")
    if files is not None and not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
        raise ExportError(f"{file}: files must map file names to sha256 strings, not {files!r}"[:300])
    heads = config.get("heads")
    if heads is not None and not (isinstance(heads, dict) and all(isinstance(v, dict) for v in heads.values())):
        raise ExportError(f"{file}: heads must map task names to head records (objects), not {heads!r}"[:300])
    for task, record in (heads or {}).items():
        names = record.get("class_names")
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ExportError(f"{file}: heads.{task}.class_names must be a list of strings or null, not {names!r}"[:300])
        inputs = record.get("inputs")
        if inputs is not None and not isinstance(inputs, dict):
            raise ExportError(f"{file}: heads.{task}.inputs must be an object or null, not {inputs!r}"[:300])


def _check_signature(path: Path, signature: str | os.PathLike | Mapping[str, Any] | None) -> None:
    if signature is not None:  # first: merge_config.json, which every later check trusts, is one of the signed files
        from adamerge.export.signing import verify_signature

        verify_signature(path, signature)


def verify_export(path: str | Path, config: Mapping[str, Any] | None = None) -> None:
    """Check every file recorded in ``merge_config.json`` exists with its recorded sha256."""
    path = Path(path).expanduser()
    config = read_merge_config(path) if config is None else config
    recorded = config.get("files")
    if not isinstance(recorded, Mapping) or not recorded:
        raise ExportError(f"{path / MERGE_CONFIG} records no file checksums, so the export cannot be verified "
                          "(written by adamerge < 0.2?); pass verify=False to load it anyway")
    damage = find_damage(path, recorded)
    if damage is not None and damage.problem == "outside":
        raise ExportError(f"{path / MERGE_CONFIG} records a file outside the export: {damage.name!r}")
    if damage is not None and damage.problem == "missing":
        raise ExportError(f"{path / damage.name} is missing: {MERGE_CONFIG} records it as part of the export")
    if damage is not None:
        raise ExportError(
            f"{path / damage.name} does not match the sha256 recorded in {MERGE_CONFIG} (recorded "
            f"{str(damage.expected)[:16]}…, found {str(damage.actual)[:16]}…): it was modified, truncated or "
            "corrupted after export; pass verify=False to load it anyway"
        )


def load_backbone(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    map_location: str = "cpu",
    verify: bool = True,
    trust: Iterable[str] = (),
    signature: str | os.PathLike | Mapping[str, Any] | None = None,
) -> nn.Module:
    """The merged backbone of an export alone (or ``model`` filled with its weights), in eval mode.

    ``verify`` checks every file against its recorded sha256 first. ``trust`` names extra architecture
    targets (``"my_package.MyBackbone"``) you allow this export to build, beyond ``TRUSTED_ARCHITECTURES``.
    ``signature`` (the signer's public key, see :func:`adamerge.export.signing.verify_signature`) checks the export's
    signature before anything of it is read.
    """
    path = Path(path).expanduser()
    _check_signature(path, signature)
    return _load_backbone(path, read_merge_config(path), model, map_location, verify, frozenset(trust))


def load_merged(
    path: str | Path,
    model: nn.Module | None = None,
    *,
    task: str | None = None,
    heads: Mapping[str, nn.Module] | None = None,
    map_location: str = "cpu",
    verify: bool = True,
    trust: Iterable[str] = (),
    signature: str | os.PathLike | Mapping[str, Any] | None = None,
) -> MultiTaskModel | TaskModel:
    """The exported multi-task model (merged backbone + every task's frozen head), in eval mode.

    With ``task`` only that task's head is read and a single-task :class:`~adamerge.export.multitask.TaskModel`
    (backbone + head, ``forward(inputs) -> logits``) is returned. ``model`` is a backbone module to fill
    instead of rebuilding one; ``heads`` maps tasks to head modules to fill (needed for heads of classes an
    export does not rebuild by itself). ``trust`` allows extra architecture and head classes by name.
    ``signature`` (the signer's public key PEM, or ``{key: ...}`` / ``{certificate_chain: [...]}``) refuses an
    export whose files or ``merge_config.json`` changed since it was signed, naming the file.
    Exports written without heads load with :func:`load_backbone`.
    """
    from adamerge.export.heads import read_head
    from adamerge.export.multitask import MultiTaskModel, TaskModel
    from adamerge.data.preprocessing import preprocessor_from_record

    path = Path(path).expanduser()
    _check_signature(path, signature)
    config = read_merge_config(path)
    records = config.get("heads")
    if not isinstance(records, Mapping) or not records:
        raise ExportError(f"{path} holds no task heads ({MERGE_CONFIG} records none: it was exported without them); "
                          "adamerge.load_backbone(path) loads its merged backbone")
    if task is not None and task not in records:
        raise ExportError(f"{path} has no task {task!r}; its tasks are {list(records)}")
    unknown = sorted(set(heads or {}) - set(records))
    if unknown:
        raise ExportError(f"heads= names tasks {unknown} that {path} does not have; its tasks are {list(records)}")
    trusted = frozenset(trust)
    backbone = _load_backbone(path, config, model, map_location, verify, trusted)
    built, names, preprocessors = {}, {}, {}
    for name in [task] if task is not None else list(records):
        record = records[name]
        # verify_export (in _load_backbone) has already hashed every file of the export, the heads included.
        built[name] = read_head(path, name, record, module=(heads or {}).get(name), trust=trusted,
                                verify=False).to(map_location)
        names[name] = record.get("class_names")
        inputs = record.get("inputs")
        try:
            preprocessors[name] = preprocessor_from_record(inputs, path) if inputs else None
        except (TypeError, ValueError) as error:
            raise ExportError(f"{path / MERGE_CONFIG}: heads.{name}.inputs cannot rebuild a preprocessor: {error}") from error
    if task is not None:
        return TaskModel(backbone, built[task], task, names[task], preprocessors[task]).eval()
    return MultiTaskModel(backbone, built, names, preprocessors).eval()


def _load_backbone(path: Path, config: Mapping[str, Any], model: nn.Module | None, map_location: str, verify: bool,
                   trust: frozenset[str]) -> nn.Module:
    architecture = config.get("architecture") or {}
    if not (path / WEIGHTS).is_file() and not (path / WEIGHTS_INDEX).is_file():
        raise ExportError(f"{path} has no weights: {WEIGHTS} is missing")
    if verify:
        verify_export(path, config)
    if model is None and "transformers_class" in architecture:
        import transformers

        # Only concrete classes of transformers itself: never an Auto class that could pull remote code.
        cls = getattr(transformers, str(architecture["transformers_class"]), None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise ExportError(f"{path}: transformers has no model class {architecture['transformers_class']!r}")
        return cls.from_pretrained(path).to(map_location).eval()
    if model is None and "_target_" in architecture:
        model = _build_architecture(path, architecture, trust)
    if model is None:
        raise ExportError(
            f"{path}: architecture {architecture.get('class', '<unknown>')} was not recorded in a rebuildable "
            "form; build the module yourself and pass it as model="
        )
    _load_weights(model, path, map_location)
    return model.to(map_location).eval()


def _callables_in(value: Any, where: str) -> list[str]:
    """Where ``value`` holds something that would name code to run (a ``_target_`` or a Hydra control key)."""
    found = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if str(key).startswith("_"):
                found.append(f"{where}.{key}")
            found += _callables_in(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _callables_in(item, f"{where}[{index}]")
    return found


def _build_architecture(path: Path, architecture: Mapping[str, Any], trust: frozenset[str]) -> nn.Module:
    """Call an allow-listed target with plain keyword arguments; no other code is ever resolved."""
    target = recorded_target(str(architecture["_target_"]), TRUSTED_ARCHITECTURES | trust)
    if target not in TRUSTED_ARCHITECTURES | trust:
        raise ExportError(
            f"{path}: refusing to build architecture {target!r} recorded in {MERGE_CONFIG}: it is not one of "
            f"adamerge's architectures {sorted(TRUSTED_ARCHITECTURES)}. Pass model= (a module you built), or "
            f"trust=[{target!r}] if you trust this export"
        )
    arguments = {key: value for key, value in architecture.items() if key != "_target_"}
    hidden = _callables_in(arguments, "architecture")
    if hidden:
        raise ExportError(f"{path}: {MERGE_CONFIG} architecture arguments may only be plain values, but "
                          f"{', '.join(hidden)} would name code to run; refusing to load")
    module_name, _, attribute = target.rpartition(".")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
        model = builder(**arguments)
    except Exception as exc:
        raise ExportError(f"{path}: could not build {target}; pass model= instead ({exc})") from exc
    if not isinstance(model, nn.Module):
        raise ExportError(f"{path}: {target} built a {type(model).__name__}, not a torch module")
    return model


def _load_weights(model: nn.Module, path: Path, map_location: str) -> None:
    try:
        if (path / WEIGHTS).is_file():
            load_model(model, path / WEIGHTS, strict=True, device=map_location)
        else:
            _load_sharded(model, path, map_location)
    except ExportError:
        raise
    except Exception as exc:  # a foreign or forged file: safetensors, json and torch each raise their own types
        raise ExportError(f"the weights in {path} cannot be read into {type(model).__name__} (a damaged or forged "
                          f"safetensors header, or weights that do not fit): {type(exc).__name__}: {exc}") from exc


def _load_sharded(model: nn.Module, path: Path, map_location: str) -> None:
    from adamerge.pool.task_vectors import tied_aliases

    shards = sorted(set(json.loads((path / WEIGHTS_INDEX).read_text())["weight_map"].values()))
    state = {}
    for shard in shards:
        state.update(load_file(path / shard, device=map_location))
    own = model.state_dict()
    aliases = tied_aliases(own)
    canonical = {name: aliases.get(name, name) for name in own}
    present = {canonical[k] for k in state if k in canonical}  # save_pretrained keeps one name per tied group
    missing = [k for k in own if k not in state and canonical[k] not in present]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ExportError(f"the weights in {path} do not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
