"""Objectives: what a learned merge minimises on each task's unlabeled batch, by name.

- :mod:`.registry`: the :class:`Objective` base class, ``register_objective`` / ``get_objective`` /
  ``build_objective`` / ``available_objectives`` over ``OBJECTIVES`` -- mirrored one file per name by the Hydra group
  ``conf/objective/``;
- :mod:`.label_free`: objectives of the merged model's logits alone (``entropy``, ``information_maximization``,
  ``confident_entropy``) and the entropy arithmetic they share;
- :mod:`.expert`: objectives that compare with each task's fine-tuned model (``expert_kl``, ``feature_matching``,
  ``weighted_sum``); :mod:`.expert_targets` computes those experts' outputs once, before learning.

May import: ``adamerge.errors``, ``adamerge.pool``, ``adamerge.data`` and the differentiable merged model
(``adamerge.methods.learned.merged``, to run a backbone; ``merged_per_module.bands``, to cut a tensor into row
chunks); never the training machinery or a learned method.
Importing this package registers every built-in objective.
"""

# In this order: the registry, then the objectives that register in it.
from adamerge.objectives.registry import (
    OBJECTIVES, ExpertOutputs, Objective, ObjectiveError, available_objectives, build_objective, get_objective,
    register_objective,
)
from adamerge.objectives.label_free import (
    ConfidentEntropy, Entropy, InformationMaximization, at_least_float32, entropy_scale, masked_mean,
    prediction_entropy, token_entropy,
)
from adamerge.objectives.expert import ExpertKL, FeatureMatching, WeightedSum

__all__ = [
    "OBJECTIVES", "ConfidentEntropy", "Entropy", "ExpertKL", "ExpertOutputs", "FeatureMatching",
    "InformationMaximization", "Objective", "ObjectiveError", "WeightedSum", "at_least_float32", "available_objectives",
    "build_objective", "entropy_scale", "get_objective", "masked_mean", "prediction_entropy", "register_objective",
    "token_entropy",
]
