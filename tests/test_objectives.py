"""Label-free objectives against direct formulas on hand-made logits, and what they make a merge learn."""

import inspect
import copy
import json
import math

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from adamerge.methods.learned.merged import MergedModel
from adamerge.training.module import AdaMergingModule
from adamerge.objectives import OBJECTIVES, ObjectiveError, build_objective
from adamerge.methods.configs import CONF_DIR
from adamerge.pool.task_vectors import TaskVectors


def entropy_of(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def softmax_rows(logits: torch.Tensor) -> list[list[float]]:
    return [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]


def test_objective_group_mirrors_registry():
    files = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in (CONF_DIR / "objective").glob("*.yaml")}
    assert set(files) == set(OBJECTIVES)
    for name, node in files.items():
        assert node.pop("name") == name
        signature = inspect.signature(OBJECTIVES[name])
        defaults = json.loads(json.dumps({k: p.default for k, p in signature.parameters.items()}))
        assert node == defaults, name
        config = build_objective(name, **node).config()
        if name == "weighted_sum":  # each term's config lists all of its settings: rebuilding from it is the round trip
            assert [{"name": t["name"], "weight": t["weight"]} for t in config["terms"]] == node["terms"]
            assert build_objective(**config).config() == config
        else:
            assert config == {"name": name, **node}


def test_entropy_matches_formula_and_normalisation():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0], [5.0, -5.0, 0.0]])
    expected = sum(entropy_of(p) for p in softmax_rows(logits)) / 3
    assert build_objective("entropy")(logits).item() == pytest.approx(expected, abs=1e-6)
    assert build_objective("entropy", normalize=True)(logits).item() == pytest.approx(expected / math.log(3), abs=1e-6)


def test_entropy_per_token_with_padding_mask():
    logits = torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    rows = softmax_rows(logits.reshape(8, 5))
    kept = [entropy_of(rows[i * 4 + t]) for i in range(2) for t in range(4) if mask[i, t]]
    assert build_objective("entropy")(logits, mask).item() == pytest.approx(sum(kept) / len(kept), abs=1e-5)
    # Changing a padded position changes nothing.
    logits[0, 3] += 100.0
    assert build_objective("entropy")(logits, mask).item() == pytest.approx(sum(kept) / len(kept), abs=1e-5)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_information_maximization_matches_loops(weight, normalize):
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(3)) * 2
    rows = softmax_rows(logits)
    mean_entropy = sum(entropy_of(p) for p in rows) / len(rows)
    marginal = [sum(p[c] for p in rows) / len(rows) for c in range(4)]
    expected = (mean_entropy - weight * entropy_of(marginal)) / (math.log(4) if normalize else 1)
    objective = build_objective("information_maximization", diversity_weight=weight, normalize=normalize)
    assert objective(logits).item() == pytest.approx(expected, abs=1e-5)


def test_information_maximization_edge_cases():
    objective = build_objective("information_maximization")
    one = torch.tensor([[2.0, 0.5, -1.0]])
    assert objective(one).item() == pytest.approx(0.0, abs=1e-6)  # batch of 1: the mean is the example
    same = one.expand(5, 3)
    assert objective(same).item() == pytest.approx(0.0, abs=1e-6)  # one predicted distribution for all
    # A batch collapsed onto one class scores worse than a confident batch that covers the classes.
    collapsed = torch.tensor([[9.0, 0.0, 0.0]] * 3)
    spread = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]])
    assert objective(spread) < objective(collapsed)
    assert build_objective("entropy")(spread) == pytest.approx(build_objective("entropy")(collapsed).item())
    # A one-class head: entropy is 0, normalisation does not divide by ln 1.
    single = torch.randn(4, 1)
    assert build_objective("information_maximization", normalize=True)(single).item() == 0.0
    assert build_objective("entropy", normalize=True)(single).item() == 0.0


def test_information_maximization_refuses_per_token_logits():
    with pytest.raises(ObjectiveError, match="information_maximization.*causal language model"):
        build_objective("information_maximization")(torch.randn(2, 3, 7), torch.ones(2, 3))


@pytest.mark.parametrize("weighting", ["none", "eata"])
def test_confident_entropy_matches_loops(weighting):
    logits = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.1, 0.0, 0.0, 0.0], [3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 7.0]])
    threshold = 0.4
    margin = threshold * math.log(4)
    entropies = [entropy_of(p) for p in softmax_rows(logits)]
    kept = [h for h in entropies if h < margin]
    assert 0 < len(kept) < len(entropies)  # the hand-made batch has both kinds
    weights = [math.exp(margin - h) if weighting == "eata" else 1.0 for h in kept]
    expected = sum(w * h for w, h in zip(weights, kept)) / len(kept)
    objective = build_objective("confident_entropy", threshold=threshold, weighting=weighting)
    assert objective(logits).item() == pytest.approx(expected, abs=1e-6)
    normalised = build_objective("confident_entropy", threshold=threshold, weighting=weighting, normalize=True)
    assert normalised(logits).item() == pytest.approx(expected / math.log(4), abs=1e-6)


def test_confident_entropy_edge_cases():
    objective = build_objective("confident_entropy", threshold=0.4)
    uncertain = torch.zeros(3, 5, requires_grad=True)  # every example at ln C: none is kept
    loss = objective(uncertain)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(uncertain.grad) == 0
    one = torch.tensor([[8.0, 0.0, 0.0]])
    assert objective(one).item() == pytest.approx(entropy_of(softmax_rows(one)[0]), abs=1e-6)
    # Per token: padded positions never count, even when confident.
    logits = torch.tensor([[[9.0, 0.0], [0.0, 0.0]], [[0.0, 9.0], [9.0, 0.0]]])
    mask = torch.tensor([[1, 1], [1, 0]])
    confident = entropy_of(softmax_rows(torch.tensor([[9.0, 0.0]]))[0])
    assert objective(logits, mask).item() == pytest.approx(confident, abs=1e-6)


def test_bad_names_and_settings_are_named():
    with pytest.raises(ObjectiveError, match="unknown objective 'entropie'"):
        build_objective("entropie")
    with pytest.raises(ObjectiveError, match="confident_entropy.*threshold"):
        build_objective("confident_entropy", threshold=1.5)
    with pytest.raises(ObjectiveError, match="confident_entropy.*weighting"):
        build_objective("confident_entropy", weighting="sar")
    with pytest.raises(ObjectiveError, match="information_maximization.*diversity_weight"):
        build_objective("information_maximization", diversity_weight=-1)
    with pytest.raises(ObjectiveError, match="entropy.*unexpected keyword"):
        build_objective("entropy", diversity_weight=1.0)


# --- what the objectives make a merge learn ---------------------------------------------------------------


class _Identity(nn.Module):
    """Features = x @ W + b, W and b the merged tensors; starts as the identity map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        with torch.no_grad():
            self.linear.weight.copy_(torch.eye(dim))
            self.linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def _collapse_pool(classes: int = 4):
    """One task with two task vectors: ``sharpen`` scales the features (confident, still right), ``collapse``
    shifts every feature towards class 0 (confident, mostly wrong). Both lower the entropy."""
    backbone = _Identity(classes)
    theta0 = {k: v.clone() for k, v in backbone.state_dict().items()}
    sharpen = {"linear.weight": 4 * torch.eye(classes), "linear.bias": torch.zeros(classes)}
    shift = torch.zeros(classes)
    shift[0] = 12.0
    collapse = {"linear.weight": torch.eye(classes), "linear.bias": shift}
    vectors = TaskVectors.from_state_dicts(theta0, {"sharpen": sharpen, "collapse": collapse})
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % classes
    inputs = 1.5 * nn.functional.one_hot(labels, classes).float() + torch.randn(64, classes, generator=generator)
    return backbone, vectors, inputs, labels


class _Repeat(torch.utils.data.IterableDataset):
    def __init__(self, batch, steps):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def _learn(objective_name: str, steps: int = 60):
    backbone, vectors, inputs, labels = _collapse_pool()
    merged = MergedModel(backbone, vectors, granularity="task_wise", init_value=0.1)
    head = nn.Identity()
    # Both task vectors serve one task: the pool's two "tasks" share one head and one batch.
    module = AdaMergingModule(merged, {"sharpen": head, "collapse": head}, lr=0.05,
                              objective=build_objective(objective_name))
    batch = {task: {"inputs": inputs, "labels": labels} for task in merged.task_names}

    def accuracy():
        with torch.no_grad():
            return float((merged(inputs).argmax(-1) == labels).float().mean())

    before = accuracy()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Repeat(batch, steps), batch_size=None))
    history = [h["objective"] for h in module.history]
    return before, accuracy(), history, merged.coefficients.detach()


def test_entropy_collapses_where_information_maximization_does_not():
    before, after, history, coefficients = _learn("entropy")
    assert history[-1] < history[0]
    assert coefficients[1] > 0.5 and after < before - 0.2  # confidently wrong: the collapse vector won

    before, after, history, coefficients = _learn("information_maximization")
    assert history[-1] < history[0]
    assert coefficients[1] < 0.25 and coefficients[0] > 0.9 and after >= before  # sharpened, not collapsed


# --- composition: any objective with any learned method ---------------------------------------------------

SETTINGS = {"entropy": {}, "information_maximization": {}, "confident_entropy": {"threshold": 1.0}, "expert_kl": {},
            "feature_matching": {}, "weighted_sum": {}}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("method", [
    "adamerging_task_wise", "adamerging_layer_wise", "adamerging_layer_wise_plus_plus",
    "concrete_task_arithmetic", "concrete_adamerging_task_wise", "concrete_adamerging_layer_wise",
])
def test_every_objective_drives_every_learned_method(method, objective):
    from adamerge.methods.learned.adamerging import build_learned
    from tests.helpers import TensorSplits, TinyConvNet, expert_targets_for, finetuned_states, make_heads

    backbone = TinyConvNet()
    vectors = TaskVectors.from_state_dicts(backbone.state_dict(), finetuned_states(backbone, 3, scale=0.3))
    extra = {"meta_steps": 0} if method.startswith("concrete_adamerging") else {}
    heads = make_heads(vectors.task_names)
    module = build_learned(method, copy.deepcopy(backbone).eval(), vectors, heads,
                           objective=build_objective(objective, **SETTINGS[objective]), **extra)
    assert module.objective.name == objective
    splits = TensorSplits({t: torch.randn(6, 3, 8, 8) for t in vectors.task_names})
    module.use_experts(expert_targets_for(backbone.eval(), vectors, heads, splits))
    module.check_experts()
    batch = {t: splits.batch(t, list(range(6))) for t in vectors.task_names}
    values = module.accumulate_gradients(batch, module.merged_weights())
    assert set(values) == set(vectors.task_names) and all(math.isfinite(v) for v in values.values())
    # The objective's gradient reaches what the method trains (coefficients, or the mask logits).
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    assert grads and any(torch.count_nonzero(g) > 0 for g in grads)
    assert set(module.last_step_entropy) == set(vectors.task_names)

