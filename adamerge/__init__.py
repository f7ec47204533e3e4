"""adamerge: model merging by task vectors, data-free or learned at test time (AdaMerging).

``adamerge.merge("ties", pretrained, [ft_a, ft_b])`` returns a merged state dict;
``adamerge.load_merged(run_dir / "merged_model")`` rebuilds (and verifies) the multi-task model exported by the
trainer -- the merged backbone with every task's head (``.tasks``, ``.class_names(task)``, ``.predict(...)``);
``adamerge.load_backbone(...)`` the merged backbone alone.
"""

from adamerge.loading import load_backbone, load_merged
from adamerge.methods import merge
from adamerge.task_vectors import TaskVectors

__all__ = ["TaskVectors", "load_backbone", "load_merged", "merge"]
