import lightning as L
import pytest
import torch
from torch.func import functional_call

from adamerge.methods.learned.merged import MergedModel
from adamerge.training.module import AdaMergingModule
from adamerge.objectives import prediction_entropy
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TinyConvNet, finetuned_states, make_heads


def build_module(granularity="layer_wise", num_tasks=3, **kwargs):
    module = TinyConvNet()
    vectors = TaskVectors.from_state_dicts(module.state_dict(), finetuned_states(module, num_tasks, scale=0.3))
    merged = MergedModel(module.eval(), vectors, granularity=granularity)
    return AdaMergingModule(merged, make_heads(vectors.task_names), **kwargs)


def random_batch(tasks, n=4):
    return {task: {"inputs": torch.randn(n, 3, 8, 8), "labels": torch.zeros(n, dtype=torch.long)} for task in tasks}


def test_token_entropy_is_chunked_forward_and_backward_with_autograd_s_gradients(monkeypatch):
    """Entropy a few rows at a time: the values and gradients of the plain log-softmax formula (gradcheck, float64,
    chunks cutting the rows unevenly; bfloat16 logits give float32 entropies and logit-dtype gradients), and
    autograd keeps the logits and the entropies only -- not four float32 copies of the logits."""
    import adamerge.objectives.label_free as label_free

    def reference(z):
        log_probs = torch.log_softmax(z.to(torch.promote_types(z.dtype, torch.float32)), -1)
        return -(log_probs.exp() * log_probs).sum(-1)

    monkeypatch.setattr(label_free, "ENTROPY_CHUNK_ELEMENTS", 7)
    logits = torch.randn(5, 9, 13, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(label_free.token_entropy, (logits,))
    torch.testing.assert_close(label_free.token_entropy(logits), reference(logits))
    half = torch.randn(4, 6, dtype=torch.bfloat16, requires_grad=True)
    values = label_free.token_entropy(half)
    assert values.dtype == torch.float32
    torch.testing.assert_close(values, reference(half))
    (grad,) = torch.autograd.grad(values.sum(), half)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, torch.autograd.grad(reference(half).sum(), half)[0])

    monkeypatch.setattr(label_free, "ENTROPY_CHUNK_ELEMENTS", 1 << 22)
    kept = []
    big = torch.randn(64, 1000, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
        label_free.token_entropy(big).sum()
    assert sum(kept) == big.numel() + 64  # the logits and one entropy per row


def test_prediction_entropy_reference_and_mask():
    logits = torch.randn(3, 5, 7)
    p = logits.softmax(-1)
    reference = -(p * p.log()).sum(-1)
    torch.testing.assert_close(prediction_entropy(logits), reference.mean())
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    torch.testing.assert_close(prediction_entropy(logits, mask), reference[mask.bool()].mean())
    uniform = torch.zeros(2, 4)
    torch.testing.assert_close(prediction_entropy(uniform), torch.log(torch.tensor(4.0)))


@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
def test_per_task_accumulation_equals_single_graph(granularity):
    model = build_module(granularity)
    batch = random_batch(model.task_names)
    model.accumulate_gradients(batch, model.merged.merged_weights())
    accumulated = model.merged.coefficients.grad.clone()

    model.merged.coefficients.grad = None
    weights = model.merged.merged_weights()
    total = sum(
        prediction_entropy(model.heads[t](functional_call(model.merged.module, weights, (batch[t]["inputs"],))))
        for t in model.task_names
    )
    total.backward()
    torch.testing.assert_close(accumulated, model.merged.coefficients.grad, atol=1e-6, rtol=1e-5)


def test_merge_graph_traversed_once_per_step(monkeypatch):
    from adamerge.methods.learned import merged as merged_module

    calls = {"backward": 0}
    original = merged_module._WeightedTaskSum.backward

    def counting(ctx, grad):
        calls["backward"] += 1
        return original(ctx, grad)

    monkeypatch.setattr(merged_module._WeightedTaskSum, "backward", staticmethod(counting))
    model = build_module(num_tasks=4)
    model.accumulate_gradients(random_batch(model.task_names), model.merged.merged_weights())
    assert calls["backward"] == len(model.merged.names)  # once per tensor, not once per task


def test_only_coefficients_train():
    model = build_module()
    optimizer = model.configure_optimizers()
    assert [p for g in optimizer.param_groups for p in g["params"]] == [model.merged.coefficients]
    list(model.heads.values())[0].weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="only merge coefficients"):
        model.configure_optimizers()


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, tasks, steps):
        self.tasks, self.steps = tasks, steps
        self.data = {t: torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(tasks)}

    def __iter__(self):
        for _ in range(self.steps):
            yield {t: {"inputs": x, "labels": torch.zeros(16, dtype=torch.long)} for t, x in self.data.items()}


@pytest.mark.parametrize("objective", [{"name": "entropy"}, {"name": "information_maximization"},
                                       {"name": "confident_entropy", "threshold": 1.0}])
def test_trainer_lowers_the_objective_and_clamps(objective):
    from adamerge.objectives import build_objective

    model = build_module(lr=5e-2, objective=build_objective(**objective))
    loader = torch.utils.data.DataLoader(_Stream(model.task_names, 40), batch_size=None)
    trainer = L.Trainer(
        max_steps=40, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, loader)
    values = [h["objective"] for h in model.history]
    assert len(values) == 40
    profile = model.profile.report()
    assert model.profile.steps == 40 and set(profile) == {"data", "merge", "forward", "backward", "optimizer"}
    assert all(profile[phase]["seconds"] > 0 for phase in profile)
    assert sum(values["fraction"] for values in profile.values()) == pytest.approx(1.0)
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 1e-3
    c = model.merged.coefficients.detach()
    assert c.min() >= 0 and c.max() <= 1
    assert not torch.allclose(c, torch.full_like(c, 0.3))


def test_bfloat16_autocast_gradients_close_to_float32():
    torch.manual_seed(0)
    full = build_module()
    torch.manual_seed(0)
    half = build_module(autocast_dtype="bfloat16")
    batch = random_batch(full.task_names, n=8)
    for model in (full, half):
        model.accumulate_gradients(batch, model.merged.merged_weights())
    assert half.merged.coefficients.grad.dtype == torch.float32
    cosine = torch.nn.functional.cosine_similarity(
        half.merged.coefficients.grad.flatten(), full.merged.coefficients.grad.flatten(), dim=0
    )
    assert cosine > 0.95


def test_backbone_stays_in_eval_mode_during_fit():
    model = build_module()
    model.train()
    assert not model.merged.module.training and not any(h.training for h in model.heads.values())
    running_mean = model.merged.module.bn.running_mean.clone()
    model.accumulate_gradients(random_batch(model.task_names), model.merged.merged_weights())
    torch.testing.assert_close(model.merged.module.bn.running_mean, running_mean)


def test_fit_puts_a_train_mode_backbone_in_eval_mode():
    """Lightning does not call train() at fit start: the module must, or BatchNorm learns on batch statistics."""
    model = build_module(lr=5e-2)
    model.merged.module.train()
    for head in model.heads.values():
        head.train()
    running_mean = model.merged.module.bn.running_mean.clone()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(_Stream(model.task_names, 3), batch_size=None))
    assert not model.merged.module.training and not any(h.training for h in model.heads.values())
    torch.testing.assert_close(model.merged.module.bn.running_mean, running_mean)


def test_label_free_report_compares_the_first_and_last_evaluation():
    model = build_module(lr=5e-2)
    generator = torch.Generator().manual_seed(5)
    eval_batches = {t: {"inputs": torch.randn(32, 3, 8, 8, generator=generator), "labels": torch.zeros(32, dtype=torch.long)}
                    for t in model.task_names}
    loaders = [torch.utils.data.DataLoader([eval_batches[t]], batch_size=None) for t in model.task_names]
    with torch.no_grad():
        weights = model.merged.merged_weights()
        start = {t: model.objective(model.heads[t](functional_call(model.merged.module, weights, (b["inputs"],)))).item()
                 for t, b in eval_batches.items()}
        start_predictions = {t: model.heads[t](functional_call(model.merged.module, weights, (b["inputs"],))).argmax(-1)
                             for t, b in eval_batches.items()}
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(model, dataloaders=loaders, verbose=False)
    assert model.label_free_report() == {}  # nothing to compare with yet
    trainer.fit(model, torch.utils.data.DataLoader(_Stream(model.task_names, 30), batch_size=None))
    trainer.validate(model, dataloaders=loaders, verbose=False)
    report = model.label_free_report()
    assert set(report) == set(model.task_names)
    with torch.no_grad():
        weights = model.merged.merged_weights()
        for task, batch in eval_batches.items():
            logits = model.heads[task](functional_call(model.merged.module, weights, (batch["inputs"],)))
            assert report[task]["objective_start"] == pytest.approx(start[task], abs=1e-5)
            assert report[task]["objective_end"] == pytest.approx(model.objective(logits).item(), abs=1e-5)
            changed = (logits.argmax(-1) != start_predictions[task]).float().mean().item()
            assert report[task]["prediction_changed"] == pytest.approx(changed)
    assert sum(r["objective_end"] for r in report.values()) < sum(r["objective_start"] for r in report.values())


def test_non_finite_objective_stops_before_the_coefficients_change():
    from adamerge.training.module import NonFiniteError

    model = build_module()
    batch = random_batch(model.task_names)
    batch[model.task_names[1]]["inputs"][0, 0, 0, 0] = float("nan")
    before = model.merged.coefficients.detach().clone()
    with pytest.raises(NonFiniteError, match=f"objective is nan on task '{model.task_names[1]}' at step 0"):
        model.accumulate_gradients(batch, model.merged.merged_weights())
    assert torch.equal(model.merged.coefficients.detach(), before) and torch.isfinite(before).all()


class _PoisonedStream(torch.utils.data.IterableDataset):
    """Random batches where the steps in ``poisoned`` carry a NaN input for one task."""

    def __init__(self, tasks, steps, poisoned):
        self.tasks, self.steps, self.poisoned = tasks, steps, set(poisoned)

    def __iter__(self):
        generator = torch.Generator().manual_seed(1)
        for step in range(self.steps):
            batch = {t: {"inputs": torch.randn(4, 3, 8, 8, generator=generator)} for t in self.tasks}
            if step in self.poisoned:
                batch[self.tasks[0]]["inputs"][0, 0, 0, 0] = float("nan")
            yield batch


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_non_finite_steps_stop_the_run_or_are_skipped_without_an_update(policy):
    from adamerge.training.module import NonFiniteError

    model = build_module(lr=5e-2)
    model.on_nonfinite = policy
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    seen = []
    original = model.after_optimizer_step

    def record():  # coefficients after each step that updated them
        seen.append(model.merged.coefficients.detach().clone())
        original()

    model.after_optimizer_step = record
    loader = torch.utils.data.DataLoader(_PoisonedStream(model.task_names, 6, poisoned={2, 3}), batch_size=None)
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=f"on task '{model.task_names[0]}' at step 2"):
            trainer.fit(model, loader)
        assert len(seen) == 2 and torch.isfinite(model.merged.coefficients).all()
        return
    trainer.fit(model, loader)
    assert trainer.global_step == 6  # skipped steps count toward max_steps, so the stream stays aligned
    assert [s["step"] for s in model.skipped_steps] == [2, 3]
    assert "objective is nan" in model.skipped_steps[0]["reason"]
    assert [h["objective"] is None for h in model.history] == [False, False, True, True, False, False]
    assert len(seen) == 4 and torch.isfinite(model.merged.coefficients).all()
    assert not torch.equal(seen[1], seen[2])  # learning went on after the skipped steps


def test_joint_task_batching_gives_the_sequential_gradients_in_float64():
    torch.manual_seed(0)
    sequential = build_module(num_tasks=4).double()
    torch.manual_seed(0)
    joint = build_module(num_tasks=4, task_batching_mode="joint").double()
    batch = {t: {"inputs": x["inputs"].double()} for t, x in random_batch(sequential.task_names, n=5).items()}
    for model in (sequential, joint):
        objectives = model.accumulate_gradients(batch, model.merged.merged_weights())
    assert joint.resolved_task_batching(batch, {}) == "joint"
    torch.testing.assert_close(joint.merged.coefficients.grad, sequential.merged.coefficients.grad, atol=1e-6, rtol=0)
    assert sequential.merged.coefficients.grad.abs().max() > 1e-3  # not vacuous
    assert objectives == pytest.approx(sequential.accumulate_gradients(batch, sequential.merged.merged_weights()))


def test_joint_task_batching_refuses_what_mixes_examples():
    from adamerge.errors import ConfigError

    model = TinyConvNet()
    model.bn = torch.nn.BatchNorm2d(model.bn.num_features, track_running_stats=False)
    vectors = TaskVectors.from_state_dicts(model.state_dict(), finetuned_states(model, 2, scale=0.3))
    merged = MergedModel(model.eval(), vectors)
    with pytest.raises(ConfigError, match="task_batching=joint would let examples of different tasks interact"):
        AdaMergingModule(merged, make_heads(vectors.task_names), task_batching_mode="joint")
    with pytest.raises(ConfigError, match="task_batching='jointly' is invalid"):
        AdaMergingModule(merged, make_heads(vectors.task_names), task_batching_mode="jointly")
    auto = AdaMergingModule(merged, make_heads(vectors.task_names), task_batching_mode="auto")
    assert auto.resolved_task_batching(random_batch(auto.task_names), {}) == "sequential"  # CPU, and BN mixes


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_forward_gives_the_eager_gradients(backend):
    torch.manual_seed(0)
    eager = build_module()
    torch.manual_seed(0)
    compiled = build_module()
    compiled.merged.compile_forward(backend)
    for step in range(2):  # the second step reuses the compiled graph with new weight tensors
        batch = random_batch(eager.task_names)
        for model in (eager, compiled):
            model.merged.coefficients.grad = None
            objectives = model.accumulate_gradients(batch, model.merged.merged_weights())
        torch.testing.assert_close(compiled.merged.coefficients.grad, eager.merged.coefficients.grad, atol=1e-5, rtol=1e-4)
        assert objectives == pytest.approx(eager.accumulate_gradients(batch, eager.merged.merged_weights()), abs=1e-5)
