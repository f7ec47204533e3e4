"""Learning on top of a data-free merge (method.base): per-task vectors, their merges, validation, learning."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from adamerge.methods.data_free import merge_task_vectors as merge
from adamerge.errors import ConfigError
from adamerge.methods.learned.bases import BASES, apply_base, resolve_base
from adamerge.methods.learned.adamerging import build_learned
from adamerge.methods.registry import available_methods, get_method
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TinyConvNet, finetuned_states, make_heads
from tests.test_methods import as_lists, make_task_vectors, ref_ties_trim
from tests.test_module import _Stream


def per_task(task_vectors: TaskVectors, base: str, **hparams) -> TaskVectors:
    return apply_base(task_vectors, base, resolve_base("m", base, hparams, task_vectors.num_tasks))


def weighted_sum(vectors: TaskVectors, weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_k w_k τ'_k, one tensor at a time with an explicit loop over tasks."""
    out = {}
    for name, stacked in vectors.vectors.items():
        total = torch.zeros(stacked.shape[1:])
        for k, weight in enumerate(weights):
            total += weight * stacked[k].float()
        out[name] = total
    return out


def assert_close_dicts(actual, expected, atol=1e-5):
    assert set(actual) == set(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].float(), expected[name].float(), atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_ties_base_is_the_trimmed_sign_agreeing_vectors(scope):
    tv = make_task_vectors(3, seed=5)
    trimmed = per_task(tv, "ties", top_k=0.3, scope=scope)
    expected = ref_ties_trim(as_lists(tv), 0.3, scope)
    for k in range(3):
        for name, values in expected[k].items():
            torch.testing.assert_close(trimmed.vectors[name][k].flatten(), torch.tensor(values).flatten(), atol=1e-6,
                                       rtol=0)


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_each_base_is_its_merge_as_task_arithmetic(num_tasks):
    """The per-task vectors reproduce the data-free merge they come from: Σ_k c_k τ'_k."""
    tv = make_task_vectors(num_tasks, seed=7)
    weights = [0.2 + 0.1 * k for k in range(num_tasks)]
    dropped = per_task(tv, "dare", drop_rate=0.4, seed=3, rescale=True)
    assert_close_dicts(weighted_sum(dropped, weights),
                       merge("dare", tv, drop_rate=0.4, seed=3, scaling_coefficient=weights))
    masked = per_task(tv, "breadcrumbs", top_beta=0.1, bottom_gamma=0.3)
    assert_close_dicts(weighted_sum(masked, weights),
                       merge("breadcrumbs", tv, top_beta=0.1, bottom_gamma=0.3, scaling_coefficient=weights))
    balanced = per_task(tv, "pcb", pcb_ratio=0.3, clamp_ratio=0.05)
    assert_close_dicts(weighted_sum(balanced, [w / num_tasks for w in weights]),
                       merge("pcb", tv, pcb_ratio=0.3, clamp_ratio=0.05, scaling_coefficient=weights))
    pieces = per_task(tv, "tsv_merge", rank_fraction=None)
    assert_close_dicts(weighted_sum(pieces, [1.0] * num_tasks), merge("tsv_merge", tv, alpha=1.0))
    iso = per_task(tv, "iso_c")
    assert_close_dicts(weighted_sum(iso, [1.3] * num_tasks), merge("iso_c", tv, alpha=1.3))
    cts = per_task(tv, "iso_cts", common_space_fraction=0.5)
    assert_close_dicts(weighted_sum(cts, [1.5] * num_tasks), merge("iso_cts", tv, common_space_fraction=0.5))


@pytest.mark.parametrize("rank", [None, 2])
def test_iso_pieces_match_a_pseudo_inverse_reference(rank):
    """p_k = M T⁺ τ_k + (M − M T⁺ T) / K with T = Σ_j τ_j, computed with float64 pinv; a rank-deficient sum
    (rank 2 of 6) puts Iso-C's arbitrary zero-value directions in the equally shared remainder."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, 6, generator=generator)
    if rank is not None:
        x = x[..., :rank] @ torch.randn(3, rank, 6, generator=generator)[0]  # every task in one rank-2 row space
    tv = TaskVectors(["a", "b", "c"], {"w": torch.zeros(8, 6)}, {"w": x.clone()})
    got = per_task(tv, "iso_c").vectors["w"]
    merged = merge("iso_c", tv, alpha=1.0)["w"].double()
    total = x.double().sum(0)
    pinv = torch.linalg.pinv(total, rtol=8 * torch.finfo(torch.float32).eps)  # the documented cut-off
    for k in range(3):
        expected = merged @ pinv @ x[k].double() + (merged - merged @ pinv @ total) / 3
        torch.testing.assert_close(got[k].double(), expected, atol=1e-5, rtol=1e-5)


def test_spectral_bases_split_pointwise_convolutions_as_matrices():
    generator = torch.Generator().manual_seed(9)
    kernel = torch.randn(2, 6, 4, 1, 1, generator=generator)
    tv = TaskVectors(["a", "b"], {"pw": torch.zeros(6, 4, 1, 1)}, {"pw": kernel})
    flat = TaskVectors(["a", "b"], {"pw": torch.zeros(6, 4)}, {"pw": kernel[..., 0, 0]})
    for base in ("tsv_merge", "iso_c", "iso_cts"):
        torch.testing.assert_close(per_task(tv, base).vectors["pw"][..., 0, 0], per_task(flat, base).vectors["pw"])
        torch.testing.assert_close(per_task(tv, base, pointwise_convs=False).vectors["pw"], kernel / 2)


def test_tsv_pieces_are_each_tasks_orthogonalised_block():
    tv = make_task_vectors(2, seed=11)
    pieces = per_task(tv, "tsv_merge", rank_fraction=0.25)
    for name, stacked in tv.vectors.items():
        if stacked.ndim != 3:
            torch.testing.assert_close(pieces.vectors[name], stacked.float() / 2)  # averaged like TSV-M
            continue
        keep = int(min(stacked.shape[1:]) * 0.25)
        for k in range(2):
            if keep:
                assert torch.linalg.matrix_rank(pieces.vectors[name][k].double(), atol=1e-5) <= keep
            else:
                assert torch.count_nonzero(pieces.vectors[name][k]) == 0


def test_no_base_leaves_the_task_vectors_alone_and_storage_dtype_is_kept():
    tv = make_task_vectors(2, seed=1)
    assert apply_base(tv, None, {}) is tv
    half = TaskVectors(tv.task_names, tv.pretrained, {n: v.to(torch.bfloat16) for n, v in tv.vectors.items()})
    assert all(v.dtype == torch.bfloat16 for v in per_task(half, "dare", drop_rate=0.5).vectors.values())


def stored_vectors(module) -> dict[str, torch.Tensor]:
    """The task vectors a learned module merges (MergedModel keeps them as buffers, in tensor order)."""
    return {name: getattr(module.merged, f"_task_vector_{i}") for i, name in enumerate(module.merged.names)}


def _tiny_pool(num_tasks=3):
    backbone = TinyConvNet()
    states = finetuned_states(backbone, num_tasks, scale=0.1)
    return backbone, TaskVectors.from_state_dicts(backbone.state_dict(), states), make_heads(list(states))


def test_adamerging_plus_plus_is_adamerging_over_the_ties_base():
    backbone, tv, heads = _tiny_pool()
    plus = build_learned("adamerging_layer_wise_plus_plus", backbone, tv, heads)
    explicit = build_learned("adamerging_layer_wise", backbone, tv, heads, base="ties", base_form="split",
                             base_hparams={"top_k": 0.2, "scope": "model"})
    trimmed = per_task(tv, "ties", top_k=0.2, scope="model")
    assert_close_dicts(stored_vectors(plus), stored_vectors(explicit), atol=0)
    assert_close_dicts(stored_vectors(plus), trimmed.vectors, atol=0)


@pytest.mark.parametrize("base", sorted(BASES))
def test_learning_on_top_of_each_base_lowers_the_objective(base):
    backbone, tv, heads = _tiny_pool()
    module = build_learned("adamerging_task_wise", backbone, tv, heads, lr=5e-2, base=base, base_form="split")
    loader = torch.utils.data.DataLoader(_Stream(module.task_names, 25), batch_size=None)
    L.Trainer(max_steps=25, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, loader)
    values = [h["objective"] for h in module.history]
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5
    assert_close_dicts(stored_vectors(module), per_task(tv, base).vectors, atol=0)  # the base's, not the raw ones


SPLIT = {"base_form": "split"}


@pytest.mark.parametrize(("hparams", "message"), [
    ({"base": "wudi", **SPLIT}, "base='wudi' is invalid"),
    ({"base": "nothing", **SPLIT}, "base='nothing' is invalid"),
    ({"base": None, "base_hparams": {"top_k": 0.1}}, "given without a base"),
    ({"base": "dare", "base_hparams": {"top_k": 0.1}, **SPLIT}, "top_k not used by base 'dare'; allowed: drop_rate"),
    ({"base": "dare", "base_hparams": {"drop_rate": 1.5}, **SPLIT}, "base 'dare': method 'dare': hyperparameter drop_rate=1.5"),
    ({"base": "ties", "base_hparams": [0.2], **SPLIT}, "base_hparams=[0.2] is invalid"),
    # The residual form takes any data-free merge whole, with its full hyperparameters (scaling included).
    ({"base": "nothing"}, "base='nothing' is invalid for base_form=residual"),
    ({"base": "pretrained"}, "base='pretrained' is invalid for base_form=residual"),
    ({"base": "iso_cts", "base_hparams": {"top_k": 0.1}}, "top_k not used by base 'iso_cts'"),
    ({"base": "iso_cts", "base_hparams": {"scaling_coefficient": -1.0}}, "base 'iso_cts'"),
    ({"base": "ties", "base_form": "sideways"}, "base_form"),
])
def test_bad_bases_are_refused_by_the_validator_naming_the_method(hparams, message):
    spec = get_method("adamerging_layer_wise")
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        spec.validate(3, spec.resolve_hparams(hparams))
    assert "adamerging_layer_wise" in str(error.value)


def test_every_learned_method_takes_a_base():
    from adamerge.methods.registry import available_methods

    for name in available_methods("learned"):
        assert {"base", "base_hparams", "base_form"} <= set(get_method(name).defaults), name


# --- the residual form: θ0 + a·(θ_base − θ0) + Σ c_k τ_k --------------------------------------------------------

RESIDUAL_METHODS = ["adamerging_task_wise", "adamerging_layer_wise", "concrete_task_arithmetic",
                    "concrete_adamerging_layer_wise", "adarank"]


@pytest.mark.parametrize("base", [m for m in available_methods("static") if m != "pretrained"])
def test_residual_learning_starts_exactly_at_the_base_merge(base):
    """Step 0 is the data-free merge itself: θ0 + 1·(θ_base − θ0) + Σ 0·τ_k, the raw task vectors kept as they are.
    Every registered data-free merge can be the base (the learned method's pre-processing), WUDI and TSV-M included."""
    backbone, tv, heads = _tiny_pool()
    spec = get_method(base)
    hparams = spec.resolve_hparams({"steps": 5} if base == "wudi" else {})
    expected = spec.fn(tv, **hparams)
    module = build_learned("adamerging_layer_wise", backbone, tv, heads, base=base,
                           base_hparams={"steps": 5} if base == "wudi" else None)
    assert module.merged.task_names == [*tv.task_names, "base_merge"]
    assert module.merged.unscored_tasks == ("base_merge",) and module.task_names == tv.task_names
    rows = module.merged.coefficient_rows()
    assert torch.equal(rows[:, :-1], torch.zeros_like(rows[:, :-1])) and torch.equal(rows[:, -1], torch.ones(len(rows)))
    weights = module.merged_weights()
    for name in tv.names:
        reference = tv.pretrained[name].float() + expected[name].float()
        torch.testing.assert_close(weights[name].float(), reference, atol=1e-6, rtol=1e-6, msg=name)
        torch.testing.assert_close(stored_vectors(module)[name][:-1].float(), tv.vectors[name].float(), atol=0, rtol=0)


@pytest.mark.parametrize("method", RESIDUAL_METHODS)
def test_residual_form_drives_every_learned_method(method):
    backbone, tv, heads = _tiny_pool()
    extra = {"meta_steps": 0} if method.startswith("concrete_adamerging") else {}
    module = build_learned(method, backbone, tv, heads, base="iso_cts", **extra)
    start = {name: w.detach().clone() for name, w in module.merged_weights().items()} if method != "concrete_task_arithmetic" else None
    module.accumulate_gradients(next(iter(_Stream(module.task_names, 1))), module.merged_weights())
    grads = [p.grad for p in module.trainable_parameters() if p.grad is not None]
    assert grads and any(torch.count_nonzero(g) > 0 for g in grads)
    if start is not None and method != "adarank":  # AdaRank's start is its masked spectrum, not the merge itself
        expected = get_method("iso_cts").fn(tv, **get_method("iso_cts").resolve_hparams({}))
        for name in tv.names:
            torch.testing.assert_close(start[name].float(), tv.pretrained[name].float() + expected[name].float(),
                                       atol=1e-5, rtol=1e-5)


def test_residual_learning_lowers_the_objective_and_respects_its_bounds():
    backbone, tv, heads = _tiny_pool()
    module = build_learned("adamerging_layer_wise", backbone, tv, heads, lr=0.3, base="iso_cts")
    loader = torch.utils.data.DataLoader(_Stream(module.task_names, 25), batch_size=None)
    L.Trainer(max_steps=25, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, loader)
    values = [h["objective"] for h in module.history]
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5
    coefficients = module.merged.coefficients.detach()
    assert coefficients[:, :-1].abs().max() <= 1.0 and coefficients[:, :-1].abs().max() > 0.05  # corrections moved
    assert 0.0 <= coefficients[:, -1].min() and coefficients[:, -1].max() <= 2.0
    assert (coefficients[:, -1] > 1.0).any() or (coefficients[:, -1] < 1.0).any()  # the base's scale learned too


def test_residual_scale_may_exceed_the_corrections_clamp():
    """The base's own bound [0, 2] applies to its column, not the corrections' [−1, 1] clamp."""
    backbone, tv, heads = _tiny_pool()
    module = build_learned("adamerging_task_wise", backbone, tv, heads, base="task_arithmetic")
    with torch.no_grad():
        module.merged.coefficients.copy_(torch.tensor([3.0, -3.0, 0.5, 1.7]))
    module.after_optimizer_step()
    assert module.merged.coefficients.tolist() == pytest.approx([1.0, -1.0, 0.5, 1.7])
