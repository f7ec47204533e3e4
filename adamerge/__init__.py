"""adamerge: model merging by task vectors, data-free or learned at test time (AdaMerging).

``adamerge.merge("ties", pretrained, [ft_a, ft_b])`` returns a merged state dict;
``adamerge.load_merged(run_dir / "merged_model")`` rebuilds (and verifies) a model exported by the trainer.
"""

from adamerge.loading import load_merged
from adamerge.methods import merge
from adamerge.task_vectors import TaskVectors

__all__ = ["TaskVectors", "load_merged", "merge"]
