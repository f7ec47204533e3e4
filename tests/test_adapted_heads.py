"""Adapted heads (heads: adapt): pseudo-labels from the experts' confident predictions re-learn each task's head."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from adamerge.backbones.clip import ZeroShotHead
from adamerge.backbones.heads import Identity
from adamerge.errors import ConfigError
from adamerge.methods.learned.adamerging import build_learned, learned_outcome
from adamerge.objectives import build_objective
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.adapted_heads import attach
from adamerge.training.evaluation import IGNORE_INDEX
from adamerge.training.heads_config import (
    HeadSettings, adaptable_copy, check_adaptable, head_settings, model_card_text, pseudo_labels,
)
from tests.helpers import TensorSplits, expert_targets_for
from tests.test_objectives import _Identity, _Repeat

CLASSES = 4
TASKS = ("a", "b")


# --- pseudo-labels against a hand-made reference ------------------------------------------------------------------

def reference_labels(rows: list[list[float]], threshold: float) -> list[int]:
    """Softmax by hand; the first class of a tie; -100 below the threshold."""
    out = []
    for row in rows:
        exps = [math.exp(v - max(row)) for v in row]
        probabilities = [e / sum(exps) for e in exps]
        best = max(probabilities)
        label = probabilities.index(best)  # the first maximal class
        out.append(label if best >= threshold else IGNORE_INDEX)
    return out


ROWS = [[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 5.0, 5.0], [0.0, 0.0, 3.0], [-1.0, 4.0, 0.5]]


@pytest.mark.parametrize("threshold, expected", [
    (0.0, [0, 0, 1, 2, 1]),  # all kept; [0, 0, 0] and [0, 5, 5] are ties: the first of the tied classes
    (0.99, [IGNORE_INDEX] * 5),  # all below
    (0.5, [0, IGNORE_INDEX, IGNORE_INDEX, 2, 1]),  # [0, 5, 5]: 0.4983 < 0.5
    (0.9, [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2, 1]),  # [0, 0, 3]: 0.9094
    (0.95, [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 1]),  # [-1, 4, 0.5]: 0.9647
])
def test_pseudo_labels_match_a_hand_made_reference(threshold, expected):
    labels, keep = pseudo_labels(torch.tensor(ROWS), threshold)
    assert labels.tolist() == expected == reference_labels(ROWS, threshold)
    assert keep.tolist() == [label != IGNORE_INDEX for label in expected]


def test_a_confidence_equal_to_the_threshold_is_kept_and_saturated_rows_pass_a_threshold_of_one():
    even = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # softmax exactly 0.5: kept at 0.5, not just above it
    assert pseudo_labels(even, 0.5)[0].tolist() == [0, 0]
    assert pseudo_labels(even, 0.5 + 1e-6)[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX]
    saturated = torch.tensor([[200.0, 0.0, 0.0], [0.0, 3.0, 0.0]])  # float32 softmax of the first row is exactly 1
    assert pseudo_labels(saturated, 1.0)[0].tolist() == [0, IGNORE_INDEX]


def test_per_token_pseudo_labels_skip_padding():
    logits = torch.tensor([[[5.0, 0.0], [0.0, 5.0]], [[5.0, 0.0], [0.0, 5.0]]])
    labels, keep = pseudo_labels(logits, 0.9, mask=torch.tensor([[1, 1], [1, 0]]))
    assert labels.tolist() == [[0, 1], [0, IGNORE_INDEX]] and int(keep.sum()) == 3


# --- settings -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ({"mode": "learn"}, "heads.mode='learn'"),
    ({"mode": "adapt", "confidence_threshold": 1.5}, "heads.confidence_threshold=1.5"),
    ({"mode": "adapt", "schedule": "before"}, "heads.schedule='before'"),
    ({"mode": "adapt", "head_lr": 0}, "heads.head_lr=0"),
    ({"mode": "adapt", "head_steps": -1}, "heads.head_steps=-1"),
    ({"mode": "adapt", "batch_size": 0}, "heads.batch_size=0"),
    ({"mode": "adapt", "threshold": 0.5}, "unknown settings \\['threshold'\\]"),
    (3, "heads=3"),
])
def test_bad_settings_are_refused_naming_them(value, message):
    with pytest.raises(ConfigError, match=message):
        head_settings(value)


def test_settings_defaults_and_forms():
    assert head_settings(None) == head_settings("frozen") == HeadSettings() and not HeadSettings().adapt
    assert head_settings("adapt").adapt and head_settings("adapt").schedule == "after"
    assert head_settings({"mode": "adapt", "confidence_threshold": 1}).confidence_threshold == 1.0


# --- a tiny pool whose merged model starts with wrong heads -----------------------------------------------------------

def _pool(seed: int = 0):
    """Two tasks over one linear backbone (features = x W + b). Each expert sharpens the features and reads them with
    the identity head (confident, mostly right); the merged model is given heads that read feature i as class i+1."""
    generator = torch.Generator().manual_seed(seed)
    backbone = _Identity(CLASSES)
    theta0 = {k: v.clone() for k, v in backbone.state_dict().items()}
    finetuned = {task: {"linear.weight": 3 * torch.eye(CLASSES) + 0.2 * torch.randn(CLASSES, CLASSES, generator=generator),
                        "linear.bias": torch.zeros(CLASSES)} for task in TASKS}
    vectors = TaskVectors.from_state_dicts(theta0, finetuned)
    labels = torch.arange(64) % CLASSES
    inputs = {task: 1.5 * nn.functional.one_hot(labels, CLASSES).float() + 0.6 * torch.randn(64, CLASSES, generator=generator)
              for task in TASKS}
    splits = TensorSplits(inputs, batch_size=16)

    def head(weight):
        linear = nn.Linear(CLASSES, CLASSES)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.zero_()
        return linear.requires_grad_(False)

    experts = expert_targets_for(backbone, vectors, {t: head(torch.eye(CLASSES)) for t in TASKS}, splits, needs=("logits",))
    wrong = {t: head(torch.eye(CLASSES).roll(1, dims=0)) for t in TASKS}
    return backbone, vectors, splits, labels, experts, wrong


def _accuracy(module, splits, labels, task, head=None) -> float:
    with torch.no_grad():
        features = module.merged(splits.inputs[task], weights=module.eval_weights())
        return float(((head or module.heads[task])(features).argmax(-1) == labels).float().mean())


def _expert_accuracy(experts, splits, labels, task) -> float:
    model, head = experts.experts(task)
    with torch.no_grad():
        return float((head(model(splits.inputs[task])).argmax(-1) == labels).float().mean())


def _trainer(steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, **kwargs)


def _module(method: str, heads, seed: int = 0, **hparams):
    backbone, vectors, splits, labels, experts, wrong = _pool(seed)
    module = build_learned(method, backbone, vectors, wrong, objective=build_objective("entropy"), **hparams)
    module.use_experts(experts)
    attach(module, heads, datamodule=splits)
    batch = {task: {**splits.batch(task, list(range(64))), "labels": labels} for task in TASKS}
    return module, batch, splits, labels, experts, wrong


def _fit(module, batch, steps: int, **kwargs) -> L.Trainer:
    trainer = _trainer(steps, **kwargs)
    trainer.fit(module, torch.utils.data.DataLoader(_Repeat(batch, steps), batch_size=None))
    return trainer


METHODS = {
    "adamerging_layer_wise": {"lr": 0.01},
    "adarank": {"lr": 0.01, "mask_lr": 0.01},
    "concrete_adamerging_layer_wise": {"lr": 0.01, "meta_steps": 4},
}


@pytest.mark.parametrize("schedule", ["after", "together"])
@pytest.mark.parametrize("method", list(METHODS))
def test_adaptation_fixes_a_wrong_head_with_every_learned_method(method, schedule):
    settings = {"mode": "adapt", "schedule": schedule, "head_lr": 0.05, "head_steps": 120, "confidence_threshold": 0.9}
    steps = 120 if schedule == "together" else 8
    module, batch, splits, labels, experts, wrong = _module(method, settings, **METHODS[method])
    pool_heads = copy.deepcopy(wrong)
    start_coefficients = torch.tensor(module.coefficients())
    before = {task: _accuracy(module, splits, labels, task) for task in TASKS}
    _fit(module, batch, steps)
    report = learned_outcome(module)["head_adaptation"]
    assert report["schedule"] == schedule and report["mode"] == "adapt"
    for task in TASKS:
        entry = report["tasks"][task]
        assert 0.3 < entry["kept_share"] <= 1 and entry["inputs"] == 64 and entry["adapted"]
        # The pseudo-label cross-entropy on the final merge: the wrong head's against the adapted one's.
        assert entry["loss_adapted"] < 0.3 * entry["loss_frozen"]
        history = report["loss_history"][task]
        assert len(history) == (120 if schedule == "after" else steps) and history[-1] < 0.3 * history[0]
        after, expert = _accuracy(module, splits, labels, task), _expert_accuracy(experts, splits, labels, task)
        assert before[task] < 0.3 and after >= expert - 0.1, (before, after, expert)
        # The pool's heads are neither the module's nor changed.
        assert module.heads[task] is not wrong[task]
        torch.testing.assert_close(wrong[task].state_dict(), pool_heads[task].state_dict(), rtol=0, atol=0)
    # The merge still learned by its own objective.
    assert not torch.equal(torch.tensor(module.coefficients()), start_coefficients)


def test_frozen_heads_change_nothing():
    runs = []
    for heads in (None, "frozen", {"mode": "frozen", "confidence_threshold": 0.1, "schedule": "together"}):
        module, batch, splits, labels, experts, wrong = _module("adamerging_layer_wise", heads, lr=0.01)
        assert module.adapted_heads is None and all(module.heads[t] is wrong[t] for t in TASKS)
        _fit(module, batch, 5)
        outcome = learned_outcome(module)
        assert "head_adaptation" not in outcome and "heads" not in module.profile.report()
        runs.append((outcome["coefficients"], [h["objective"] for h in module.history]))
    assert runs[0] == runs[1] == runs[2]


def test_a_task_without_a_confident_input_is_warned_about_and_keeps_its_head(caplog):
    settings = {"mode": "adapt", "confidence_threshold": 1.0, "head_lr": 0.05, "head_steps": 20}
    module, batch, splits, labels, experts, wrong = _module("adamerging_layer_wise", settings, lr=0.01)
    start = {task: copy.deepcopy(module.heads[task].state_dict()) for task in TASKS}
    with caplog.at_level(logging.WARNING, logger="adamerge.training.adapted_heads"):
        _fit(module, batch, 3)
    assert "none of task 'a'" in caplog.text and "its head stays as it was" in caplog.text
    report = module.adapted_heads.report()
    for task in TASKS:
        assert report["tasks"][task]["kept_share"] == 0 and not report["tasks"][task]["adapted"]
        torch.testing.assert_close(module.heads[task].state_dict(), start[task], rtol=0, atol=0)


def test_heads_without_parameters_are_refused_naming_heads_and_the_task():
    with pytest.raises(ConfigError, match=r"heads\.mode=adapt: the head of task 'lm' \(Identity\) has no parameters"):
        check_adaptable({"lm": Identity()})
    with pytest.raises(ConfigError, match="task 'x'"):
        adaptable_copy("x", nn.Identity())
    module, *_ = _module("adamerging_layer_wise", None)
    module.heads = nn.ModuleDict({"a": Identity(), "b": Identity()})
    with pytest.raises(ConfigError, match="task 'a'"):
        attach(module, "adapt")


def test_a_zero_shot_head_learns_its_class_embeddings_and_the_original_stays_a_frozen_buffer():
    head = ZeroShotHead(torch.nn.functional.normalize(torch.randn(3, 5), dim=-1), math.log(100.0))
    clone = adaptable_copy("t", head)
    assert [name for name, _ in clone.named_parameters()] == ["text_embeddings"]
    assert "text_embeddings" in dict(head.named_buffers()) and not list(head.parameters())
    x = torch.randn(2, 5)
    torch.testing.assert_close(clone(x), head(x))
    assert set(clone.state_dict()) == set(head.state_dict())  # the export writes and reads it as a zero-shot head


def test_resuming_adapted_heads_from_a_checkpoint_continues_them_exactly(tmp_path):
    settings = {"mode": "adapt", "schedule": "together", "head_lr": 0.05}
    straight, batch, *_ = _module("adamerging_layer_wise", settings, lr=0.01)
    _fit(straight, batch, 6)

    first, batch, *_ = _module("adamerging_layer_wise", settings, lr=0.01)
    trainer = _fit(first, batch, 3)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed, batch, *_ = _module("adamerging_layer_wise", settings, lr=0.01)
    _trainer(6).fit(resumed, torch.utils.data.DataLoader(_Repeat(batch, 6), batch_size=None),
                    ckpt_path=str(tmp_path / "last.ckpt"), weights_only=True)
    for task in TASKS:
        torch.testing.assert_close(resumed.heads[task].state_dict(), straight.heads[task].state_dict())
    torch.testing.assert_close(torch.tensor(resumed.coefficients()), torch.tensor(straight.coefficients()))
    history = straight.adapted_heads.report()["loss_history"]
    assert resumed.adapted_heads.report()["loss_history"] == {t: pytest.approx(v) for t, v in history.items()}
    assert len(history["a"]) == 6


def test_the_model_card_says_how_the_heads_were_adapted():
    record = {"mode": "adapt", "confidence_threshold": 0.8, "schedule": "after", "head_lr": 0.001, "head_steps": 50,
              "tasks": {"a": {"kept_share": 0.75, "loss_frozen": 1.5, "loss_adapted": 0.25, "adapted": True},
                        "b": {"kept_share": 0.0, "loss_frozen": None, "loss_adapted": None, "adapted": False}}}
    text = model_card_text({"head_adaptation": record})
    assert "re-learned on pseudo-labels" in text and "at least 0.8" in text and "50 Adam steps per head" in text
    assert "| a | 75.0 | 1.5000 | 0.2500 | yes |" in text and "| b | 0.0 |  |  | no: no input kept |" in text
    assert model_card_text({}) == "" and model_card_text({"head_adaptation": {"mode": "frozen"}}) == ""


# --- end to end on the reduced demo zoo ------------------------------------------------------------------------------

def _zoo_pool_and_data(zoo: Path):
    import adamerge
    from adamerge.data.preprocessing import ImagePreprocessor

    tasks = ["digits", "textures", "photos", "science"]
    pool = adamerge.ModelPool(
        backbone={"_target_": "adamerge.backbones.efficientnet.EfficientNetLite0", "num_classes": None},
        pretrained=str(zoo / "pretrained.safetensors"),
        finetuned={task: str(zoo / "finetuned" / f"{task}.safetensors") for task in tasks},
        heads={task: {"_target_": "adamerge.backbones.heads.linear_head", "path": str(zoo / "heads" / f"{task}.safetensors")}
               for task in tasks},
    )
    data = adamerge.MultiTaskDataModule({task: {"path": str(zoo / "data" / task), "split": "test"} for task in tasks},
                                        batch_size=8, eval_batch_size=16, preprocessor=ImagePreprocessor(image_size=32))
    return pool, data


def test_python_api_exports_the_adapted_heads_and_load_merged_gives_the_modules_outputs(zoo, tmp_path):
    import adamerge

    pool, data = _zoo_pool_and_data(zoo)
    originals = {task: copy.deepcopy(head.state_dict()) for task, head in pool.heads.items()}
    heads = {"mode": "adapt", "schedule": "together", "confidence_threshold": 0.5, "head_lr": 0.05}
    module = adamerge.build_learned_module(pool, "adamerging_layer_wise", datamodule=data, heads=heads, lr=1e-2)
    _trainer(3).fit(module, datamodule=data)
    _trainer(1).validate(module, datamodule=data, verbose=False)
    path = adamerge.export_learned(module, tmp_path / "merged_model", pool, data)

    config = json.loads((path / "merge_config.json").read_text())
    record = config["head_adaptation"]
    assert {k: record[k] for k in ("mode", "schedule", "confidence_threshold", "head_lr")} == {
        "mode": "adapt", "schedule": "together", "confidence_threshold": 0.5, "head_lr": 0.05}
    assert set(record["tasks"]) == set(pool.heads) and "loss_history" not in record
    assert all(0 <= entry["kept_share"] <= 1 for entry in record["tasks"].values())
    card = (path / "README.md").read_text()
    assert "each task's adapted head under `heads/`" in card and "re-learned on pseudo-labels" in card

    model = adamerge.load_merged(path)
    images = torch.randn(3, 3, 32, 32)
    fused = module.merge_and_unload().eval()
    moved = False
    with torch.no_grad():
        for task in model.tasks:
            expected = module.heads[task](fused(images))
            torch.testing.assert_close(model(images, task=task), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(pool.heads[task].state_dict(), originals[task], rtol=0, atol=0)
            moved |= not torch.allclose(model.heads[task].weight, pool.heads[task].weight)
    assert moved  # the export holds the adapted heads, not the pool's


def test_a_run_with_adapted_heads_records_them_and_its_export_reproduces_its_accuracy(zoo, tmp_path):
    import datasets
    from hydra import compose, initialize_config_dir

    from adamerge import load_merged
    from adamerge.cli.main import register_resolvers
    from adamerge.cli.runner import run
    from adamerge.methods.configs import CONF_DIR

    register_resolvers()
    overrides = [f"zoo_dir={zoo}", "method=adamerging_layer_wise", "num_threads=1", "trainer=cpu", "trainer.max_steps=2",
                 "trainer.enable_progress_bar=false", "logger=none", "data.batch_size=8", "data.eval_batch_size=16",
                 "heads=adapt", "heads.confidence_threshold=0.5", "heads.head_steps=30", "heads.head_lr=0.05"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
        refused = compose(config_name="config", overrides=[*overrides[:1], "method=task_arithmetic", "heads=adapt"])
    with pytest.raises(ConfigError, match="no learned method"):
        run(refused, tmp_path / "refused")
    run(cfg, tmp_path / "run")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    report = results["head_adaptation"]
    assert report["schedule"] == "after" and len(report["loss_history"]["digits"]) == 30
    assert all(entry["loss_adapted"] < entry["loss_frozen"] for entry in report["tasks"].values() if entry["adapted"])
    model = load_merged(results["export"])
    manifest = json.loads((zoo / "zoo.json").read_text())
    for task in model.tasks:  # the final validation ran with the adapted heads the export holds
        names = manifest["class_names"][task]
        test = datasets.load_from_disk(str(zoo / "data" / task))["test"]
        predicted = model.predict(list(test["image"]), task=task, batch_size=16)
        assert sum(p == names[y] for p, y in zip(predicted, test["label"])) / len(test) == results["accuracy"][task]


@pytest.mark.parametrize("schedule", ["after", "together"])
def test_progressive_distillation_composes_with_adapted_heads(schedule):
    """A method whose own steps never run a head: the heads still learn (together: by their own step on the batch)."""
    from tests.helpers import make_heads
    from tests.test_progressive import _pool as block_pool

    backbone, vectors, expert_heads, splits = block_pool()
    experts = expert_targets_for(backbone, vectors, expert_heads, splits, needs=("logits",))
    other = make_heads(vectors.task_names, seed=7)  # the merged model starts with heads that disagree with the experts
    module = build_learned("progressive_distillation", copy.deepcopy(backbone), vectors, other, granularity="tensor",
                           lr=0.02, steps_per_block=10, samples_per_task=16, batch_size=16)
    module.distillation_source = splits
    module.use_experts(experts)
    attach(module, {"mode": "adapt", "schedule": schedule, "confidence_threshold": 0.0, "head_lr": 0.05,
                    "head_steps": 60}, datamodule=splits)
    batch = {task: splits.batch(task, list(range(24))) for task in vectors.task_names}
    _fit(module, batch, module.total_steps)
    report = module.adapted_heads.report()
    for task in vectors.task_names:
        entry = report["tasks"][task]
        assert entry["kept_share"] == 1 and entry["loss_adapted"] < 0.5 * entry["loss_frozen"]
        assert not torch.equal(module.heads[task].weight, other[task].weight)
