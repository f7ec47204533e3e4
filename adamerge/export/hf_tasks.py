"""Per-task transformers classifiers in an export: ``tasks/<task>/`` directories a plain transformers user opens.

A merged text export holds one merged body and K classification heads; ``AutoModelForSequenceClassification``
users want one ordinary classifier per task. With ``per_task_hf`` (Hydra ``export.per_task_hf=true``) the export
also writes, for every task, that task's fine-tuned ``*ForSequenceClassification`` with its body replaced by the
merged body, its config carrying the task's class names as ``id2label`` / ``label2id``, saved with
``save_pretrained`` (plus the export's tokenizer files). It computes exactly what adamerge evaluated: the
classifier's own ``forward`` over the merged body, which is what :class:`~adamerge.backbones.hf.SequenceClassificationHead`
replays.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from adamerge.backbones.hf import SequenceClassificationHead
from adamerge.errors import ExportError

__all__ = ["TASKS_DIR", "task_classifier", "save_task_classifier"]

TASKS_DIR = "tasks"


def task_classifier(body: nn.Module, head: SequenceClassificationHead, class_names: Sequence[str] | None = None) -> nn.Module:
    """The task's full sequence classifier: a copy of its fine-tuned classifier around ``body`` (not copied)."""
    if not isinstance(head, SequenceClassificationHead):
        raise ExportError(f"a per-task transformers classifier needs a SequenceClassificationHead, got {type(head).__name__}")
    model = copy.deepcopy(head.model).cpu()
    setattr(model, head.prefix, body)  # replaces the replay stub: the merged body becomes the model's own
    if class_names is not None:
        model.config.id2label = dict(enumerate(str(name) for name in class_names))
        model.config.label2id = {str(name): index for index, name in enumerate(class_names)}
    return model.eval()


def save_task_classifier(directory: Path, task: str, body: nn.Module, head: SequenceClassificationHead,
                         class_names: Sequence[str] | None = None) -> str:
    """``save_pretrained`` the task's classifier into ``directory/tasks/<task>``; returns that relative path."""
    relative = f"{TASKS_DIR}/{task}"
    task_classifier(body, head, class_names).save_pretrained(directory / relative)
    return relative
