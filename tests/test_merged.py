import pytest
import torch

from adamerge.methods.learned.merged import MergedModel
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TinyConvNet, finetuned_states


def build(granularity="layer_wise", num_tasks=3, dtype=torch.float32, storage="float32", **kwargs):
    module = TinyConvNet().to(dtype)
    pretrained = {k: v.clone() for k, v in module.state_dict().items()}
    states = finetuned_states(module, num_tasks)
    vectors = TaskVectors.from_state_dicts(pretrained, states, storage_dtype=storage)
    merged = MergedModel(module, vectors, granularity=granularity, **kwargs)
    return merged, pretrained, states


def reference_weights(pretrained, states, coefficient_of):
    """θ_l = θ0_l + Σ_k λ(l, k)(θ_k,l − θ0_l), one task at a time."""
    weights = {}
    for index, name in enumerate(n for n, t in pretrained.items() if t.is_floating_point() and "running" not in n):
        value = pretrained[name].clone()
        for k, state in enumerate(states.values()):
            value = value + coefficient_of(index, k) * (state[name] - pretrained[name])
        weights[name] = value
    return weights


@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
def test_merged_weights_match_reference(granularity):
    merged, pretrained, states = build(granularity)
    with torch.no_grad():
        merged.coefficients.uniform_(0, 1)
    c = merged.coefficients.detach()
    coef = (lambda l, k: c[k]) if granularity == "task_wise" else (lambda l, k: c[l, k])
    expected = reference_weights(pretrained, states, coef)
    got = merged.merged_weights()
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-6)
    assert merged.coefficients.shape == ((3,) if granularity == "task_wise" else (len(expected), 3))


def test_only_coefficients_require_grad_and_bn_stats_stay_pretrained():
    merged, pretrained, _ = build()
    assert merged.trainable_parameter_names() == ["coefficients"]
    assert "bn.running_mean" not in merged.names and "position_ids" not in merged.names
    weights = merged.merged_weights()
    assert all(w.requires_grad for w in weights.values())


@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
def test_merge_and_unload_equals_wrapper(granularity):
    merged, _, _ = build(granularity)
    with torch.no_grad():
        merged.coefficients.uniform_(0, 1)
    x = torch.randn(5, 3, 8, 8)
    merged.eval()
    plain = merged.merge_and_unload().eval()
    assert type(plain) is TinyConvNet
    assert not any(p.requires_grad for p in plain.parameters())
    torch.testing.assert_close(plain(x), merged(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("granularity", ["task_wise", "layer_wise"])
def test_coefficient_gradients_match_finite_differences(granularity):
    merged, _, _ = build(granularity, dtype=torch.float64, storage=torch.float64)
    merged.eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    initial = torch.rand(merged.coefficients.shape, dtype=torch.float64, requires_grad=True)

    def output(coefficients):
        return merged(x, weights=merged.merged_weights(coefficients=coefficients)).square().sum()

    assert torch.autograd.gradcheck(output, (initial,), eps=1e-6, atol=1e-6)


def test_bfloat16_storage_keeps_gradients_close():
    torch.manual_seed(0)
    full, _, _ = build(storage="float32")
    torch.manual_seed(0)
    half, _, _ = build(storage="bfloat16")
    x = torch.randn(4, 3, 8, 8)
    for merged in (full, half):
        merged.eval()
        merged(x).square().sum().backward()
    assert half.task_vector(0).dtype == torch.bfloat16
    torch.testing.assert_close(half.coefficients.grad, full.coefficients.grad, rtol=2e-2, atol=1e-3)


def test_clamp_and_init_value_validation():
    merged, _, _ = build("task_wise", init_value=[0.1, 0.2, 0.3])
    torch.testing.assert_close(merged.coefficients.detach(), torch.tensor([0.1, 0.2, 0.3]))
    with torch.no_grad():
        merged.coefficients.copy_(torch.tensor([-1.0, 0.5, 2.0]))
    merged.clamp_coefficients_()
    torch.testing.assert_close(merged.coefficients.detach(), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="3 tasks"):
        build("task_wise", init_value=[0.1, 0.2])


def test_layer_groups_share_coefficients():
    module = TinyConvNet()
    pretrained = module.state_dict()
    vectors = TaskVectors.from_state_dicts(pretrained, finetuned_states(module, 2))
    groups = [0 if name.startswith(("conv", "bn")) else 1 for name in vectors.names]
    merged = MergedModel(module, vectors, granularity="layer_wise", layer_groups=groups)
    assert merged.coefficients.shape == (2, 2)
    merged(torch.randn(2, 3, 8, 8)).sum().backward()
    assert merged.coefficients.grad.abs().sum() > 0


def test_efficientnet_lite0_real_weights():
    from adamerge.backbones.efficientnet import efficientnet_lite0

    backbone = efficientnet_lite0(pretrained=True, num_classes=None).eval()
    pretrained = {k: v.clone() for k, v in backbone.state_dict().items()}
    states = finetuned_states(backbone, 2, scale=1e-3)
    vectors = TaskVectors.from_state_dicts(pretrained, states)
    assert not any("running" in n or "num_batches" in n for n in vectors.names)
    merged = MergedModel(backbone, vectors, granularity="layer_wise").eval()
    assert merged.trainable_parameter_names() == ["coefficients"]
    x = torch.randn(2, 3, 32, 32)
    out = merged(x)
    torch.testing.assert_close(merged.merge_and_unload().eval()(x), out, atol=1e-6, rtol=1e-5)
    out.square().sum().backward()
    assert merged.coefficients.grad.shape == (len(vectors.names), 2)
    assert torch.isfinite(merged.coefficients.grad).all()


def test_transformers_model_with_tied_weights():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    model = GPT2LMHeadModel(config).eval()
    pretrained = model.state_dict()
    assert pretrained["lm_head.weight"].data_ptr() == pretrained["transformer.wte.weight"].data_ptr()
    states = finetuned_states(model, 2, scale=0.02)
    for state in states.values():  # a fine-tuned tied model keeps its tie
        state["lm_head.weight"] = state["transformer.wte.weight"]
    vectors = TaskVectors.from_state_dicts(pretrained, states)
    assert "lm_head.weight" not in vectors.names and "transformer.wte.weight" in vectors.names
    merged = MergedModel(model, vectors, granularity="task_wise")
    ids = torch.randint(0, 50, (2, 7))
    logits = merged(input_ids=ids).logits
    plain = merged.merge_and_unload()
    torch.testing.assert_close(plain(input_ids=ids).logits, logits, atol=1e-5, rtol=1e-5)
    assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()
    expected = pretrained["transformer.wte.weight"] + 0.3 * sum(
        s["transformer.wte.weight"] - pretrained["transformer.wte.weight"] for s in states.values()
    )
    torch.testing.assert_close(plain.lm_head.weight, expected, atol=1e-6, rtol=1e-6)
