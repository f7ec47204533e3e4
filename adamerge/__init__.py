"""adamerge: model merging by task vectors, data-free or learned at test time (AdaMerging).

``adamerge.merge("ties", pretrained, [ft_a, ft_b])`` returns a merged state dict.
"""

from adamerge.methods import merge
from adamerge.task_vectors import TaskVectors

# --- lead: export load_merged (adamerge.export) here --------------------------------------------

__all__ = ["TaskVectors", "merge"]
