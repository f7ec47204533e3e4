"""Expert-matching objectives (expert_kl, feature_matching, weighted_sum) and the experts' cached outputs."""

from __future__ import annotations

import logging
import math

import lightning as L
import pytest
import torch
from torch import nn

from adamerge.objectives.expert_targets import ExpertTargets
from adamerge.methods.learned.merged import MergedModel
from adamerge.training.module import AdaMergingModule
from adamerge.objectives import ExpertOutputs, ObjectiveError, build_objective
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TensorSplits, TinyConvNet, expert_targets_for, finetuned_states, make_heads
from tests.test_objectives import _Identity, _Repeat


def softmax(row: list[float], t: float = 1.0) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


# --- against direct formulas ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_expert_kl_is_the_mean_kl_from_the_expert_times_t_squared(temperature):
    merged = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.3, 2.0]])
    expert = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.5]])
    expected = sum(kl(softmax(e, temperature), softmax(m, temperature)) for e, m in zip(expert.tolist(), merged.tolist())) / 2
    value = build_objective("expert_kl", temperature=temperature)(merged, expert=ExpertOutputs(logits=expert))
    assert value.item() == pytest.approx(expected * temperature**2, rel=1e-5)


def test_expert_kl_jensen_shannon_is_symmetric_and_bounded():
    merged = torch.tensor([[1.0, 0.0, -1.0]])  # a batch of one
    expert = torch.tensor([[-4.0, 0.0, 6.0]])
    p, q = softmax(expert[0].tolist()), softmax(merged[0].tolist())
    m = [(a + b) / 2 for a, b in zip(p, q)]
    expected = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    js = build_objective("expert_kl", divergence="js")
    assert js(merged, expert=ExpertOutputs(logits=expert)).item() == pytest.approx(expected, rel=1e-5)
    assert js(expert, expert=ExpertOutputs(logits=merged)).item() == pytest.approx(expected, rel=1e-5)
    assert expected < math.log(2)


def test_expert_kl_per_token_ignores_padding():
    torch.manual_seed(0)
    merged, expert = torch.randn(2, 4, 5), torch.randn(2, 4, 5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    values = [kl(softmax(expert[n, t].tolist()), softmax(merged[n, t].tolist())) for n in range(2) for t in range(4)
              if mask[n, t]]
    objective = build_objective("expert_kl")
    value = objective(merged, mask, expert=ExpertOutputs(logits=expert))
    assert value.item() == pytest.approx(sum(values) / len(values), rel=1e-5)
    garbage = merged.clone()
    garbage[mask == 0] = 1e4  # what stands at padded positions never counts
    assert objective(garbage, mask, expert=ExpertOutputs(logits=expert)).item() == pytest.approx(value.item(), rel=1e-6)
    assert objective(expert, mask, expert=ExpertOutputs(logits=expert)).item() == pytest.approx(0.0, abs=1e-6)


def test_feature_matching_distances_match_their_formulas():
    merged = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    expert = torch.tensor([[1.0, 0.0], [2.0, 1.0]])
    squared = ((1 - 1) ** 2 + (2 - 0) ** 2) / 2, ((0 - 2) ** 2 + 0) / 2
    mse = sum(squared) / 2
    scale = ((1 + 0) / 2 + (4 + 1) / 2) / 2
    outputs = ExpertOutputs(features=expert)
    logits = torch.zeros(2, 3)
    assert build_objective("feature_matching", relative=False)(logits, features=merged, expert=outputs).item() == pytest.approx(mse)
    assert build_objective("feature_matching")(logits, features=merged, expert=outputs).item() == pytest.approx(mse / scale)
    cos = [(1 * 1 + 2 * 0) / (math.sqrt(5) * 1), (0 * 2 + 1 * 1) / (1 * math.sqrt(5))]
    cosine = build_objective("feature_matching", distance="cosine")
    assert cosine(logits, features=merged, expert=outputs).item() == pytest.approx(sum(1 - c for c in cos) / 2, rel=1e-6)
    one = ExpertOutputs(features=expert[:1])
    assert cosine(logits[:1], features=3 * expert[:1], expert=one).item() == pytest.approx(0.0, abs=1e-6)  # batch of one


def test_feature_matching_per_token_uses_the_padding_mask():
    merged, expert = torch.zeros(1, 3, 2), torch.zeros(1, 3, 2)
    merged[0, 0] = torch.tensor([1.0, 1.0])
    merged[0, 2] = torch.tensor([100.0, 100.0])  # padding
    mask = torch.tensor([[1, 1, 0]])
    value = build_objective("feature_matching", relative=False)(torch.zeros(1, 3, 4), mask, features=merged,
                                                                expert=ExpertOutputs(features=expert))
    assert value.item() == pytest.approx((1.0 + 0.0) / 2)


def test_weighted_sum_adds_its_terms_with_their_weights():
    torch.manual_seed(1)
    logits, expert = torch.randn(6, 4), torch.randn(6, 4)
    outputs = ExpertOutputs(logits=expert)
    total = build_objective("weighted_sum", terms=[{"name": "expert_kl", "weight": 1.0, "temperature": 2.0},
                                                   {"name": "information_maximization", "weight": 0.5}])
    expected = build_objective("expert_kl", temperature=2.0)(logits, expert=outputs) \
        + 0.5 * build_objective("information_maximization")(logits)
    assert total(logits, expert=outputs).item() == pytest.approx(expected.item(), rel=1e-6)
    assert total.needs == {"logits"} and not total.per_token  # information maximisation is no per-token objective
    assert build_objective("weighted_sum", terms=[{"name": "entropy"}]).needs == frozenset()


@pytest.mark.parametrize(("name", "settings", "message"), [
    ("expert_kl", {"temperature": 0}, "temperature must be a finite number > 0"),
    ("expert_kl", {"divergence": "hellinger"}, "divergence must be one of"),
    ("feature_matching", {"distance": "l1"}, "distance must be one of"),
    ("weighted_sum", {"terms": []}, "non-empty list"),
    ("weighted_sum", {"terms": [{"name": "weighted_sum"}]}, "not an objective to sum"),
    ("weighted_sum", {"terms": [{"name": "entropy", "weight": -1}]}, "weight=-1 must be a finite number >= 0"),
    ("weighted_sum", {"terms": [{"name": "entropy", "colour": 1}]}, r"terms\[0\] \(entropy\)"),
])
def test_bad_settings_are_refused_naming_the_setting(name, settings, message):
    with pytest.raises(ObjectiveError, match=message):
        build_objective(name, **settings)


def test_an_expert_objective_without_expert_outputs_says_what_is_missing():
    with pytest.raises(ObjectiveError, match="needs the expert's logits"):
        build_objective("expert_kl")(torch.zeros(2, 3))
    with pytest.raises(ObjectiveError, match="do not match"):
        build_objective("expert_kl")(torch.zeros(2, 3), expert=ExpertOutputs(logits=torch.zeros(2, 4)))


# --- the experts' outputs: once per input ------------------------------------------------------------------------

def _pool(num_tasks: int = 2):
    backbone = TinyConvNet().eval()
    vectors = TaskVectors.from_state_dicts(backbone.state_dict(), finetuned_states(backbone, num_tasks, scale=0.3))
    return backbone, vectors, make_heads(vectors.task_names)


def test_each_expert_runs_once_per_input_however_many_steps_and_evaluations():
    from adamerge.methods.learned.adamerging import build_learned

    backbone, vectors, heads = _pool()
    splits = TensorSplits({t: torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(i))
                           for i, t in enumerate(vectors.task_names)})
    targets = expert_targets_for(backbone, vectors, heads, splits)
    assert targets.forwarded == {t: 10 for t in vectors.task_names}  # adaptation and evaluation share the rows
    module = build_learned("adamerging_layer_wise", backbone, vectors, heads, objective=build_objective("expert_kl"))
    module.use_experts(targets)
    for step in range(4):
        rows = [(3 * step + i) % 10 for i in range(4)]
        module.accumulate_gradients({t: splits.batch(t, rows) for t in vectors.task_names}, module.merged_weights())
    assert targets.forwarded == {t: 10 for t in vectors.task_names}
    # The cached outputs are exactly what the expert gives on those rows.
    expert_model, head = targets.experts(vectors.task_names[1])
    batch = splits.batch(vectors.task_names[1], [7, 2])
    with torch.no_grad():
        features = expert_model(batch["inputs"])
    cached = targets.lookup(vectors.task_names[1], 0, batch)
    torch.testing.assert_close(cached.features, features)
    torch.testing.assert_close(cached.logits, head(features))


def test_beyond_the_memory_budget_outputs_are_recomputed_per_batch_with_a_warning(caplog):
    backbone, vectors, heads = _pool()
    splits = TensorSplits({t: torch.randn(8, 3, 8, 8) for t in vectors.task_names})
    cached = expert_targets_for(backbone, vectors, heads, splits)

    def expert(task):
        model = TinyConvNet().eval()
        model.load_state_dict(vectors.state_dict_from_deltas(vectors.task_vector(task)), strict=False)
        return model, heads[task]

    lazy = ExpertTargets(expert, splits, torch.device("cpu"), ("logits", "features"), max_bytes=0)
    with caplog.at_level(logging.WARNING, logger="adamerge.objectives.expert_targets"):
        lazy.prepare(vectors.task_names, [0])
    assert "recomputed for every batch" in caplog.text
    batch = splits.batch(vectors.task_names[0], [1, 5, 6])
    before = dict(lazy.forwarded)
    for need in ("logits", "features"):
        torch.testing.assert_close(getattr(lazy.lookup(vectors.task_names[0], 0, batch), need),
                                   getattr(cached.lookup(vectors.task_names[0], 0, batch), need))
    assert lazy.forwarded[vectors.task_names[0]] == before[vectors.task_names[0]] + 2 * 3


def test_per_token_outputs_are_found_again_under_other_padding():
    """A causal LM's per-token outputs are kept at the unpadded positions: a batch padded otherwise finds them."""
    from adamerge.objectives.expert_targets import _RowStore

    store = _RowStore(2)
    values = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    store.put(torch.tensor([0, 1]), values, mask)
    wider = torch.tensor([[1, 1, 0, 0]]).bool()  # row 0 alone, padded to 4
    out = store.get(torch.tensor([0]), wider, (1, 4))
    torch.testing.assert_close(out[0, :2], values[0, :2])
    assert torch.count_nonzero(out[0, 2:]) == 0


def test_without_an_objective_that_reads_them_only_the_experts_predictions_are_kept():
    """The agreement signal needs each expert's arg-max alone: an objective that does not read the logits keeps one
    integer per row (a causal LM: per token) instead of one value per class, and agreement comes out the same."""
    from adamerge.training.evaluation import batch_scores

    backbone, vectors, heads = _pool()
    splits = TensorSplits({t: torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(i))
                           for i, t in enumerate(vectors.task_names)})
    with_logits = expert_targets_for(backbone, vectors, heads, splits, needs=("logits",))
    slim = expert_targets_for(backbone, vectors, heads, splits, needs=("predictions",))
    assert slim.report()["cached_mb"] < with_logits.report()["cached_mb"] / 2
    task = vectors.task_names[0]
    batch = splits.batch(task, [0, 3, 5, 11])
    full, kept = with_logits.lookup(task, 0, batch), slim.lookup(task, 0, batch)
    assert kept.logits is None and kept.predictions.dtype == torch.int32
    torch.testing.assert_close(kept.predictions, full.logits.argmax(-1).to(torch.int32))
    merged_logits = torch.randn(4, full.logits.shape[-1], generator=torch.Generator().manual_seed(9))
    merged_logits[:2] = full.logits[:2]  # two rows agree for sure
    objective = build_objective("entropy")
    by_logits = batch_scores(merged_logits, batch["labels"], batch["inputs"], objective, expert=full)
    by_predictions = batch_scores(merged_logits, batch["labels"], batch["inputs"], objective, expert=kept)
    assert by_predictions["agreed"] == by_logits["agreed"] >= 2 and by_predictions["compared_to_expert"] == 4


def test_per_token_predictions_give_the_agreement_of_the_per_token_logits():
    from adamerge.objectives.expert_targets import _RowStore
    from adamerge.training.evaluation import batch_scores

    logits = torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    store = _RowStore(2)
    store.put(torch.tensor([0, 1]), logits.argmax(-1).to(torch.int32), mask.bool())
    assert store.nbytes == 5 * 4  # five unpadded tokens, one int32 each
    predictions = store.get(torch.tensor([0, 1]), mask.bool(), (2, 4))
    merged = logits.clone()
    merged[0, 1] = -merged[0, 1]  # one valid token now disagrees (its arg-max moves)
    merged[1, 3] = -merged[1, 3]  # a padded one: not compared
    inputs = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": mask}
    objective = build_objective("entropy")
    by_logits = batch_scores(merged, torch.zeros(2, 4, dtype=torch.long), inputs, objective,
                             expert=ExpertOutputs(logits=logits))
    by_predictions = batch_scores(merged, torch.zeros(2, 4, dtype=torch.long), inputs, objective,
                                  expert=ExpertOutputs(predictions=predictions))
    assert (by_predictions["agreed"], by_predictions["compared_to_expert"]) == (by_logits["agreed"], 5) == (4, 5)


def test_per_token_predictions_are_cached_per_row_through_batches_padded_differently():
    """A causal LM's arg-max predictions are per token: batches padded to different lengths are kept per row at the
    unpadded positions (not as one dense [rows, T] tensor), and a batch padded otherwise finds them."""
    vocab, hidden = 11, 4
    embedding = nn.Embedding(vocab, hidden)
    projection = nn.Linear(hidden, vocab)

    class _LM(nn.Module):
        def forward(self, input_ids, attention_mask):
            return embedding(input_ids)

    ids = torch.randint(0, vocab, (4, 6), generator=torch.Generator().manual_seed(3))
    lengths = [2, 3, 5, 4]

    def padded(rows: list[int], width: int) -> dict:
        mask = torch.tensor([[1] * lengths[r] + [0] * (width - lengths[r]) for r in rows])
        return {"input_ids": ids[rows, :width] * mask, "attention_mask": mask}

    class _Splits:
        def split_key(self, task, split):
            return task, 0

        def split_size(self, task, split):
            return 4

        def split_batches(self, task, split, batch_size=None):  # two batches, each padded to its own longest row
            return [{"inputs": padded([0, 1], 3), "index": torch.tensor([0, 1])},
                    {"inputs": padded([2, 3], 5), "index": torch.tensor([2, 3])}]

    targets = ExpertTargets(lambda task: (_LM(), projection), _Splits(), torch.device("cpu"), ("predictions",))
    targets.prepare(["lm"], [0])
    batch = {"inputs": padded([3, 0], 6), "index": torch.tensor([3, 0])}
    found = targets.lookup("lm", 0, batch).predictions
    with torch.no_grad():
        expected = projection(embedding(batch["inputs"]["input_ids"])).argmax(-1)
    mask = batch["inputs"]["attention_mask"].bool()
    assert torch.equal(found[mask], expected[mask].to(torch.int32))
    assert targets.report()["cached_mb"] * 2**20 == sum(lengths) * 4  # one int32 per unpadded token


def test_for_objective_keeps_the_logits_only_where_they_are_read():
    backbone, vectors, heads = _pool()
    splits = TensorSplits({t: torch.randn(4, 3, 8, 8) for t in vectors.task_names})

    class _Pool:
        def __init__(self):
            self.heads = heads

        def backbone_with(self, task_vectors, task):
            model = TinyConvNet().eval()
            model.load_state_dict(task_vectors.state_dict_from_deltas(task_vectors.task_vector(task)), strict=False)
            return model

    def needs(objective: str, **kwargs) -> tuple[str, ...]:
        return ExpertTargets.for_objective(_Pool(), vectors, splits, torch.device("cpu"), build_objective(objective),
                                           **kwargs).needs

    assert needs("information_maximization") == ("predictions",)
    assert needs("feature_matching") == ("features", "predictions")
    assert needs("expert_kl") == ("logits",)
    assert needs("information_maximization", logits=True) == ("logits",)  # adapted heads learn on the logits


# --- learning: matching the experts recovers them where entropy collapses ------------------------------------------

def _learn(objective: str, classes: int = 4, steps: int = 80):
    """One task whose expert sharpens the features (confident and right), and one more vector in the merge without a
    task of its own that shifts every input towards class 0 (confident and mostly wrong). Both lower the entropy."""
    backbone = _Identity(classes)
    theta0 = {k: v.clone() for k, v in backbone.state_dict().items()}
    sharpen = {"linear.weight": 4 * torch.eye(classes), "linear.bias": torch.zeros(classes)}
    shift = torch.zeros(classes)
    shift[0] = 12.0
    vectors = TaskVectors.from_state_dicts(theta0, {"task": sharpen})
    vectors = vectors.with_task("shift", {"linear.weight": torch.zeros(classes, classes), "linear.bias": shift}, scored=False)
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % classes
    inputs = 1.5 * nn.functional.one_hot(labels, classes).float() + torch.randn(64, classes, generator=generator)
    splits = TensorSplits({"task": inputs}, batch_size=16)
    heads = {"task": nn.Identity()}
    targets = expert_targets_for(backbone, vectors, heads, splits, needs=("logits",))
    merged = MergedModel(backbone, vectors, granularity="task_wise", init_value=[0.1, 0.1])
    module = AdaMergingModule(merged, heads, lr=0.05, objective=build_objective(objective))
    module.use_experts(targets)
    batch = {"task": {**splits.batch("task", list(range(64))), "labels": labels}}

    def accuracy(model):
        with torch.no_grad():
            return float((model(inputs).argmax(-1) == labels).float().mean())

    expert_accuracy = accuracy(targets.experts("task")[0])
    before = accuracy(merged)
    L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, torch.utils.data.DataLoader(_Repeat(batch, steps), batch_size=None))
    history = [h["objective"] for h in module.history]
    return expert_accuracy, before, accuracy(merged), history, merged.coefficients.detach()


def test_matching_the_expert_recovers_its_accuracy_where_entropy_collapses():
    expert, before, after, history, coefficients = _learn("entropy")
    assert history[-1] < history[0]
    assert coefficients[1] > 0.5 and after < before - 0.2  # confidently wrong: the shift won

    expert, before, after, history, coefficients = _learn("expert_kl")
    assert history[-1] < 0.2 * history[0]
    assert coefficients[1] < 0.1 and coefficients[0] > 0.9  # the expert's own vector, not the shift
    assert after == pytest.approx(expert, abs=1 / 64) and after > before
