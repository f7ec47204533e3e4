"""The deployable merged model: one merged backbone serving K tasks through their frozen heads.

:func:`adamerge.load_merged` returns a :class:`MultiTaskModel` (or, for one task, a :class:`TaskModel`). Both
compute exactly what the run evaluated -- ``head(backbone(inputs))`` through the same call as the evaluation
(:func:`adamerge.methods.learned.merged.run_backbone`) -- and turn raw inputs (images, sentences) into model inputs with the
preprocessing the run recorded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adamerge.data.batches import to_device
from adamerge.methods.learned.merged import run_backbone

__all__ = ["MultiTaskModel", "TaskModel"]


def _as_batch(raw: Any, pairs: bool = False) -> list:
    """One raw example (a sentence, a sentence pair, an image) or a batch of them (any sequence: a list, a
    ``datasets`` column, an N×H×W×C array) as a list."""
    if isinstance(raw, (str, bytes)) or (pairs and isinstance(raw, tuple) and len(raw) == 2
                                         and all(isinstance(part, str) for part in raw)):
        return [raw]
    if isinstance(raw, np.ndarray):
        return list(raw) if raw.ndim == 4 else [raw]
    if isinstance(raw, Iterable) and not isinstance(raw, Mapping) and not hasattr(raw, "getpixel"):  # not a PIL image
        return list(raw)
    return [raw]


class TaskModel(nn.Module):
    """One task's classifier: the merged backbone and that task's frozen head, ``forward(inputs) -> logits``.

    ``inputs`` are model inputs: a tensor (images) or a mapping of tensors (tokenised text). :meth:`predict`
    also takes raw examples when the export recorded the task's preprocessing.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, task: str, class_names: Sequence[str] | None = None,
                 preprocessor: Any = None) -> None:
        super().__init__()
        self.backbone, self.head, self.task = backbone, head, task
        self.class_names = list(class_names) if class_names is not None else None
        self.preprocessor = preprocessor

    def forward(self, inputs: Any) -> Tensor:
        return self.head(run_backbone(self.backbone, inputs))

    def preprocess(self, raw: Any) -> Any:
        """Raw examples (one or a list: images as PIL images or H×W×3 arrays, sentences as strings, sentence pairs
        as 2-tuples) to model inputs, as the run preprocessed this task's data."""
        if self.preprocessor is None:
            raise ValueError(f"the export records no input preprocessing for task {self.task!r}: pass model-ready "
                             "inputs (a tensor, or a mapping of tensors) instead of raw examples")
        columns = getattr(self.preprocessor, "text_columns", None)
        batch = _as_batch(raw, pairs=columns is not None and len(columns) == 2)
        if columns is None:
            return self.preprocessor({self.preprocessor.image_column: batch})["inputs"]
        if len(columns) == 1:
            return self.preprocessor({columns[0]: [str(text) for text in batch]})["inputs"]
        bad = [example for example in batch if not (isinstance(example, (list, tuple)) and len(example) == 2)]
        if bad:
            raise ValueError(f"task {self.task!r} takes sentence pairs ({', '.join(columns)}): pass 2-tuples, got {bad[0]!r}")
        return self.preprocessor({columns[0]: [str(a) for a, _ in batch], columns[1]: [str(b) for _, b in batch]})["inputs"]

    @torch.no_grad()
    def predict(self, inputs: Any, batch_size: int | None = None) -> list:
        """Predicted classes: their names where the export knows them, else indices (per token for causal LMs).

        ``inputs`` are model inputs (a tensor or a mapping of tensors) or raw examples (see :meth:`preprocess`),
        which are preprocessed ``batch_size`` at a time (all at once by default).
        """
        if isinstance(inputs, (Tensor, Mapping)):
            batches = [inputs]
        else:
            columns = getattr(self.preprocessor, "text_columns", None)
            examples = _as_batch(inputs, pairs=columns is not None and len(columns) == 2)
            size = batch_size or max(len(examples), 1)
            batches = [self.preprocess(examples[i:i + size]) for i in range(0, len(examples), size)]
        device = next(iter(self.parameters()), torch.empty(0)).device
        indices = [self(to_device(batch, device)).argmax(-1).cpu() for batch in batches]
        flat = torch.cat(indices).tolist() if indices else []
        if self.class_names is None:
            return flat
        return [self.class_names[i] for i in flat]


class MultiTaskModel(nn.Module):
    """The merged backbone with every task's frozen head: ``forward(inputs, task=...)`` gives that task's logits.

    ``tasks`` lists the tasks, ``class_names(task)`` their classes, ``task_model(task)`` a single-task module that
    shares this backbone, ``predict(inputs, task=...)`` the predicted classes. ``backbone`` is the merged
    backbone itself (what ``adamerge.load_backbone`` returns).
    """

    def __init__(self, backbone: nn.Module, heads: Mapping[str, nn.Module],
                 class_names: Mapping[str, Sequence[str] | None] | None = None,
                 preprocessors: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(dict(heads))
        self._class_names = {task: list(names) if names is not None else None
                             for task, names in (class_names or {}).items()}
        self._preprocessors = dict(preprocessors or {})

    @property
    def tasks(self) -> list[str]:
        return list(self.heads)

    def _task(self, task: str | None) -> str:
        if task is None and len(self.heads) == 1:
            return self.tasks[0]
        if task not in self.heads:
            raise KeyError(f"task {task!r} is not one of this model's tasks {self.tasks}: pass task=<one of them>")
        return task

    def class_names(self, task: str) -> list[str] | None:
        """The task's class names in output order (``None`` where neither the head nor the data declared them)."""
        return self._class_names.get(self._task(task))

    def task_model(self, task: str) -> TaskModel:
        """The single-task model for ``task`` (shares this model's backbone and head, no copy)."""
        task = self._task(task)
        return TaskModel(self.backbone, self.heads[task], task, self._class_names.get(task), self._preprocessors.get(task))

    def forward(self, inputs: Any, task: str | None = None) -> Tensor:
        return self.heads[self._task(task)](run_backbone(self.backbone, inputs))

    def preprocess(self, raw: Any, task: str | None = None) -> Any:
        return self.task_model(task).preprocess(raw)

    def predict(self, inputs: Any, task: str | None = None, batch_size: int | None = None) -> list:
        """Predicted classes of ``task`` for model inputs or raw examples (see :meth:`TaskModel.predict`)."""
        return self.task_model(task).predict(inputs, batch_size=batch_size)
