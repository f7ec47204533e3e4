"""Data-free merge methods against naive references written here with per-entry Python loops."""

from __future__ import annotations

import copy
import math
import uuid
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from adamerge import TaskVectors, merge
from adamerge.methods import available_methods, get_method, register_method
from adamerge.methods.data_free import merge_task_vectors, steps

CONF_METHOD = Path(__file__).resolve().parents[1] / "conf" / "method"
SHAPES = {"a.weight": (3, 4), "a.bias": (5,), "b.weight": (2, 3, 5)}
STATIC = ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs"]


# ------------------------------------------------------------------- naive references (plain lists)


def ref_keep_count(fraction: float, n: int) -> int:
    return max(1, math.ceil(Fraction(str(fraction)) * n))


def ref_topk_keep(values: list[float], fraction: float) -> list[bool]:
    mags = sorted((abs(v) for v in values), reverse=True)
    threshold = mags[ref_keep_count(fraction, len(values)) - 1]
    return [abs(v) >= threshold for v in values]


def ref_breadcrumbs_keep(values: list[float], beta: float, gamma: float) -> list[bool]:
    n = len(values)
    mags = sorted(abs(v) for v in values)
    n_bottom = math.floor(Fraction(str(gamma)) * n)
    n_top = math.floor(Fraction(str(beta)) * n)
    low = mags[n_bottom - 1] if n_bottom else -math.inf
    high = mags[n - n_top] if n_top else math.inf
    return [low < abs(v) < high for v in values]


def sign(v: float) -> float:
    return (v > 0) - (v < 0)


def ref_elect(tasks: list[list[float]]) -> list[float]:
    """Elected sign per entry; zero sums take the majority of the elected signs (+1 on a tie)."""
    sums = [sum(task[i] for task in tasks) for i in range(len(tasks[0]))]
    signs = [sign(s) for s in sums]
    fallback = -1.0 if sum(signs) < 0 else 1.0
    return [float(s) if s != 0 else fallback for s in signs]


def ref_disjoint_mean(tasks: list[list[float]], elected: list[float]) -> list[float]:
    out = []
    for i, e in enumerate(elected):
        agreeing = [task[i] for task in tasks if task[i] != 0 and sign(task[i]) == e]
        out.append(sum(agreeing) / len(agreeing) if agreeing else 0.0)
    return out


def as_lists(tv: TaskVectors) -> list[dict[str, list[float]]]:
    """Per task, per tensor name, the flat float values."""
    return [{name: v[k].reshape(-1).tolist() for name, v in tv.vectors.items()} for k in range(tv.num_tasks)]


def flatten_model(task: dict[str, list[float]]) -> tuple[list[float], list[tuple[str, int]]]:
    values, where = [], []
    for name, vals in task.items():
        values += vals
        where += [(name, i) for i in range(len(vals))]
    return values, where


def unflatten(values: list[float], where: list[tuple[str, int]], like: dict[str, list]) -> dict[str, list]:
    out = {name: [0.0] * len(vals) for name, vals in like.items()}
    for v, (name, i) in zip(values, where):
        out[name][i] = v
    return out


def ref_ties_trim(
    tasks: list[dict[str, list[float]]], fraction: float, scope: str
) -> list[dict[str, list[float]]]:
    """Per task trimmed values that agree with the elected sign; tensors ranked alone or as one model."""
    if scope == "model":
        flat = [flatten_model(task) for task in tasks]
        where = flat[0][1]
        trimmed = [
            [v if keep else 0.0 for v, keep in zip(vals, ref_topk_keep(vals, fraction))] for vals, _ in flat
        ]
        elected = ref_elect(trimmed)
        agreed = [[v if v != 0 and sign(v) == e else 0.0 for v, e in zip(t, elected)] for t in trimmed]
        return [unflatten(a, where, tasks[0]) for a in agreed]
    out = [{} for _ in tasks]
    for name in tasks[0]:
        trimmed = [
            [v if keep else 0.0 for v, keep in zip(t[name], ref_topk_keep(t[name], fraction))] for t in tasks
        ]
        elected = ref_elect(trimmed)
        for k, t in enumerate(trimmed):
            out[k][name] = [v if v != 0 and sign(v) == e else 0.0 for v, e in zip(t, elected)]
    return out


def ref_ties(
    tasks: list[dict[str, list[float]]], fraction: float, lam: float, scope: str
) -> dict[str, list[float]]:
    if scope == "model":
        flat = [flatten_model(task) for task in tasks]
        trimmed = [
            [v if keep else 0.0 for v, keep in zip(vals, ref_topk_keep(vals, fraction))] for vals, _ in flat
        ]
        merged = ref_disjoint_mean(trimmed, ref_elect(trimmed))
        return unflatten([lam * m for m in merged], flat[0][1], tasks[0])
    out = {}
    for name in tasks[0]:
        trimmed = [
            [v if keep else 0.0 for v, keep in zip(t[name], ref_topk_keep(t[name], fraction))] for t in tasks
        ]
        out[name] = [lam * m for m in ref_disjoint_mean(trimmed, ref_elect(trimmed))]
    return out


def ref_weighted_sum(tasks: list[dict[str, list[float]]], lams: list[float]) -> dict[str, list[float]]:
    return {
        name: [sum(lam * t[name][i] for lam, t in zip(lams, tasks)) for i in range(len(tasks[0][name]))]
        for name in tasks[0]
    }


def ref_dare_dropped(tv: TaskVectors, p: float, seed: int, rescale: bool) -> list[dict[str, list[float]]]:
    """The documented draw order: one CPU generator, one [K, *shape] uniform draw per tensor."""
    generator = torch.Generator().manual_seed(seed)
    tasks = [{} for _ in range(tv.num_tasks)]
    for name, v in tv.vectors.items():
        draws = torch.rand(v.shape, generator=generator)
        for k in range(tv.num_tasks):
            values, u = v[k].reshape(-1).tolist(), draws[k].reshape(-1).tolist()
            tasks[k][name] = [x / (1 - p) if rescale else x for x in values]
            tasks[k][name] = [x if ui >= p else 0.0 for x, ui in zip(tasks[k][name], u)]
    return tasks


def assert_close(deltas: dict[str, torch.Tensor], expected: dict[str, list[float]]) -> None:
    assert set(deltas) == set(expected)
    for name, values in expected.items():
        got = deltas[name].reshape(-1).tolist()
        assert len(got) == len(values)
        for g, e in zip(got, values):
            assert abs(g - e) <= 1e-6, (name, g, e)


# ----------------------------------------------------------------------------------------- fixtures


def make_task_vectors(
    num_tasks: int, seed: int = 0, tasks: list[dict[str, torch.Tensor]] | None = None
) -> TaskVectors:
    generator = torch.Generator().manual_seed(seed)
    pretrained = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    if tasks is None:
        tasks = [
            {n: torch.randn(s, generator=generator) for n, s in SHAPES.items()} for _ in range(num_tasks)
        ]
    vectors = {name: torch.stack([t[name] for t in tasks]) for name in SHAPES}
    return TaskVectors([f"t{k}" for k in range(len(tasks))], pretrained, vectors)


def tv_from_rows(*rows: list[float]) -> TaskVectors:
    """Task vectors with a single 1-D tensor ``w``, one row per task."""
    x = torch.tensor(rows, dtype=torch.float32)
    return TaskVectors([f"t{k}" for k in range(len(rows))], {"w": torch.zeros(x.shape[1])}, {"w": x})


class TiedNet(nn.Module):
    """Embedding and output layer sharing one Parameter, BatchNorm and an int buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("position_ids", torch.arange(5))


def finetune(model: TiedNet, seed: int) -> TiedNet:
    """A perturbed copy: parameters and BN statistics change, ties kept, int buffer shifted."""
    generator = torch.Generator().manual_seed(seed)
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        for p in tuned.parameters():  # a tied Parameter is yielded once
            p.add_(torch.randn(p.shape, generator=generator))
        tuned.bn.running_mean.add_(1.0)
        tuned.bn.running_var.mul_(3.0)
        tuned.bn.num_batches_tracked.fill_(7)
        tuned.position_ids.add_(100)
    return tuned


# ------------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.35, 1.0, 0.01])
def test_topk_mask_matches_reference_per_tensor(fraction):
    tv = make_task_vectors(3)
    masks = steps.topk_masks(tv.vectors, fraction, scope="tensor")
    for k, task in enumerate(as_lists(tv)):
        for name, values in task.items():
            assert masks[name][k].reshape(-1).tolist() == ref_topk_keep(values, fraction)


@pytest.mark.parametrize("fraction", [0.2, 0.07, 1.0, 0.001])
def test_topk_masks_model_scope_ranks_the_whole_model(fraction):
    tv = make_task_vectors(4, seed=1)
    masks = steps.topk_masks(tv.vectors, fraction, scope="model")
    for k, task in enumerate(as_lists(tv)):
        values, where = flatten_model(task)
        expected = unflatten(ref_topk_keep(values, fraction), where, task)
        for name in task:
            assert masks[name][k].reshape(-1).tolist() == expected[name]
    if fraction == 0.001:  # ceil(0.001 · 47) = 1: one entry per task survives
        assert all(sum(int(m[k].sum()) for m in masks.values()) == 1 for k in range(4))


def test_topk_counts_are_free_of_float_noise():
    assert 0.07 * 100 > 7 and 0.29 * 100 < 29  # what a plain ceil/floor would get wrong
    assert steps.count_to_keep(0.07, 100) == 7
    assert steps.count_to_drop(0.29, 100) == 29
    assert int(steps.topk_mask(torch.randn(1, 100), 0.07).sum()) == 7


def test_topk_keeps_every_tie_at_the_threshold():
    x = torch.tensor([[3.0, -2.0, 2.0, 2.0, 1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = steps.topk_mask(x, 0.4)  # n = 2: the 2nd largest |x| is 2, tied three times
    assert mask[0].tolist() == [True, True, True, True, False]
    assert mask[1].all()  # an all-zero task keeps its (zero) entries; they change nothing


def test_elect_sign_and_zero_sum_fallback():
    x = torch.tensor([[1.0, -3.0, 2.0, 0.0, -1.0], [2.0, 1.0, -2.0, 0.0, -1.0]])
    # sums 3, -2, 0, 0, -2: elected signs +, -, -, -; the majority (2 negative, 1 positive) is −1
    assert steps.elect_sign(x).tolist() == [1.0, -1.0, -1.0, -1.0, -1.0]
    assert steps.elect_sign(x, fallback=1.0).tolist() == [1.0, -1.0, 1.0, 1.0, -1.0]
    balanced = torch.tensor([[1.0, -1.0, 0.0]])
    assert steps.elect_sign(balanced).tolist() == [1.0, -1.0, 1.0]
    assert steps.elect_sign(torch.zeros(2, 3)).tolist() == [1.0, 1.0, 1.0]
    tv = make_task_vectors(3)
    for name, v in tv.vectors.items():
        tasks = [v[k].reshape(-1).tolist() for k in range(3)]
        assert steps.elect_sign(v).reshape(-1).tolist() == ref_elect(tasks)


def test_model_scope_fallback_is_the_model_majority():
    vectors = {
        "tie": torch.tensor([[1.0, -2.0], [-1.0, 2.0]]),  # both entries sum to 0
        "pos": torch.tensor([[1.0], [1.0]]),
        "neg": torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
    }
    # over the model 3 entries elect −1 and 1 elects +1; within "tie" alone nothing is elected
    assert steps.elect_signs(vectors, "model")["tie"].tolist() == [-1.0, -1.0]
    assert steps.elect_signs(vectors, "tensor")["tie"].tolist() == [1.0, 1.0]
    assert steps.elect_signs(vectors, "model")["pos"].tolist() == [1.0]


def test_disjoint_mean_divides_by_the_agreeing_count():
    x = torch.tensor([[2.0, 0.0, -1.0, 5.0], [4.0, 0.0, 3.0, 0.0], [-6.0, 0.0, 0.0, 0.0]])
    elected = torch.tensor([1.0, 1.0, 1.0, 1.0])
    assert steps.disjoint_mean(x, elected).tolist() == [3.0, 0.0, 3.0, 5.0]
    tv = make_task_vectors(4, seed=2)
    for name, v in tv.vectors.items():
        tasks = [v[k].reshape(-1).tolist() for k in range(4)]
        assert_close(
            {name: steps.disjoint_mean(v, steps.elect_sign(v))},
            {name: ref_disjoint_mean(tasks, ref_elect(tasks))},
        )


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_ties_trim_matches_reference(scope):
    tv = make_task_vectors(3, seed=3)
    trimmed = steps.ties_trim(tv.vectors, 0.3, scope)
    expected = ref_ties_trim(as_lists(tv), 0.3, scope)
    for k in range(3):
        assert_close({n: t[k] for n, t in trimmed.items()}, expected[k])


def test_dare_mask_is_seeded_and_keeps_expectation():
    x = torch.ones(1, 200_000)
    first = steps.dare_drop(x, 0.9, torch.Generator().manual_seed(5))
    again = steps.dare_drop(x, 0.9, torch.Generator().manual_seed(5))
    other = steps.dare_drop(x, 0.9, torch.Generator().manual_seed(6))
    assert torch.equal(first, again) and not torch.equal(first, other)
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.1) < 0.005
    assert torch.allclose(first[kept], torch.tensor(10.0))
    assert abs(first.mean().item() - 1.0) < 0.03  # E[rescaled] = original; std of the mean ≈ 0.0067
    assert steps.dare_mask(x, 0.0, torch.Generator().manual_seed(0)).all()
    unscaled = steps.dare_drop(x, 0.9, torch.Generator().manual_seed(5), rescale=False)
    assert torch.equal(unscaled * 10, first)


def test_breadcrumbs_mask_keeps_the_band():
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0, 6.0, -7.0, 8.0, 9.0, -10.0]])
    # drop the top 10% (|10|) and the bottom 50% (1..5): the band 6..9 stays
    assert steps.breadcrumbs_mask(x, 0.1, 0.5)[0].tolist() == [False] * 5 + [True] * 4 + [False]
    ties = torch.tensor([[1.0, 2.0, 2.0, 3.0, 4.0, 4.0]])
    # floor(0.2·6)=1 from each end; the tie of the dropped top 4 and of the dropped bottom 1 follow it
    assert steps.breadcrumbs_mask(ties, 0.2, 0.2)[0].tolist() == [False, True, True, True, False, False]
    tv = make_task_vectors(3, seed=4)
    for beta, gamma in [(0.01, 0.9), (0.1, 0.5), (0.0, 0.3), (0.2, 0.0)]:
        for name, v in tv.vectors.items():
            mask = steps.breadcrumbs_mask(v, beta, gamma)
            for k in range(3):
                assert mask[k].reshape(-1).tolist() == ref_breadcrumbs_keep(
                    v[k].reshape(-1).tolist(), beta, gamma
                )


def test_steps_reject_out_of_range_fractions():
    x = torch.randn(2, 5)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            steps.topk_mask(x, bad)
    with pytest.raises(ValueError, match="drop_rate"):
        steps.dare_mask(x, 1.0, torch.Generator())
    with pytest.raises(ValueError, match="top_beta"):
        steps.breadcrumbs_mask(x, 0.5, 0.5)
    with pytest.raises(ValueError, match="scope"):
        steps.topk_masks({"x": x}, 0.5, scope="layer")


# ----------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("num_tasks", [1, 2, 4])
def test_weight_average_and_task_arithmetic_match_reference(num_tasks):
    tv = make_task_vectors(num_tasks, seed=num_tasks)
    tasks = as_lists(tv)
    assert_close(
        merge_task_vectors("weight_average", tv), ref_weighted_sum(tasks, [1 / num_tasks] * num_tasks)
    )
    assert_close(merge_task_vectors("task_arithmetic", tv), ref_weighted_sum(tasks, [0.3] * num_tasks))
    lams = [0.1 * (k + 1) for k in range(num_tasks)]
    assert_close(
        merge_task_vectors("task_arithmetic", tv, scaling_coefficient=lams), ref_weighted_sum(tasks, lams)
    )


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 4])
@pytest.mark.parametrize("scope", ["model", "tensor"])
@pytest.mark.parametrize("top_k", [0.2, 0.5, 1.0, 0.001])
def test_ties_matches_reference(num_tasks, scope, top_k):
    tv = make_task_vectors(num_tasks, seed=10 + num_tasks)
    deltas = merge_task_vectors("ties", tv, top_k=top_k, scaling_coefficient=0.7, scope=scope)
    assert_close(deltas, ref_ties(as_lists(tv), top_k, 0.7, scope))


def test_ties_single_task_is_the_scaled_trimmed_vector():
    tv = make_task_vectors(1)
    assert_close(merge_task_vectors("ties", tv, top_k=1.0), ref_weighted_sum(as_lists(tv), [0.3]))


def test_an_all_zero_task_vector_changes_nothing_in_ties():
    base = make_task_vectors(2, seed=7)
    tasks = [{n: base.vectors[n][k] for n in SHAPES} for k in range(2)] + [
        {n: torch.zeros(s) for n, s in SHAPES.items()}
    ]
    with_zero = make_task_vectors(3, tasks=tasks)
    for scope in ("model", "tensor"):
        got = merge_task_vectors("ties", with_zero, scope=scope)
        assert_close(got, ref_ties(as_lists(with_zero), 0.2, 0.3, scope))
        assert_close(got, ref_ties(as_lists(base), 0.2, 0.3, scope))  # disjoint mean ignores the zero task


def test_opposite_task_vectors():
    tv = tv_from_rows([0.5, -2.0, 1.0, 0.0], [-0.5, 2.0, -1.0, 0.0])
    assert merge_task_vectors("task_arithmetic", tv)["w"].abs().max() == 0
    assert merge_task_vectors("weight_average", tv)["w"].abs().max() == 0
    # every sum is 0 and no elected sign exists, so the +1 fallback elects the positive entries
    assert_close(
        merge_task_vectors("ties", tv, top_k=1.0, scaling_coefficient=1.0), {"w": [0.5, 2.0, 1.0, 0.0]}
    )
    trimmed = steps.ties_trim(tv.vectors, 1.0)["w"]
    assert trimmed.tolist() == [[0.5, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]]


@pytest.mark.parametrize("rescale", [True, False])
def test_dare_task_arithmetic_matches_reference(rescale):
    tv = make_task_vectors(3, seed=20)
    deltas = merge_task_vectors("dare", tv, drop_rate=0.4, seed=3, rescale=rescale)
    assert_close(deltas, ref_weighted_sum(ref_dare_dropped(tv, 0.4, 3, rescale), [0.3] * 3))


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_dare_ties_matches_reference(scope):
    tv = make_task_vectors(3, seed=21)
    deltas = merge_task_vectors("dare", tv, drop_rate=0.3, seed=1, combine="ties", top_k=0.5, scope=scope)
    assert_close(deltas, ref_ties(ref_dare_dropped(tv, 0.3, 1, True), 0.5, 0.3, scope))


def test_dare_is_reproducible_and_p0_is_task_arithmetic():
    tv = make_task_vectors(2, seed=22)
    first, again = (merge_task_vectors("dare", tv, seed=9) for _ in range(2))
    other = merge_task_vectors("dare", tv, seed=10)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)
    no_drop = merge_task_vectors("dare", tv, drop_rate=0.0, scaling_coefficient=[0.2, 0.5])
    ta = merge_task_vectors("task_arithmetic", tv, scaling_coefficient=[0.2, 0.5])
    assert all(torch.equal(no_drop[n], ta[n]) for n in ta)


def test_breadcrumbs_matches_reference():
    tv = make_task_vectors(3, seed=30)
    for beta, gamma in [(0.01, 0.9), (0.1, 0.6)]:
        deltas = merge_task_vectors(
            "breadcrumbs", tv, top_beta=beta, bottom_gamma=gamma, scaling_coefficient=0.5
        )
        masked = [
            {
                n: [v if keep else 0.0 for v, keep in zip(vals, ref_breadcrumbs_keep(vals, beta, gamma))]
                for n, vals in t.items()
            }
            for t in as_lists(tv)
        ]
        assert_close(deltas, ref_weighted_sum(masked, [0.5] * 3))


def test_bfloat16_storage_gives_a_close_merge():
    torch.manual_seed(0)
    pretrained = {"w": torch.randn(8, 8)}
    finetuned = [{"w": pretrained["w"] + torch.randn(8, 8)} for _ in range(2)]
    full = merge("task_arithmetic", pretrained, finetuned)
    half = merge("task_arithmetic", pretrained, finetuned, storage_dtype="bfloat16")
    assert half["w"].dtype == torch.float32 and torch.allclose(full["w"], half["w"], atol=0.05)


# -------------------------------------------------------------------------------------- entry point


def test_weight_average_is_the_mean_of_the_checkpoints(tmp_path):
    torch.manual_seed(1)
    pretrained = {"w": torch.randn(4, 3), "b": torch.randn(3), "step": torch.tensor(3)}
    finetuned = [{"w": torch.randn(4, 3), "b": torch.randn(3), "step": torch.tensor(k)} for k in range(3)]
    paths = []
    for k, state in enumerate(finetuned):
        paths.append(tmp_path / f"ft{k}.pt")
        torch.save(state, paths[-1])
    merged = merge("weight_average", pretrained, paths)
    for name in ("w", "b"):
        mean = sum(state[name] for state in finetuned) / 3
        assert torch.allclose(merged[name], mean, atol=1e-6)
    assert merged["step"].item() == 3  # non-float entries come from θ0


def test_merge_on_a_module_with_buffers_batchnorm_and_tied_weights():
    torch.manual_seed(2)
    model = TiedNet()
    tuned = {"a": finetune(model, 1), "b": finetune(model, 2)}
    merged = merge("task_arithmetic", model, tuned, scaling_coefficient=0.5)
    pre = model.state_dict()
    assert set(merged) == set(pre)
    for name in ("position_ids", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(merged[name], pre[name]), name
    tau = sum(t.embed.weight.detach() - model.embed.weight.detach() for t in tuned.values())
    expected = model.embed.weight.detach() + 0.5 * tau  # merged once, not twice through the alias
    assert torch.allclose(merged["embed.weight"], expected, atol=1e-6)
    assert torch.equal(merged["head.weight"], merged["embed.weight"])
    fresh = TiedNet()
    fresh.load_state_dict(merged)
    assert fresh.head.weight is fresh.embed.weight and torch.equal(fresh.head.weight, merged["embed.weight"])

    with_stats = merge(
        "task_arithmetic", model, tuned, scaling_coefficient=0.5, merge_batchnorm_statistics=True
    )
    assert torch.allclose(with_stats["bn.running_mean"], pre["bn.running_mean"] + 0.5 * 2 * 1.0)
    assert torch.equal(with_stats["bn.num_batches_tracked"], pre["bn.num_batches_tracked"])


@pytest.mark.parametrize("method", STATIC)
def test_every_static_method_runs_through_merge_with_defaults(method):
    model = TiedNet()
    merged = merge(method, model, [finetune(model, 1), finetune(model, 2)])
    assert set(merged) == set(model.state_dict())
    assert all(torch.isfinite(t.float()).all() for t in merged.values())


# -------------------------------------------------------------------------- registry, config, errors


def test_registry_lists_and_finds_methods():
    assert set(STATIC) <= set(available_methods("static"))
    spec = get_method("ties")
    assert spec.kind == "static" and dict(spec.defaults) == {
        "top_k": 0.2,
        "scaling_coefficient": 0.3,
        "scope": "model",
    }
    assert get_method("dare").defaults["drop_rate"] == 0.5
    with pytest.raises(ValueError, match="unknown merge method 'tie'.*task_arithmetic"):
        get_method("tie")
    with pytest.raises(ValueError, match="already registered"):
        register_method("ties")(lambda tv: {})


def test_learned_methods_register_without_a_function(monkeypatch):
    from adamerge.methods import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the test's method leaves with it
    name = f"learned_{uuid.uuid4().hex[:8]}"
    marker = object()
    assert register_method(name, kind="learned", defaults={"lr": 1e-3})(marker) is marker
    spec = get_method(name)
    assert spec.kind == "learned" and spec.fn is None and spec.defaults["lr"] == 1e-3
    assert name in available_methods("learned") and name not in available_methods("static")
    with pytest.raises(ValueError, match="needs data and the adamerge trainer"):
        merge(name, {"w": torch.zeros(2)}, [{"w": torch.ones(2)}])


@pytest.mark.parametrize("method", STATIC)
def test_conf_method_mirrors_the_registry(method):
    conf = OmegaConf.to_container(OmegaConf.load(CONF_METHOD / f"{method}.yaml"))
    assert conf.pop("name") == method
    assert conf == dict(get_method(method).defaults)


@pytest.mark.parametrize(
    ("method", "hparams", "message"),
    [
        ("ties", {"top_k": 0.0}, r"'ties'.*top_k=0.0"),
        ("ties", {"top_k": 20}, r"'ties'.*top_k=20.*fraction"),
        ("ties", {"top_k": 1.5}, r"top_k=1.5"),
        ("ties", {"scope": "layer"}, r"scope='layer'"),
        ("ties", {"scaling_coefficient": [0.3, 0.3]}, r"'ties'.*scaling_coefficient"),
        ("dare", {"drop_rate": 1.0}, r"'dare'.*drop_rate=1.0"),
        ("dare", {"drop_rate": -0.1}, r"drop_rate=-0.1"),
        ("dare", {"combine": "mean"}, r"combine='mean'"),
        ("dare", {"seed": 1.5}, r"seed=1.5"),
        ("breadcrumbs", {"top_beta": 0.2, "bottom_gamma": 0.8}, r"'breadcrumbs'.*top_beta \+ bottom_gamma"),
        ("breadcrumbs", {"bottom_gamma": 1.0}, r"bottom_gamma=1.0"),
        (
            "task_arithmetic",
            {"scaling_coefficient": [0.1, 0.2, 0.3]},
            r"'task_arithmetic'.*one value per task: 2 values, got 3",
        ),
        ("task_arithmetic", {"scaling_coefficient": "0.3"}, r"scaling_coefficient='0.3'"),
    ],
)
def test_bad_hyperparameters_are_named(method, hparams, message):
    pretrained, finetuned = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}, {"w": -torch.ones(3)}]
    with pytest.raises(ValueError, match=message):
        merge(method, pretrained, finetuned, **hparams)
    with pytest.raises(ValueError, match=message):  # direct calls validate too
        get_method(method).fn(make_task_vectors(2), **hparams)


def test_unknown_hyperparameters_and_bad_inputs():
    pretrained, finetuned = {"w": torch.zeros(3)}, [{"w": torch.ones(3)}]
    with pytest.raises(TypeError, match=r"'ties'.*topk.*allowed: scaling_coefficient, scope, top_k"):
        merge("ties", pretrained, finetuned, topk=0.2)
    with pytest.raises(TypeError, match=r"'weight_average'.*allowed: none"):
        merge_task_vectors("weight_average", make_task_vectors(1), scaling_coefficient=0.3)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge("average", pretrained, finetuned)
    with pytest.raises(ValueError, match="single state dict"):
        merge("ties", pretrained, finetuned[0])
    with pytest.raises(ValueError, match="list of checkpoints"):
        merge("ties", pretrained, "ft.pt")
