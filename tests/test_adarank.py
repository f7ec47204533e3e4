import json

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adamerge.methods.learned.adarank import MASK_FILE, RANKS_FILE, AdaRankModule
from adamerge.methods.learned.spectral_merged import SpectralMergedModel, spectral_sum
from adamerge.errors import ConfigError
from adamerge.methods.learned.adamerging import build_learned
from adamerge.methods.registry import get_method
from adamerge.reporting.plots import PNG_SIGNATURE
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TinyConvNet, finetuned_states, make_heads
from tests.test_module import _Stream, random_batch


def tiny(num_tasks=3, features=6, seed=0):
    torch.manual_seed(seed)  # the same backbone on every call, so references can rebuild it
    module = TinyConvNet(features)
    states = finetuned_states(module, num_tasks, scale=0.3, seed=seed)
    return module, TaskVectors.from_state_dicts(module.state_dict(), states)


def build(num_tasks=3, **hparams):
    module, vectors = tiny(num_tasks)
    return build_learned("adarank", module.eval(), vectors, make_heads(vectors.task_names), **hparams)


def randomise_logits(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for logit in model.merged.rank_logits:
            logit.copy_(torch.randn(logit.shape, generator=generator))


def fit(model, steps):
    loader = torch.utils.data.DataLoader(_Stream(model.task_names, steps), batch_size=None)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)


# -- the merge ---------------------------------------------------------------------------------
def test_only_matrices_are_decomposed_and_their_raw_stacks_are_freed():
    model = build()
    merged = model.merged
    assert isinstance(model, AdaRankModule) and merged.svd_names == ["fc.weight"]
    u, s, vh = merged.factors(0)
    assert u.shape == (3, 6, 4) and s.shape == (3, 4) and vh.shape == (3, 4, 4)
    index = merged.names.index("fc.weight")
    assert getattr(merged, f"_task_vector_{index}").numel() == 0
    _, vectors = tiny()
    torch.testing.assert_close(merged.task_vector(index), vectors.vectors["fc.weight"], atol=1e-5, rtol=1e-5)
    # Initial mask (authors): +0.1 on the leading int(r * ratio) components, -0.1 on the rest.
    assert torch.equal(merged.rank_logits[0], torch.full((3, 4), 0.1))
    ratio = build(initial_rank_ratio=0.6).merged.rank_logits[0]
    assert torch.equal(ratio, torch.tensor([[0.1, 0.1, -0.1, -0.1]] * 3))


def test_all_masks_on_is_layer_wise_adamerging():
    model = build()
    module, vectors = tiny()
    reference = build_learned("adamerging_layer_wise", module.eval(), vectors, make_heads(vectors.task_names),
                              clamp=False)
    torch.manual_seed(3)
    coefficients = torch.rand_like(model.merged.coefficients)
    with torch.no_grad():
        model.merged.coefficients.copy_(coefficients)
        reference.merged.coefficients.copy_(coefficients)
    expected = reference.merged.merged_weights()
    for weights in (model.merged_weights(), model.eval_weights()):
        assert set(weights) == set(expected)
        for name, weight in weights.items():
            torch.testing.assert_close(weight, expected[name], atol=1e-5, rtol=1e-5)


def test_random_masks_match_the_naive_component_loop():
    model = build()
    randomise_logits(model)
    merged = model.merged
    with torch.no_grad():
        merged.coefficients.copy_(torch.rand(merged.coefficients.shape, generator=torch.Generator().manual_seed(1)))
    _, vectors = tiny()
    index = merged.names.index("fc.weight")
    expected = vectors.pretrained["fc.weight"].clone()
    for k in range(3):
        u, s, vh = torch.linalg.svd(vectors.vectors["fc.weight"][k], full_matrices=False)
        for i in range(4):
            if merged.rank_logits[0][k, i] > 0:
                expected += merged.coefficients[index, k].detach() * s[i] * torch.outer(u[:, i], vh[i])
    kept = merged.kept_ranks()["fc.weight"]
    assert 0 < sum(kept) < 12  # a real mix of kept and dropped components
    torch.testing.assert_close(model.eval_weights()["fc.weight"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.merged_weights()["fc.weight"], expected, atol=1e-5, rtol=1e-5)
    # Tensors that are not matrices take the raw τ with their layer's λ.
    conv = merged.names.index("conv.weight")
    raw = vectors.pretrained["conv.weight"] + torch.einsum("k,k...->...", merged.coefficients[conv].detach(),
                                                           vectors.vectors["conv.weight"])
    torch.testing.assert_close(model.eval_weights()["conv.weight"], raw, atol=1e-6, rtol=1e-6)


def test_spectral_sum_gradient_matches_autograd_in_float64():
    generator = torch.Generator().manual_seed(0)
    for m, n in ((5, 3), (3, 7)):
        u = torch.randn(2, m, 3, dtype=torch.float64, generator=generator)
        vh = torch.randn(2, 3, n, dtype=torch.float64, generator=generator)
        c = torch.randn(2, 3, dtype=torch.float64, generator=generator, requires_grad=True)
        naive = torch.einsum("kmr,kr,krn->mn", u, c, vh)
        torch.testing.assert_close(spectral_sum(c, u, vh), naive)
        assert torch.autograd.gradcheck(lambda c: spectral_sum(c, u, vh), (c,))


def test_straight_through_gradient_on_a_toy_layer():
    model = build(temperature=10.0)
    merged = model.merged
    randomise_logits(model, seed=2)
    index = merged.names.index("fc.weight")
    weights = model.merged_weights()
    hard = (merged.rank_logits[0].detach() > 0).float()
    torch.testing.assert_close(weights["fc.weight"], model.eval_weights()["fc.weight"], atol=0, rtol=0)
    g = torch.randn(weights["fc.weight"].shape, generator=torch.Generator().manual_seed(4))
    (weights["fc.weight"] * g).sum().backward()
    # By hand: dL/dℓ_{k,i} = λ_k s_{k,i} u_{k,i}ᵀ G v_{k,i} · σ'(ℓ/T)/T, and dL/dλ_k = Σ_i m_{k,i} s_{k,i} u ᵀ G v.
    u, s, vh = merged.factors(0)
    logit = merged.rank_logits[0].detach()
    p = torch.sigmoid(logit / 10.0)
    projection = torch.einsum("kmi,mn,kin->ki", u, g, vh)
    lam = merged.coefficients[index].detach()
    expected = lam[:, None] * s * projection * p * (1 - p) / 10.0
    grad = merged.rank_logits[0].grad
    assert torch.isfinite(grad).all() and grad.abs().min() > 0
    torch.testing.assert_close(grad, expected, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(merged.coefficients.grad[index], (hard * s * projection).sum(1), atol=1e-6, rtol=1e-4)
    assert set(hard.unique().tolist()) == {0.0, 1.0}


# -- learning ----------------------------------------------------------------------------------
def test_learning_lowers_the_objective_and_moves_lambda_and_masks():
    model = build(lr=5e-2, mask_lr=5e-2)
    optimizer = model.configure_optimizers()
    assert [g["lr"] for g in optimizer.param_groups] == [5e-2, 5e-2]
    assert [p for g in optimizer.param_groups for p in g["params"]] == model.trainable_parameters()
    keys = model.resumable_state_keys()
    assert "merged.coefficients" in keys and "merged.rank_logits.0" in keys
    assert not any(k.startswith(("merged._u_", "merged._s_", "merged._vh_")) for k in model.state_dict())
    before_lambda = model.merged.coefficients.detach().clone()
    before_masks = [m.clone() for m in model.merged.hard_masks()]
    fit(model, 30)
    values = [h["objective"] for h in model.history]
    assert len(values) == 30 and sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 1e-3
    assert not torch.allclose(model.merged.coefficients.detach(), before_lambda)
    assert any(not torch.equal(a, b) for a, b in zip(model.merged.hard_masks(), before_masks))


def test_gradients_reach_both_through_accumulate_gradients():
    model = build()
    model.accumulate_gradients(random_batch(model.task_names), model.merged_weights())
    assert model.merged.coefficients.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.merged.rank_logits)


def test_checkpoint_holds_lambda_and_logits_and_restores_them():
    model = build()
    randomise_logits(model, seed=6)
    checkpoint = {"state_dict": model.state_dict()}
    model.on_save_checkpoint(checkpoint)
    assert set(checkpoint["state_dict"]) == {"merged.coefficients", "merged.rank_logits.0"}  # no factors saved
    fresh = build()
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    fresh.on_load_checkpoint(checkpoint)
    assert torch.equal(fresh.merged.rank_logits[0], model.merged.rank_logits[0])
    for name, weight in fresh.eval_weights().items():
        torch.testing.assert_close(weight, model.eval_weights()[name], atol=0, rtol=0)


# -- export ------------------------------------------------------------------------------------
def test_export_extras_artifacts_and_merge_and_unload(tmp_path):
    model = build()
    randomise_logits(model, seed=5)
    extras = model.export_extras()["adarank"]
    json.dumps(extras)
    kept = extras["rank_kept"]
    assert list(kept) == ["fc.weight"] and len(kept["fc.weight"]) == 3
    assert all(isinstance(r, int) and 0 <= r <= extras["full_rank"]["fc.weight"] for r in kept["fc.weight"])
    assert kept["fc.weight"] == [int((row > 0).sum()) for row in model.merged.rank_logits[0]]
    assert extras["memory"]["total_bytes"] > 0
    paths = model.save_artifacts(tmp_path)
    assert paths == [tmp_path / MASK_FILE, tmp_path / RANKS_FILE]
    assert (tmp_path / RANKS_FILE).read_bytes().startswith(PNG_SIGNATURE)
    torch.testing.assert_close(load_file(str(tmp_path / MASK_FILE))["fc.weight"], model.merged.rank_logits[0].detach())
    with safe_open(str(tmp_path / MASK_FILE), framework="pt") as handle:
        assert json.loads(handle.metadata()["tasks"]) == model.task_names

    fused = model.merge_and_unload()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.task_logits("task0", x, model.eval_weights())
        torch.testing.assert_close(model.heads["task0"](fused(x)), expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(fused(x), model.merged.merge_and_unload()(x))


def test_memory_report_on_the_tiny_model():
    report = build().merged.memory_report()
    # fc.weight 6x4, K=3: raw 3·24 floats; factors 3·(6·4 + 4 + 4·4) floats; logits 3·4.
    assert report["factor_bytes"] == 4 * 3 * (24 + 4 + 16) and report["logit_bytes"] == 4 * 12
    assert report["adamerging_task_vector_bytes"] - report["raw_task_vector_bytes"] == 4 * 72
    assert report["total_bytes"] == report["raw_task_vector_bytes"] + report["factor_bytes"] + report["logit_bytes"]
    small = build(max_rank_ratio=0.5).merged
    assert small.factors(0)[0].shape == (3, 6, 2) and small.rank_logits[0].shape == (3, 2)


def test_cart_origin_recentres_at_the_average():
    model = build(origin="average", init_value=0.0)
    _, vectors = tiny()
    for name, weight in model.eval_weights().items():
        average = vectors.pretrained[name] + vectors.vectors[name].mean(0)
        torch.testing.assert_close(weight, average, atol=1e-6, rtol=1e-6)


def test_svd_patterns_choose_the_decomposed_tensors():
    with pytest.raises(ValueError, match="needs a 2-D merged tensor"):
        build(svd_patterns=["conv.*"])
    assert build(svd_patterns=["fc.*"]).merged.svd_names == ["fc.weight"]


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("lr", -1e-3), ("mask_lr", 0.0), ("initial_rank_ratio", 0.0), ("initial_rank_ratio", 1.5),
    ("max_rank_ratio", 0.0), ("temperature", -1.0), ("origin", "cart"), ("initial_logit", 0.0),
    ("init_value", [0.3, 0.3]), ("svd_patterns", []), ("pointwise_convs", "yes"), ("max_rank_ratio", 2),
])
def test_validator_rejects_bad_values(name, value):
    spec = get_method("adarank")
    with pytest.raises(ConfigError, match=f"'adarank': hyperparameter {name}="):
        spec.validate(3, spec.resolve_hparams({name: value}))


def test_registered_as_learned():
    spec = get_method("adarank")
    assert spec.kind == "learned"
    assert spec.defaults["base"] is None and spec.defaults["initial_rank_ratio"] == 1.0
    spec.validate(3, spec.resolve_hparams({}))
    assert isinstance(build().merged, SpectralMergedModel)


def test_pointwise_convolutions_are_decomposed_as_matrices():
    from adamerge.methods.learned.merged import MergedModel

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 1)
    vectors = TaskVectors.from_state_dicts(conv.state_dict(), finetuned_states(conv, 2, scale=0.3))
    merged = SpectralMergedModel(conv, vectors)
    assert merged.svd_names == ["weight"] and merged.factors(0)[0].shape == (2, 6, 4)
    reference = MergedModel(torch.nn.Conv2d(4, 6, 1), vectors, clamp=None)
    expected = reference.merged_weights()
    for name, weight in merged.merged_weights().items():
        torch.testing.assert_close(weight, expected[name], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.task_vector(0), vectors.vectors["weight"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs a 2-D merged tensor"):
        SpectralMergedModel(torch.nn.Conv2d(4, 6, 1), vectors, pointwise_convs=False)
