"""Task heads inside an export: each task's frozen head as a safetensors file, rebuilt without running its code.

The merged backbone alone classifies nothing; the export carries every task's head next to it, described in
``merge_config.json`` under ``heads.<task>`` (kind, file, sha256, class names, how raw inputs are preprocessed).
Head kinds:

- ``linear``: an ``nn.Linear`` (the demo's probes, user linear heads): ``weight`` [C, D] and ``bias`` [C];
- ``clip_zero_shot``: a :class:`~adamerge.backbones.clip.ZeroShotHead`: ``text_embeddings`` [C, D] (the class names'
  text embeddings averaged over the templates), ``logit_scale`` and ``projection``; the class names and
  templates that made them are recorded with it;
- ``sequence_classification``: a :class:`~adamerge.backbones.hf.SequenceClassificationHead`: the fine-tuned
  classifier's tensors outside its body (``classifier.*``, DeBERTa's ``pooler.*``, DistilBERT's
  ``pre_classifier.*``) and its transformers config (``id2label``); rebuilt as the concrete transformers class
  it records (never remote code);
- ``identity``: the backbone already outputs the task's logits (causal LMs, full classifiers): no file;
- ``module``: any other head: its state dict and class name; rebuilt only for classes in ``TRUSTED_HEADS`` or
  named in ``trust``, otherwise ``load_merged(heads={task: module})`` supplies the module to fill.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adamerge.backbones.heads import Identity
from adamerge.data.preprocessing import preprocessor_record
from adamerge.errors import ExportError
from adamerge.pool.checkpoints import sha256_of
from adamerge.storage.renamed import recorded_target

__all__ = ["HEADS_DIR", "HEAD_KINDS", "TRUSTED_HEADS", "check_task_names", "head_kind", "head_records",
           "own_class_names", "read_head", "write_head_files"]

HEADS_DIR = "heads"
HEAD_KINDS = ("linear", "clip_zero_shot", "sequence_classification", "identity", "module")
# Head classes rebuilt from their name with no arguments (their state comes from the head file).
TRUSTED_HEADS = frozenset({"torch.nn.modules.linear.Identity"})
# Task names become file and module names: no separators, no leading dot, no '.' (nn.ModuleDict refuses it).
_TASK_NAME = re.compile(r"[A-Za-z0-9_+-]+")
_GENERIC_LABEL = re.compile(r"LABEL_\d+")


def check_task_names(tasks: Iterable[str], where: str = "task") -> None:
    """Every task name is usable as a file name inside the export and as a module name."""
    for task in tasks:
        if not _TASK_NAME.fullmatch(str(task)):
            raise ExportError(f"{where} name {task!r} cannot name a head file: use letters, digits, '_', '-' or '+'")


def head_kind(head: nn.Module) -> str:
    from adamerge.backbones.clip import ZeroShotHead
    from adamerge.backbones.hf import SequenceClassificationHead

    if isinstance(head, ZeroShotHead):
        return "clip_zero_shot"
    if isinstance(head, SequenceClassificationHead):
        return "sequence_classification"
    if isinstance(head, Identity):
        return "identity"
    if type(head) is nn.Linear:
        return "linear"
    return "module"


def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def own_class_names(head: nn.Module) -> list[str] | None:
    """The class names a head itself knows: a zero-shot head's, a transformers classifier's non-generic ``id2label``."""
    kind = head_kind(head)
    if kind == "clip_zero_shot":
        return head.class_names
    if kind == "sequence_classification":
        id2label = getattr(head.model.config, "id2label", None) or {}
        names = [str(id2label[i]) for i in sorted(id2label, key=int)]
        return None if not names or all(_GENERIC_LABEL.fullmatch(n) for n in names) else names
    return None


def _num_outputs(head: nn.Module) -> int | None:
    kind = head_kind(head)
    if kind == "linear":
        return head.out_features
    if kind == "clip_zero_shot":
        return head.num_classes
    if kind == "sequence_classification":
        return head.num_labels
    return None


def head_records(heads: Mapping[str, nn.Module], class_names: Mapping[str, Sequence[str] | None] | None = None,
                 preprocessors: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """What ``merge_config.json`` says about each head, before any file is written (bad input fails here).

    A head's own class names (zero-shot heads, transformers ``id2label``) win over ``class_names`` (typically
    the dataset's ``ClassLabel`` names), whose count must match the head's outputs.
    """
    check_task_names(heads)
    class_names, preprocessors = dict(class_names or {}), dict(preprocessors or {})
    unknown = sorted((set(class_names) | set(preprocessors)) - set(heads))
    if unknown:
        raise ExportError(f"class names or preprocessors given for tasks without a head: {unknown}")
    records = {}
    for task, head in heads.items():
        if not isinstance(head, nn.Module):
            raise ExportError(f"the head of task {task!r} is a {type(head).__name__}, not a torch module")
        kind, outputs = head_kind(head), _num_outputs(head)
        names = own_class_names(head) or class_names.get(task)
        names = [str(n) for n in names] if names is not None else None
        if names is not None and outputs is not None and len(names) != outputs:
            raise ExportError(f"task {task!r}: {len(names)} class names for a head with {outputs} outputs")
        record: dict[str, Any] = {"kind": kind, "num_classes": outputs, "class_names": names,
                                  "inputs": preprocessor_record(preprocessors.get(task))}
        if kind == "clip_zero_shot":
            record["templates"] = head.templates
        elif kind == "sequence_classification":
            record["transformers_class"] = type(head.model).__name__
            record["config"] = json.loads(head.model.config.to_json_string(use_diff=False))
        elif kind == "module":
            record["class"] = _class_path(head)
        records[task] = record
    return records


def _head_tensors(head: nn.Module, kind: str) -> dict[str, Tensor] | None:
    if kind == "identity":
        return None
    if kind == "clip_zero_shot":
        state = {"text_embeddings": head.text_embeddings, "logit_scale": head.logit_scale}
        if head.projection is not None:
            state["projection"] = head.projection
    elif kind == "sequence_classification":
        state = head.model.state_dict()  # the body was swapped for a stub without tensors
    else:
        state = head.state_dict()
    # Copies: safetensors refuses tensors that share storage, and a head may sit on the GPU.
    return {name: tensor.detach().cpu().contiguous().clone() for name, tensor in state.items()}


def write_head_files(directory: Path, heads: Mapping[str, nn.Module], records: dict[str, dict[str, Any]]) -> None:
    """Write ``heads/<task>.safetensors`` for every head with tensors; add its file and sha256 to its record."""
    for task, head in heads.items():
        record = records[task]
        tensors = _head_tensors(head, record["kind"])
        record["file"] = record["sha256"] = None
        if tensors is None:
            continue
        relative = f"{HEADS_DIR}/{task}.safetensors"
        (directory / HEADS_DIR).mkdir(exist_ok=True)
        save_file(tensors, str(directory / relative), metadata={"format": "pt", "adamerge_head": record["kind"],
                                                              "task": task})
        record["file"], record["sha256"] = relative, sha256_of(directory / relative)


# --- reading back ------------------------------------------------------------------------------------------
def _head_file(export_dir: Path, task: str, record: Mapping[str, Any], verify: bool) -> Path:
    name = record.get("file")
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ExportError(f"{export_dir / 'merge_config.json'}: the head of task {task!r} names no file inside "
                            f"the export (file={name!r})")
    file = export_dir / name
    if not file.is_file():
        raise ExportError(f"head file {file} of task {task!r} is missing: merge_config.json records it as part "
                            "of the export")
    if verify and sha256_of(file) != record.get("sha256"):
        raise ExportError(f"head file {file} of task {task!r} does not match the sha256 recorded in "
                            "merge_config.json: it was modified, truncated or corrupted after export; pass "
                            "verify=False to load it anyway")
    return file


def _read_tensors(file: Path, task: str) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except Exception as error:  # a truncated or foreign file: safetensors says only "invalid header"
        raise ExportError(f"head file {file} of task {task!r} is not a readable safetensors file: {error}") from error


def _require(tensors: Mapping[str, Tensor], names: Sequence[str], file: Path, task: str) -> None:
    missing = [name for name in names if name not in tensors]
    if missing:
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        raise ExportError(f"head file {file} of task {task!r} lacks {missing}; it holds {shapes}")


def _build_linear(record: Mapping[str, Any], tensors: Mapping[str, Tensor], file: Path, task: str) -> nn.Module:
    _require(tensors, ["weight"], file, task)
    weight = tensors["weight"]
    if weight.ndim != 2:
        raise ExportError(f"head file {file} of task {task!r}: weight must be [classes, features], got "
                            f"{tuple(weight.shape)}")
    return nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in tensors)


def _build_zero_shot(record: Mapping[str, Any], tensors: Mapping[str, Tensor], file: Path, task: str) -> nn.Module:
    from adamerge.backbones.clip import ZeroShotHead

    _require(tensors, ["text_embeddings", "logit_scale"], file, task)
    try:
        return ZeroShotHead(tensors["text_embeddings"], tensors["logit_scale"], tensors.get("projection"),
                            class_names=record.get("class_names"), templates=record.get("templates"))
    except ValueError as error:
        raise ExportError(f"head file {file} of task {task!r}: {error}") from error


def _build_sequence_classification(record: Mapping[str, Any], tensors: Mapping[str, Tensor], file: Path,
                                   task: str) -> nn.Module:
    import transformers

    from adamerge.backbones.hf import SequenceClassificationHead

    config, name = record.get("config") or {}, str(record.get("transformers_class"))
    try:  # CONFIG_MAPPING is lazy: .get() does not see the types it has not imported yet
        config_class = transformers.CONFIG_MAPPING[config["model_type"]] if isinstance(config, Mapping) else None
    except KeyError:
        config_class = None
    model_class = getattr(transformers, name, None)
    # Only transformers' own concrete classes, chosen by name: an export never brings code (no auto_map).
    if config_class is None or not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise ExportError(f"head of task {task!r} ({file}): transformers has no model class {name!r} for model "
                            f"type {config.get('model_type') if isinstance(config, Mapping) else None!r}")
    with torch.device("meta"):  # the body is replaced at once: never allocate (or initialise) it
        model = model_class(config_class.from_dict(dict(config)))
    head = SequenceClassificationHead(model)
    head.model.to_empty(device="cpu")
    uninitialised = sorted(set(dict(head.model.named_buffers())) - set(tensors))
    if uninitialised:
        raise ExportError(f"head file {file} of task {task!r} lacks the buffers {uninitialised}")
    return head


def _build_module(record: Mapping[str, Any], trust: frozenset[str], file: Path | None, task: str) -> nn.Module:
    target = recorded_target(str(record.get("class")), TRUSTED_HEADS | trust)  # maybe written before 0.3
    if target not in TRUSTED_HEADS | trust:
        raise ExportError(f"head of task {task!r} is a {target}, which an export does not rebuild by itself: pass "
                            f"heads={{{task!r}: <the module>}} to load_merged, or trust=[{target!r}] to build it "
                            "with no arguments")
    module_name, _, attribute = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)()
    except Exception as error:
        raise ExportError(f"head of task {task!r}: could not build {target} ({error}); pass heads={{{task!r}: "
                            "<the module>}} instead") from error


def read_head(export_dir: str | Path, task: str, record: Mapping[str, Any], *, module: nn.Module | None = None,
              trust: Iterable[str] = (), verify: bool = True) -> nn.Module:
    """Task ``task``'s frozen head from the export, in eval mode on the CPU; ``module`` is filled instead of built."""
    export_dir = Path(export_dir)
    kind = record.get("kind") if isinstance(record, Mapping) else None
    if kind not in HEAD_KINDS:
        raise ExportError(f"{export_dir / 'merge_config.json'}: the head of task {task!r} has unknown kind "
                            f"{kind!r} (known: {', '.join(HEAD_KINDS)})")
    if kind == "identity":
        return module if module is not None else Identity()
    file = _head_file(export_dir, task, record, verify)
    tensors = _read_tensors(file, task)
    if module is not None:
        head = module
    elif kind == "linear":
        head = _build_linear(record, tensors, file, task)
    elif kind == "clip_zero_shot":
        head = _build_zero_shot(record, tensors, file, task)
    elif kind == "sequence_classification":
        head = _build_sequence_classification(record, tensors, file, task)
    else:
        head = _build_module(record, frozenset(trust), file, task)
    target = head.model if head_kind(head) == "sequence_classification" else head
    try:
        target.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise ExportError(f"head file {file} of task {task!r} does not fit {type(head).__name__}: {error}") from error
    return head.eval().requires_grad_(False)
