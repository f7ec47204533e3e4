import copy
import json

import lightning as L
import pytest
import torch
from torch.func import functional_call

from adamerge.methods.learned.concrete import MASK_FILE, ConcreteTaskArithmeticModule
from adamerge.methods.learned.concrete_adamerging import ConcreteAdaMergingModule, split_batch
from adamerge.methods.learned.concrete_mask import ConcreteMask, rescale
from adamerge.pool.key_filters import select_tensors
from adamerge.methods.learned.adamerging import build_learned
from adamerge.methods.registry import get_method
from adamerge.objectives import prediction_entropy
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TinyConvNet, finetuned_states, make_heads
from tests.test_module import _Stream, random_batch

CONCRETE = ("concrete_task_arithmetic", "concrete_adamerging_task_wise", "concrete_adamerging_layer_wise")


def build(name, num_tasks=3, **hparams):
    module = TinyConvNet()
    vectors = TaskVectors.from_state_dicts(module.state_dict(), finetuned_states(module, num_tasks, scale=0.3))
    return build_learned(name, module.eval(), vectors, make_heads(vectors.task_names), **hparams)


def fit(model, steps, **trainer_kwargs):
    loader = torch.utils.data.DataLoader(_Stream(model.task_names, steps), batch_size=None)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs,
    )
    trainer.fit(model, loader)
    return trainer


def flat_logits(model):
    return torch.cat([logit.detach().flatten() for logit in model.mask.logits]).clone()


def total_entropy(model, batch, weights):
    return sum(
        prediction_entropy(model.heads[t](functional_call(model.merged.module, weights, (batch[t]["inputs"],))))
        for t in model.task_names
    )


# -- the mask -----------------------------------------------------------------------------------
def test_relaxed_samples_lie_in_the_open_interval_and_are_seeded():
    mask = ConcreteMask({"w": (20, 20)}, temperature=0.5)
    sample = mask.sample(torch.Generator().manual_seed(3))["w"]
    assert sample.shape == (20, 20) and 0 < sample.min() and sample.max() < 1
    torch.testing.assert_close(sample, mask.sample(torch.Generator().manual_seed(3))["w"])
    assert not torch.equal(sample, mask.sample(torch.Generator().manual_seed(4))["w"])
    # Far from 0, float32 sigmoid rounds to exactly 0 or 1, but never overflows to NaN.
    with torch.no_grad():
        mask.logits[0].normal_(0, 20)
    extreme = mask.sample(torch.Generator().manual_seed(3))["w"]
    assert extreme.isfinite().all() and 0 <= extreme.min() and extreme.max() <= 1


def test_sample_mean_approaches_sigmoid_as_temperature_goes_to_zero():
    logits = torch.tensor([-2.0, -0.5, 0.0, 1.0, 3.0])
    errors = {}
    for temperature in (1.0, 0.05):
        mask = ConcreteMask({"w": (20000, 5)}, temperature=temperature)
        with torch.no_grad():
            mask.logits[0].copy_(logits.expand(20000, 5))
        mean = mask.sample(torch.Generator().manual_seed(0))["w"].mean(0)
        errors[temperature] = (mean - torch.sigmoid(logits)).abs().max()
    assert errors[0.05] < 0.015
    assert errors[0.05] < errors[1.0]


def test_rescaled_masks_have_unit_mean_per_tensor():
    mask = ConcreteMask({"a": (7, 3), "b": (11,)})
    with torch.no_grad():
        for logit in mask.logits:
            logit.normal_()
    for rescaled in (mask.rescaled_sample(), mask.expected_mask(), mask.binary_mask()):
        for m in rescaled.values():
            torch.testing.assert_close(m.mean(), torch.tensor(1.0))
    # At init every p is exactly 0.5, so nothing is kept: the binary mask is zero, not NaN.
    assert all(torch.equal(m, torch.zeros_like(m)) for m in ConcreteMask({"a": (4,)}).binary_mask().values())
    assert rescale({"z": torch.zeros(3)})["z"].eq(0).all()


def test_kept_fraction_and_memory_report():
    mask = ConcreteMask({"a": (2, 2), "b": (4,)})
    with torch.no_grad():
        mask.logits[0].copy_(torch.tensor([[1.0, -1.0], [2.0, 3.0]]))
        mask.logits[1].fill_(-1.0)
    assert mask.kept_fraction() == {"a": 0.75, "b": 0.0}
    assert mask.kept_fraction_total() == pytest.approx(3 / 8)
    report = mask.memory_report()
    assert report["elements"] == 8 and report["logits_bytes"] == 32 and report["tensors"] == 2


def test_mask_patterns_select_tensors_by_glob_or_regex():
    names = ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    assert select_tensors(names, None) == names
    assert select_tensors(names, ["conv.*"]) == ["conv.weight", "conv.bias"]
    assert select_tensors(names, [r"fc\.(weight|bias)"]) == ["fc.weight", "fc.bias"]
    assert select_tensors(names, ["*.weight"]) == ["conv.weight", "fc.weight"]
    with pytest.raises(ValueError, match="match none"):
        select_tensors(names, ["encoder.*"])


def test_restricted_mask_leaves_other_tensors_unmasked():
    model = build("concrete_task_arithmetic", mask_patterns=["fc.*"])
    assert model.mask.names == ["fc.weight", "fc.bias"]
    plain = model.merged.merged_weights()
    sampled = model.merged_weights()
    for name in plain:
        if name.startswith("fc."):
            assert not torch.allclose(sampled[name], plain[name])
        else:
            torch.testing.assert_close(sampled[name], plain[name])


def test_save_load_round_trip_and_checks(tmp_path):
    mask = ConcreteMask({"a.weight": (3, 2), "b": (4,)}, temperature=0.7)
    with torch.no_grad():
        for logit in mask.logits:
            logit.normal_()
    path = mask.save(tmp_path / "m.safetensors")
    loaded = ConcreteMask.load(path, {"a.weight": (3, 2), "b": (4,), "c": (1,)})
    assert loaded.names == ["a.weight", "b"] and loaded.temperature == 0.7
    for name, logit in mask.logits_by_name().items():
        torch.testing.assert_close(loaded.logits_by_name()[name], logit.detach())
    assert ConcreteMask.load(path, temperature=0.2).temperature == 0.2
    with pytest.raises(ValueError, match=r"'a.weight' has shape \(3, 2\).*\(2, 3\)"):
        ConcreteMask.load(path, {"a.weight": (2, 3), "b": (4,)})
    with pytest.raises(ValueError, match="'b', which is not a merged tensor"):
        ConcreteMask.load(path, {"a.weight": (3, 2)})


def test_split_batch_halves_tensors_and_keyword_inputs():
    batch = {"t": {"inputs": {"input_ids": torch.arange(10).view(5, 2), "attention_mask": torch.ones(5, 2)},
                   "labels": torch.arange(5)}}
    first, second = split_batch(batch)
    assert first["t"]["labels"].tolist() == [0, 1] and second["t"]["labels"].tolist() == [2, 3, 4]
    assert first["t"]["inputs"]["input_ids"].shape == (2, 2) and second["t"]["inputs"]["attention_mask"].shape == (3, 2)
    with pytest.raises(ValueError, match="at least 2 examples"):
        split_batch({"t": {"inputs": torch.zeros(1, 3)}})


# -- the merge ----------------------------------------------------------------------------------
@pytest.mark.parametrize("logit", [0.0, 1.7])
def test_equal_logits_continuous_eval_is_task_arithmetic(logit):
    model = build("concrete_task_arithmetic", initial_logit=logit)
    merged = model.merged
    expected = {
        name: base + 0.3 * merged.task_vector(i).sum(0)
        for i, (name, base) in enumerate(merged.pretrained_tensors().items())
    }
    for name, weight in model.eval_weights().items():
        torch.testing.assert_close(weight, expected[name])


def test_binary_eval_mask_is_baked_into_the_export():
    model = build("concrete_task_arithmetic", eval_mask="binary")
    with torch.no_grad():
        for logit in model.mask.logits:
            logit.copy_(torch.randn_like(logit))
    merged = dict(model.merge_and_unload().named_parameters())
    binary = model.mask.binary_mask()
    reference = model.merged.merged_weights(mask=binary)
    for name in binary:
        torch.testing.assert_close(merged[name], reference[name])
    with pytest.raises(ValueError, match="eval_mask"):
        build("concrete_task_arithmetic", eval_mask="threshold")


def test_gradients_reach_logits_through_accumulate_gradients():
    model = build("concrete_task_arithmetic")
    batch = random_batch(model.task_names)
    torch.manual_seed(7)
    model.accumulate_gradients(batch, model.merged_weights())
    accumulated = [logit.grad.clone() for logit in model.mask.logits]
    assert model.merged.coefficients.grad is None
    assert all(g.abs().sum() > 0 for g in accumulated)

    model.mask.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    total_entropy(model, batch, model.merged_weights()).backward()
    for got, want in zip(accumulated, model.mask.logits):
        torch.testing.assert_close(got, want.grad, atol=1e-6, rtol=1e-5)


# -- Concrete task arithmetic -------------------------------------------------------------------
def test_concrete_task_arithmetic_learns_only_the_mask():
    model = build("concrete_task_arithmetic", mask_lr=0.1)
    assert isinstance(model, ConcreteTaskArithmeticModule)
    assert not model.merged.coefficients.requires_grad
    optimizer = model.configure_optimizers()
    assert [p for g in optimizer.param_groups for p in g["params"]] == list(model.mask.logits)
    before = flat_logits(model)
    fit(model, 30)
    entropies = [h["entropy"] for h in model.history]
    assert len(entropies) == 30
    assert sum(entropies[-5:]) / 5 < sum(entropies[:5]) / 5 - 1e-3
    torch.testing.assert_close(model.merged.coefficients, torch.full((3,), 0.3))
    assert not torch.equal(flat_logits(model), before)


def test_export_extras_and_artifacts(tmp_path):
    model = build("concrete_task_arithmetic")
    with torch.no_grad():
        model.mask.logits[0].fill_(1.0)
    extras = model.export_extras()["mask"]
    assert extras["eval_mask"] == "continuous" and extras["temperature"] == 0.5
    assert extras["kept_fraction"]["conv.weight"] == 1.0 and extras["kept_fraction"]["fc.bias"] == 0.0
    assert 0 < extras["kept_fraction_total"] < 1
    json.dumps(extras)
    (path,) = model.save_artifacts(tmp_path)
    assert path == tmp_path / MASK_FILE
    loaded = ConcreteMask.load(path).logits_by_name()
    for name, logit in model.mask.logits_by_name().items():
        torch.testing.assert_close(loaded[name], logit.detach())


# -- Concrete AdaMerging ------------------------------------------------------------------------
class _RecordingOptimizer:
    """Wraps the inner optimizer to record the mask logits' gradients when it steps."""

    def __init__(self, optimizer, mask):
        self.optimizer, self.mask, self.seen = optimizer, mask, []

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.seen.append([logit.grad for logit in self.mask.logits])
        self.optimizer.step()


@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
def test_meta_step_is_first_order_and_leaks_nothing_into_the_mask(granularity):
    model = build(f"concrete_adamerging_{granularity}")
    assert isinstance(model, ConcreteAdaMergingModule)
    outer, inner, _ = model.configure_optimizers()
    batch = random_batch(model.task_names, n=8)
    reference = copy.deepcopy(model)
    recording = _RecordingOptimizer(inner, model.mask)
    torch.manual_seed(11)
    model.meta_step(batch, outer, recording)
    assert recording.seen == [[None] * len(model.mask.logits)]  # no mask gradient at the inner step
    torch.testing.assert_close(model.merged.coefficients, torch.full_like(model.merged.coefficients, 0.3))

    # By hand: inner Adam step (lr 1, first step = sign-like g/(|g|+eps)) on the first halves with a
    # detached sample, then the outer loss on the second halves with a fresh sample.
    first, second = split_batch(batch)
    torch.manual_seed(11)
    with torch.no_grad():
        inner_mask = reference.mask.rescaled_sample()
    lam = reference.merged.coefficients.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(total_entropy(reference, first, reference.merged.merged_weights(inner_mask, lam)), lam)
    adapted = lam.detach() - 1.0 * g / (g.abs() + 1e-8)
    assert not torch.allclose(adapted, lam.detach())
    weights = reference.merged.merged_weights(reference.mask.rescaled_sample(), adapted)
    total_entropy(reference, second, weights).backward()
    for got, want in zip(model.mask.logits, reference.mask.logits):
        torch.testing.assert_close(got.grad, want.grad, atol=1e-6, rtol=1e-4)
    assert reference.merged.coefficients.grad is None and model.merged.coefficients.grad is None


class _Recorder(L.Callback):
    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.steps.append((trainer.global_step, flat_logits(module), module.merged.coefficients.detach().clone()))


def test_one_fit_runs_both_stages():
    model = build("concrete_adamerging_layer_wise", meta_steps=5, mask_lr=0.05, lr=0.05)
    recorder = _Recorder()
    trainer = fit(model, 12, callbacks=[recorder])
    assert trainer.global_step == 12 and len(model.history) == 12  # one meta step = one global step
    assert [s[0] for s in recorder.steps] == list(range(1, 13))
    logits = [s[1] for s in recorder.steps]
    coefficients = [s[2] for s in recorder.steps]
    initial = torch.full_like(coefficients[0], 0.3)
    # stage 1: the mask learns, λ is back at 0.3 after each meta step
    assert all(not torch.equal(a, b) for a, b in zip(logits[:5], logits[1:5]))
    assert all(torch.equal(c, initial) for c in coefficients[:5])
    # stage 2: the mask is frozen, λ moves (and stays clamped)
    assert all(torch.equal(a, logits[4]) for a in logits[5:])
    assert not torch.allclose(coefficients[-1], initial)
    assert coefficients[-1].min() >= 0 and coefficients[-1].max() <= 1
    assert model.frozen_mask is not None and not any(p.requires_grad for p in model.mask.parameters())
    for name, m in model.evaluation_mask().items():
        torch.testing.assert_close(model.frozen_mask[name], m)


def test_stage2_relaxed_sample_is_what_evaluation_uses():
    model = build("concrete_adamerging_task_wise", meta_steps=2, stage2_mask="sample")
    fit(model, 4)
    assert model.export_extras()["mask"]["eval_mask"] == "relaxed_sample"
    frozen = model.merged.merged_weights(mask=model.frozen_mask)
    for name, weight in model.eval_weights().items():
        torch.testing.assert_close(weight, frozen[name])


def test_mask_path_skips_stage_one(tmp_path):
    trained = build("concrete_adamerging_task_wise", meta_steps=3, mask_lr=0.05)
    with pytest.warns(UserWarning, match="only meta-learn the mask"):
        fit(trained, 3)
    (path,) = trained.save_artifacts(tmp_path)
    model = build("concrete_adamerging_task_wise", mask_path=str(path), lr=0.05)
    assert model.meta_steps == 0
    torch.testing.assert_close(flat_logits(model), flat_logits(trained))
    fit(model, 3)
    assert model.frozen_mask is not None
    torch.testing.assert_close(flat_logits(model), flat_logits(trained))
    assert not torch.allclose(model.merged.coefficients, torch.full((3,), 0.3))


def test_too_few_steps_for_stage_two_warns():
    model = build("concrete_adamerging_task_wise", meta_steps=3)
    with pytest.warns(UserWarning, match="meta_steps=3"):
        fit(model, 2)


# -- registry -----------------------------------------------------------------------------------
def test_registered_with_the_documented_defaults():
    ta = get_method("concrete_task_arithmetic").defaults
    assert (ta["init_value"], ta["temperature"], ta["mask_lr"], ta["eval_mask"], ta["mask_patterns"]) == (
        0.3, 0.5, 1e-3, "continuous", None)
    for name in CONCRETE[1:]:
        am = get_method(name)
        assert am.kind == "learned"
        assert (am.defaults["inner_lr"], am.defaults["lr"], am.defaults["clamp"], am.defaults["mask_path"]) == (
            1.0, 1e-3, True, None)
    with pytest.raises(ValueError, match="stage2_mask"):
        build("concrete_adamerging_task_wise", stage2_mask="binary")
