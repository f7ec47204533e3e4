"""Data-free merging: ``merge("ties", pretrained, [ft_a, ft_b])`` returns the merged state dict.

Every data-free method is a function of the task vectors alone, registered in :mod:`adamerge.methods.registry`
and built from the steps in :mod:`.steps` (SVD steps in :mod:`.spectral`): task arithmetic, TIES, DARE and the
other classics in :mod:`.static`; PCB, TSV-M, Iso-C / Iso-CTS and WUDI in :mod:`.pcb`, :mod:`.tsv`,
:mod:`.isotropic` and :mod:`.wudi`; the unmerged references in :mod:`.reference`.

May import: ``adamerge.errors``, ``adamerge.pool``, ``adamerge.methods`` (registry, checks); nothing that
learns, trains or needs data.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from adamerge.methods.data_free import static, steps
from adamerge.methods.registry import MethodSpec, available_methods, get_method
from adamerge.pool.checkpoints import describe_source, load_state_dict
from adamerge.pool.task_vectors import TaskVectors

__all__ = ["merge", "merge_task_vectors", "static", "steps"]


def _static_spec(method: str) -> MethodSpec:
    spec = get_method(method)
    if spec.kind != "static":
        raise ValueError(
            f"method {method!r} is {spec.kind}: it learns its merge from unlabeled test data, so it "
            f"needs data and the adamerge trainer (the `adamerge` command, method={method}), not merge(); "
            f"data-free methods: {', '.join(available_methods('static'))}"
        )
    return spec


def _named_sources(finetuned: Any) -> dict[str, Any]:
    """Task name → source, from a mapping of them or a sequence (named by source, else by index)."""
    if isinstance(finetuned, Mapping):
        if finetuned and all(isinstance(v, Tensor) for v in finetuned.values()):
            raise ValueError(
                "finetuned looks like a single state dict; pass a list of checkpoints or a mapping "
                "of task name to checkpoint"
            )
        return {str(task): source for task, source in finetuned.items()}
    if isinstance(finetuned, (str, os.PathLike, torch.nn.Module)) or not isinstance(finetuned, Sequence):
        raise ValueError(
            f"finetuned must be a list of checkpoints or a mapping of task name to checkpoint, "
            f"got {describe_source(finetuned)}"
        )
    names = [describe_source(source) for source in finetuned]
    if len(set(names)) != len(names):
        names = [f"task_{i}" for i in range(len(finetuned))]
    return dict(zip(names, finetuned))


def merge_task_vectors(method: str, task_vectors: TaskVectors, **hparams: Any) -> dict[str, Tensor]:
    """Run a data-free method on task vectors already in hand; returns float32 deltas per tensor."""
    spec = _static_spec(method)
    return spec.fn(task_vectors, **hparams)


def merge(
    method: str,
    pretrained: Any,
    finetuned: Sequence[Any] | Mapping[str, Any],
    *,
    storage_dtype: str | torch.dtype = "float32",
    merge_batchnorm_statistics: bool = False,
    **hparams: Any,
) -> dict[str, Tensor]:
    """Merge fine-tuned checkpoints of one pretrained model with a data-free method.

    ``pretrained`` and each fine-tuned checkpoint may be a file, a save_pretrained directory, a
    hub id, an ``nn.Module`` or a state dict; ``finetuned`` is a list of them or a mapping of
    task name to them. Unspecified hyperparameters take the method's defaults
    (``get_method(method).defaults``). Returns the complete state dict: merged float tensors,
    non-float buffers and BatchNorm statistics from ``pretrained`` (unless
    ``merge_batchnorm_statistics``), tied weights merged once and shared under every name.
    """
    spec = _static_spec(method)
    sources = _named_sources(finetuned)
    resolved = spec.resolve_hparams(hparams)
    if spec.validate is not None:  # before loading: a bad value should not cost K checkpoint reads
        spec.validate(len(sources), resolved)
    task_vectors = TaskVectors.from_state_dicts(
        load_state_dict(pretrained),
        {task: load_state_dict(source) for task, source in sources.items()},
        storage_dtype=storage_dtype,
        merge_batchnorm_statistics=merge_batchnorm_statistics,
        sources={task: describe_source(source) for task, source in sources.items()},
        pretrained_source=describe_source(pretrained),
    )
    return task_vectors.state_dict_from_deltas(spec.fn(task_vectors, **resolved))
