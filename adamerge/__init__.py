"""adamerge: model merging by task vectors, data-free or learned at test time (AdaMerging).

``adamerge.merge("ties", pretrained, [ft_a, ft_b])`` returns a merged state dict;
``adamerge.load_merged(run_dir / "merged_model")`` rebuilds (and verifies) the multi-task model exported by the
trainer -- the merged backbone with every task's head (``.tasks``, ``.class_names(task)``, ``.predict(...)``);
``adamerge.load_backbone(...)`` the merged backbone alone.

For Lightning users: ``adamerge.ModelPool`` (or ``adamerge.pool_from_yaml``) and ``adamerge.MultiTaskDataModule``,
``adamerge.build_learned_module(pool, "adamerging_layer_wise", objective=..., lr=...)``, your own
``L.Trainer(...).fit(module, datamodule=...)``, then ``adamerge.export_learned(module, directory, pool, datamodule)``.
"""

from importlib import import_module
from typing import Any

from adamerge.export.loading import load_backbone, load_merged
from adamerge.methods.data_free import merge
from adamerge.pool.task_vectors import TaskVectors

# Imported on first use: loading an export (load_merged) need not import Lightning.
_LEARNING_API = {
    "ModelPool": "adamerge.pool.modelpool",
    "MultiTaskDataModule": "adamerge.data.datamodule",
    "build_learned_module": "adamerge.methods.learned.adamerging",
    "export_learned": "adamerge.export.from_run",
    "pool_from_yaml": "adamerge.pool.modelpool",
}

__all__ = ["TaskVectors", "load_backbone", "load_merged", "merge", *_LEARNING_API]


def __getattr__(name: str) -> Any:
    if name in _LEARNING_API:
        return getattr(import_module(_LEARNING_API[name]), name)
    raise AttributeError(f"module 'adamerge' has no attribute {name!r}")
