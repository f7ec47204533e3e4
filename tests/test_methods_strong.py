"""PCB, TSV-M, Iso-C, Iso-CTS and WUDI against naive references written here (per entry / per layer loops,
float64, following the authors' code structure), plus edge cases, properties, the registry and validators."""

from __future__ import annotations

import math
import weakref
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from adamerge import TaskVectors, merge
from adamerge.methods import get_method
from adamerge.methods.data_free import merge_task_vectors, spectral
from adamerge.methods.data_free.isotropic import subspace_sizes
from adamerge.methods.data_free.tsv import components_per_task
from adamerge.methods.data_free.wudi import wudi_objective

CONF_METHOD = Path(__file__).resolve().parents[1] / "conf" / "method"
STRONG = ["pcb", "tsv_merge", "iso_c", "iso_cts", "wudi"]
SPECTRAL = ["tsv_merge", "iso_c", "iso_cts"]
# A tall and a wide matrix, a 1-D bias, a 4-D conv kernel and a 0-d scalar.
SHAPES = {"tall.weight": (9, 6), "wide.weight": (4, 10), "bias": (5,), "conv.weight": (2, 3, 2, 2), "scale": ()}


def make_tv(num_tasks: int, seed: int = 0, shapes=SHAPES, zero_task: int | None = None) -> TaskVectors:
    generator = torch.Generator().manual_seed(seed)
    vectors = {name: torch.randn((num_tasks, *shape), generator=generator) for name, shape in shapes.items()}
    if zero_task is not None:
        for x in vectors.values():
            x[zero_task] = 0.0
    pretrained = {name: torch.zeros(shape) for name, shape in shapes.items()}
    return TaskVectors([f"t{k}" for k in range(num_tasks)], pretrained, vectors)


def rank_one_tv(num_tasks: int, shapes: dict[str, tuple[int, int]], seed: int = 0) -> TaskVectors:
    generator = torch.Generator().manual_seed(seed)
    vectors = {
        name: torch.stack([torch.outer(torch.randn(m, generator=generator), torch.randn(n, generator=generator))
                           for _ in range(num_tasks)])
        for name, (m, n) in shapes.items()
    }
    return TaskVectors([f"t{k}" for k in range(num_tasks)], {n: torch.zeros(s) for n, s in shapes.items()}, vectors)


def layers(tv: TaskVectors, name: str) -> list[torch.Tensor]:
    """The K task matrices of one tensor, float64."""
    return [tv.vectors[name][k].double() for k in range(tv.num_tasks)]


def assert_matches(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    """Equal to ``tol`` absolute for values up to 1, relative to the largest magnitude beyond."""
    expected = torch.as_tensor(expected, dtype=torch.float64).reshape(got.shape)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    error = float((got.double() - expected).abs().max()) if expected.numel() else 0.0
    assert error <= tol * scale, f"max error {error:.3g} > {tol * scale:.3g}"


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.double())


# ------------------------------------------------------------------------------ naive references


def sign(v: float) -> float:
    return float((v > 0) - (v < 0))


def ref_pcb(tv: TaskVectors, ratio: float, clamp: float, inter: str, lams: list[float], scope: str) -> dict:
    """PCB entry by entry (duguodong7/pcb-merging: clamp, intra, inter, keep-top-ratio, weighted mean)."""
    K = tv.num_tasks
    names = list(tv.vectors)
    groups = [names] if scope == "model" else [[n] for n in names]
    out = {}
    for group in groups:
        tasks = [[v for n in group for v in tv.vectors[n][k].reshape(-1).tolist()] for k in range(K)]
        D = len(tasks[0])
        lo_at = math.floor(Fraction(str(clamp)) * D)
        hi_at = max(D - math.ceil(Fraction(str(clamp)) * D) - 1, lo_at)
        a, s, betas = [], [], []
        for values in tasks:
            mags = sorted(abs(v) for v in values)
            lo, hi = mags[lo_at], mags[hi_at]
            clamped = [min(max(abs(v), lo), hi) for v in values]
            normed = [(c - lo) / (hi - lo) if hi > lo else 0.0 for c in clamped]
            a.append(clamped)
            s.append([sign(v) * n for v, n in zip(values, normed)])
        for k in range(K):
            beta = []
            for i in range(D):
                intra = math.exp(K * (abs(s[k][i])) ** 2)
                if inter == "raw_sum":
                    cross = math.tanh(tasks[k][i] * sum(t[i] for t in tasks))
                elif inter == "normalized_sum":
                    cross = math.tanh(tasks[k][i] * sum(sj[i] for sj in s))
                else:
                    cross = sum(math.tanh(s[k][i] * sj[i]) for sj in s)
                beta.append(intra * cross)
            betas.append(beta)
        weights = []
        for beta in betas:
            q = sorted(beta)[D - math.ceil(Fraction(str(ratio)) * D)]
            top = max(beta)
            weights.append([(max(b, q) - q) / (top - q) if top > q else 0.0 for b in beta])
        merged = []
        for i in range(D):
            numerator = sum(lams[k] * weights[k][i] * sign(tasks[k][i]) * a[k][i] for k in range(K))
            merged.append(numerator / max(sum(weights[k][i] for k in range(K)), 1e-12))
        offset = 0
        for n in group:
            size = tv.vectors[n][0].numel()
            out[n] = torch.tensor(merged[offset:offset + size], dtype=torch.float64)
            offset += size
    return out


def polar(a: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return u @ vh


def ref_tsv_layer(mats: list[torch.Tensor], fraction: float | None = None) -> torch.Tensor:
    """The authors' compute_and_sum_svd_mem_reduction: zero-padded buffers filled block by block."""
    K, (m, n) = len(mats), mats[0].shape
    r = min(m, n)
    keep = int(r * Fraction(1, K)) if fraction is None else math.floor(Fraction(str(fraction)) * r)
    width = max(r, K * keep)
    sum_u, sum_s, sum_v = torch.zeros(m, width, dtype=torch.float64), torch.zeros(width, dtype=torch.float64), \
        torch.zeros(width, n, dtype=torch.float64)
    for i, w in enumerate(mats):
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        for j in range(keep):
            sum_u[:, i * keep + j] = u[:, j]
            sum_s[i * keep + j] = s[j]
            sum_v[i * keep + j, :] = vh[j, :]
    return polar(sum_u) @ torch.diag(sum_s) @ polar(sum_v)


def ref_iso_c_layer(mats: list[torch.Tensor]) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
    return u @ torch.diag(torch.ones_like(s) * s.mean()) @ vh


def ref_iso_cts_layer(mats: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """The authors' iso_cts with their float arithmetic for the subspace sizes."""
    K, (m, n) = len(mats), mats[0].shape
    r = min(m, n)
    common = int(r * fraction)
    common = r - round((r - common) / K) * K
    per_task = int((r - common) / K)
    u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common, :]
    cu, cs, cv = torch.zeros(m, r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64), \
        torch.zeros(r, n, dtype=torch.float64)
    for i, w in enumerate(mats):
        ut, st, vt = torch.linalg.svd(w - uc @ uc.T @ w, full_matrices=False)
        for j in range(per_task):
            cu[:, i * per_task + j], cs[i * per_task + j], cv[i * per_task + j, :] = ut[:, j], st[j], vt[j, :]
    for j in range(common):
        cu[:, K * per_task + j], cs[K * per_task + j], cv[K * per_task + j, :] = uc[:, j], sc[j], vc[j, :]
    return polar(cu) @ torch.diag(torch.ones_like(cs) * cs.mean()) @ polar(cv)


def ref_wudi_layer(x: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The authors' get_redundant_task_vector: autograd on the loss, one term per (non-zero) task, Adam."""
    merged = torch.nn.Parameter(x.sum(dim=0).clone())
    optimizer = torch.optim.Adam([merged], lr=lr, weight_decay=0)
    for _ in range(steps):
        loss = 0.0
        for task in x:
            norm = float((task**2).sum())
            if norm > 0:
                loss = loss + ((merged - task) @ task.T).square().sum() / norm
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


# ------------------------------------------------------------------------------------------- PCB


@pytest.mark.parametrize("num_tasks", [1, 3])
@pytest.mark.parametrize("inter", ["normalized_sum", "raw_sum", "pairwise"])
@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_pcb_matches_reference(num_tasks, inter, scope):
    tv = make_tv(num_tasks, seed=1)
    deltas = merge_task_vectors("pcb", tv, pcb_ratio=0.3, clamp_ratio=0.05, inter_balancing=inter, scope=scope)
    expected = ref_pcb(tv, 0.3, 0.05, inter, [1.2] * num_tasks, scope)
    for name, delta in deltas.items():
        assert delta.shape == tv.vectors[name].shape[1:] and delta.dtype == torch.float32
        assert_matches(delta, expected[name])


def test_pcb_defaults_per_task_lambdas_and_a_zero_task_match_reference():
    tv = make_tv(4, seed=2, zero_task=1)
    deltas = merge_task_vectors("pcb", tv, scaling_coefficient=[0.5, 1.0, 1.5, 2.0])
    expected = ref_pcb(tv, 0.05, 0.01, "normalized_sum", [0.5, 1.0, 1.5, 2.0], "model")
    for name, delta in deltas.items():
        assert torch.isfinite(delta).all()
        assert_matches(delta, expected[name])


def test_pcb_single_task_keeps_the_clamped_top_entries():
    tv = make_tv(1, seed=3, shapes={"w": (40,)})
    delta = merge_task_vectors("pcb", tv, pcb_ratio=0.25, clamp_ratio=0.0, scaling_coefficient=2.0)["w"]
    kept = delta != 0  # every kept entry is 2·τ; at most ⌈0.25·40⌉ − 1 entries score above the quantile
    assert_matches(delta[kept], 2.0 * tv.vectors["w"][0][kept].double())
    assert 0 < int(kept.sum()) <= 9


def test_pcb_all_zero_task_vectors_merge_to_zero():
    tv = make_tv(2, shapes={"w": (3, 4), "b": (2,)})
    for x in tv.vectors.values():
        x.zero_()
    for scope in ("model", "tensor"):
        assert all(torch.equal(d, torch.zeros_like(d)) for d in merge_task_vectors("pcb", tv, scope=scope).values())


# ------------------------------------------------------------------------------------------- TSV-M


@pytest.mark.parametrize("num_tasks", [1, 2, 3])
@pytest.mark.parametrize("fraction", [None, 0.5])
def test_tsv_merge_matches_reference(num_tasks, fraction):
    tv = make_tv(num_tasks, seed=4)
    deltas = merge_task_vectors("tsv_merge", tv, rank_fraction=fraction, alpha=0.7)
    for name in ("tall.weight", "wide.weight"):
        assert_matches(deltas[name], 0.7 * ref_tsv_layer(layers(tv, name), fraction))
    for name in ("bias", "conv.weight", "scale"):  # not matrices: α · mean_k τ_k
        assert_matches(deltas[name], 0.7 * tv.vectors[name].double().mean(dim=0))


def test_tsv_merge_rank_one_tasks_match_reference():
    tv = rank_one_tv(3, {"tall": (6, 3), "wide": (4, 5)})  # r // K = 1: each task keeps its one direction
    deltas = merge_task_vectors("tsv_merge", tv)
    for name in tv.vectors:
        assert_matches(deltas[name], ref_tsv_layer(layers(tv, name)))


def test_tsv_merge_single_task_is_lossless_even_at_rank_one():
    tv = rank_one_tv(1, {"tall": (7, 3), "wide": (2, 6)})
    for name, delta in merge_task_vectors("tsv_merge", tv).items():
        assert_matches(delta, tv.vectors[name][0])
    tv = make_tv(1, seed=5)
    for name, delta in merge_task_vectors("tsv_merge", tv, alpha=2.0).items():
        assert_matches(delta, 2.0 * tv.vectors[name][0])


def test_tsv_merge_factors_are_orthonormal():
    """U⊥ diag(Ŝ) V⊥ᵀ with orthonormal U⊥, V⊥: its singular values are exactly the kept ones (the paper's claim)."""
    tv = make_tv(3, seed=6, shapes={"w": (12, 9)})
    x = tv.vectors["w"]
    kept = torch.cat([torch.linalg.svdvals(x[k].double())[:3] for k in range(3)])
    assert_matches(singular_values(merge_task_vectors("tsv_merge", tv)["w"]), kept.sort(descending=True).values)
    for shape in [(12, 6), (5, 11)]:
        p = spectral.polar_factor(torch.randn(shape))
        gram = p.T @ p if shape[0] >= shape[1] else p @ p.T
        assert_matches(gram, torch.eye(min(shape)))


def test_tsv_merge_layers_with_fewer_directions_than_tasks_get_zero():
    tv = make_tv(4, seed=7, shapes={"w": (3, 8), "b": (3,)})  # rank 3 < K = 4: ⌊3/4⌋ = 0 kept
    deltas = merge_task_vectors("tsv_merge", tv)
    assert torch.equal(deltas["w"], torch.zeros(3, 8))
    assert_matches(deltas["b"], tv.vectors["b"].double().mean(dim=0))


def test_components_per_task_are_exact():
    assert int(49 * (1 / 49)) == 0  # what the authors' int(r * (1 / K)) gets for r = K = 49
    assert components_per_task(49, 49, None) == 1
    assert components_per_task(768, 8, None) == 96 and components_per_task(100, 3, 0.29) == 29


# --------------------------------------------------------------------------------------- Iso-C / Iso-CTS


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_iso_c_matches_reference(num_tasks):
    tv = make_tv(num_tasks, seed=8)
    deltas = merge_task_vectors("iso_c", tv, alpha=1.3)
    for name in ("tall.weight", "wide.weight"):
        assert_matches(deltas[name], 1.3 * ref_iso_c_layer(layers(tv, name)))
    for name in ("bias", "conv.weight", "scale"):
        assert_matches(deltas[name], 1.3 * tv.vectors[name].double().mean(dim=0))


def test_iso_c_spectrum_is_flat_at_the_mean_of_the_sum():
    """The paper's property, rank-deficient sums included (rank-one tasks: the sum has rank ≤ 2)."""
    for tv in (make_tv(3, seed=9), rank_one_tv(2, {"tall.weight": (8, 5), "wide.weight": (3, 7)})):
        deltas = merge_task_vectors("iso_c", tv, alpha=1.5)
        for name in ("tall.weight", "wide.weight"):
            expected = 1.5 * torch.linalg.svdvals(tv.vectors[name].double().sum(dim=0)).mean()
            assert torch.isfinite(deltas[name]).all()
            assert_matches(singular_values(deltas[name]), expected.expand(min(tv.vectors[name].shape[1:])))


def test_iso_c_ignores_an_all_zero_task():
    tv = make_tv(3, seed=10, zero_task=2)
    without = tv.select(["t0", "t1"])
    with_zero, reduced = merge_task_vectors("iso_c", tv), merge_task_vectors("iso_c", without)
    assert_matches(with_zero["tall.weight"], reduced["tall.weight"])
    assert_matches(with_zero["bias"], reduced["bias"] * 2 / 3)  # the mean counts the zero task


@pytest.mark.parametrize("num_tasks", [1, 2, 3])
@pytest.mark.parametrize("fraction", [0.8, 0.5, 1.0])
def test_iso_cts_matches_reference(num_tasks, fraction):
    tv = make_tv(num_tasks, seed=11, shapes={**SHAPES, "big.weight": (16, 12)})
    deltas = merge_task_vectors("iso_cts", tv, common_space_fraction=fraction, alpha=1.5)
    for name in ("tall.weight", "wide.weight", "big.weight"):
        assert_matches(deltas[name], 1.5 * ref_iso_cts_layer(layers(tv, name), fraction))
    for name in ("bias", "conv.weight", "scale"):
        assert_matches(deltas[name], 1.5 * tv.vectors[name].double().mean(dim=0))


def test_iso_cts_with_one_task_is_iso_c():
    tv = make_tv(1, seed=12)
    cts, c = merge_task_vectors("iso_cts", tv, alpha=1.0), merge_task_vectors("iso_c", tv, alpha=1.0)
    for name in tv.vectors:
        assert_matches(cts[name], c[name])


def test_iso_cts_spectrum_is_flat_with_rank_one_and_zero_tasks():
    for tv in (rank_one_tv(3, {"tall.weight": (12, 8), "wide.weight": (6, 9)}), make_tv(3, seed=13, zero_task=0)):
        deltas = merge_task_vectors("iso_cts", tv)
        again = merge_task_vectors("iso_cts", tv)
        for name in ("tall.weight", "wide.weight"):
            assert torch.isfinite(deltas[name]).all() and torch.equal(deltas[name], again[name])
            values = singular_values(deltas[name])
            assert_matches(values, values.mean().expand_as(values))


def test_subspace_sizes_follow_the_authors_arithmetic():
    for rank in range(1, 41):
        for tasks in range(1, 9):
            for fraction in (0.8, 0.5, 0.25, 1.0):
                common = int(rank * fraction)
                common = rank - round((rank - common) / tasks) * tasks
                if common >= 0:
                    assert subspace_sizes(rank, tasks, fraction) == (common, (rank - common) // tasks)
    common, per_task = subspace_sizes(12, 8, 0.0)  # the authors' sizes would be (-4, 2)
    assert (common, per_task) == (4, 1)


# -------------------------------------------------------------------------------------------- WUDI


@pytest.mark.parametrize("num_tasks", [1, 3])
def test_wudi_matches_reference(num_tasks):
    tv = make_tv(num_tasks, seed=14)
    deltas = merge_task_vectors("wudi", tv, steps=40, lr=1e-3)
    for name in ("tall.weight", "wide.weight"):
        assert_matches(deltas[name], ref_wudi_layer(tv.vectors[name], 40, 1e-3))
    for name in ("bias", "conv.weight", "scale"):  # authors' ViT script: pretrained kept
        assert torch.equal(deltas[name], torch.zeros(tv.vectors[name].shape[1:]))
    mean = merge_task_vectors("wudi", tv, steps=0, non_matrix="mean")
    for name in ("bias", "conv.weight", "scale"):  # FusionBench: mean_k τ_k
        assert_matches(mean[name], tv.vectors[name].double().mean(dim=0))
    for name in ("tall.weight", "wide.weight"):  # no step: the initial Σ_k τ_k
        assert_matches(mean[name], tv.vectors[name].double().sum(dim=0))


def test_wudi_rank_one_tasks_match_reference():
    tv = rank_one_tv(3, {"tall": (7, 4), "wide": (3, 8)}, seed=15)
    deltas = merge_task_vectors("wudi", tv, steps=25, lr=1e-2)
    for name in tv.vectors:
        assert_matches(deltas[name], ref_wudi_layer(tv.vectors[name], 25, 1e-2))


def test_wudi_objective_decreases_from_its_initial_value():
    tv = make_tv(4, seed=16, shapes={"w": (10, 6), "v": (5, 12)})
    for hparams in ({}, {"lr": 1e-3, "steps": 100}):  # the defaults (300 steps of 1e-5) and a faster setting
        deltas = merge_task_vectors("wudi", tv, **hparams)
        for name, x in tv.vectors.items():
            assert wudi_objective(deltas[name], x) < wudi_objective(x.sum(dim=0), x)


def test_wudi_an_all_zero_task_changes_nothing():
    tv = make_tv(3, seed=17, zero_task=1, shapes={"w": (6, 5), "b": (4,)})
    with_zero = merge_task_vectors("wudi", tv, steps=30, lr=1e-3, non_matrix="mean")
    without = merge_task_vectors("wudi", tv.select(["t0", "t2"]), steps=30, lr=1e-3, non_matrix="mean")
    assert torch.isfinite(with_zero["w"]).all()
    assert_matches(with_zero["w"], without["w"])
    everything_zero = make_tv(2, shapes={"w": (3, 3)}, zero_task=0)
    everything_zero.vectors["w"].zero_()
    assert torch.equal(merge_task_vectors("wudi", everything_zero, lr=1e-2)["w"], torch.zeros(3, 3))


def test_wudi_runs_on_an_explicit_device_and_returns_home():
    tv = make_tv(2, seed=18, shapes={"w": (4, 3)})
    here = merge_task_vectors("wudi", tv, steps=5, lr=1e-3)
    there = merge_task_vectors("wudi", tv, steps=5, lr=1e-3, device="cpu")
    assert there["w"].device == tv.vectors["w"].device and torch.equal(here["w"], there["w"])


# ------------------------------------------------------------------------------ shared, registry, config


@pytest.mark.parametrize("method", SPECTRAL)
def test_spectral_methods_hold_one_layer_of_decompositions_at_a_time(monkeypatch, method):
    """The memory rule: when the next layer starts, no factor of the previous one is alive."""
    alive: list[weakref.ref] = []

    def tracked(fn):
        def wrapper(*args, **kwargs):
            out = fn(*args, **kwargs)
            alive.extend(weakref.ref(t) for t in (out if isinstance(out, tuple) else (out,)))
            return out
        return wrapper

    for name in ("svd", "top_components", "polar_factor"):
        monkeypatch.setattr(spectral, name, tracked(getattr(spectral, name)))
    at_layer_start = []
    is_matrix = spectral.is_matrix
    monkeypatch.setattr(spectral, "is_matrix", lambda x: at_layer_start.append(sum(r() is not None for r in alive))
                        or is_matrix(x))
    merge_task_vectors(method, make_tv(3, seed=19, shapes={"a": (8, 6), "b": (5, 9), "c": (7, 7), "d": (3,)}))
    assert len(at_layer_start) == 4 and alive
    assert at_layer_start == [0, 0, 0, 0] and all(r() is None for r in alive)


@pytest.mark.parametrize("method", STRONG)
def test_registered_with_the_yaml_defaults_and_run_through_merge(method):
    spec = get_method(method)
    assert spec.kind == "static" and spec.validate is not None
    conf = OmegaConf.to_container(OmegaConf.load(CONF_METHOD / f"{method}.yaml"))
    assert conf.pop("name") == method
    assert conf == dict(spec.defaults)
    resolved = spec.resolve_hparams(conf)
    spec.validate(3, resolved)
    generator = torch.Generator().manual_seed(20)
    pretrained = {name: torch.randn(shape, generator=generator) for name, shape in SHAPES.items()}
    finetuned = [{n: t + 0.1 * torch.randn(t.shape, generator=generator) for n, t in pretrained.items()}
                 for _ in range(3)]
    merged = merge(method, pretrained, finetuned)
    assert set(merged) == set(pretrained)
    assert all(torch.isfinite(t).all() and t.shape == pretrained[n].shape for n, t in merged.items())


@pytest.mark.parametrize(
    ("method", "hparams", "message"),
    [
        ("pcb", {"pcb_ratio": 0.0}, r"'pcb'.*pcb_ratio=0.0"),
        ("pcb", {"pcb_ratio": 5}, r"pcb_ratio=5.*top 5%"),
        ("pcb", {"clamp_ratio": 0.5}, r"'pcb'.*clamp_ratio=0.5.*\[0, 0.5\)"),
        ("pcb", {"clamp_ratio": -0.01}, r"clamp_ratio=-0.01"),
        ("pcb", {"inter_balancing": "softmax"}, r"inter_balancing='softmax'.*normalized_sum"),
        ("pcb", {"scaling_coefficient": [1.0, 1.0, 1.0]}, r"'pcb'.*scaling_coefficient.*2 values, got 3"),
        ("pcb", {"scope": "layer"}, r"scope='layer'"),
        ("tsv_merge", {"rank_fraction": 0.0}, r"'tsv_merge'.*rank_fraction=0.0"),
        ("tsv_merge", {"rank_fraction": 1.5}, r"rank_fraction=1.5.*null"),
        ("tsv_merge", {"rank_fraction": "1/K"}, r"rank_fraction='1/K'"),
        ("tsv_merge", {"alpha": "1"}, r"'tsv_merge'.*alpha='1'"),
        ("iso_c", {"alpha": None}, r"'iso_c'.*alpha=None"),
        ("iso_c", {"alpha": [1.0, 1.0]}, r"'iso_c'.*alpha=\[1.0, 1.0\].*a number"),
        ("iso_cts", {"common_space_fraction": 1.2}, r"'iso_cts'.*common_space_fraction=1.2"),
        ("iso_cts", {"common_space_fraction": -0.1}, r"common_space_fraction=-0.1"),
        ("iso_cts", {"alpha": float("nan")}, r"'iso_cts'.*alpha=nan"),
        ("wudi", {"steps": -1}, r"'wudi'.*steps=-1"),
        ("wudi", {"steps": 2.5}, r"steps=2.5.*integer"),
        ("wudi", {"steps": True}, r"steps=True"),
        ("wudi", {"lr": 0.0}, r"'wudi'.*lr=0.0.*positive"),
        ("wudi", {"non_matrix": "sum"}, r"non_matrix='sum'.*zero, mean"),
        ("wudi", {"device": "gpu9"}, r"'wudi'.*device='gpu9'"),
    ],
)
def test_bad_hyperparameters_are_named_before_any_checkpoint_is_read(method, hparams, message):
    missing = ["/nonexistent/finetuned_a.pt", "/nonexistent/finetuned_b.pt"]
    with pytest.raises(ValueError, match=message):
        merge(method, "/nonexistent/pretrained.pt", missing, **hparams)
    with pytest.raises(ValueError, match=message):  # direct calls validate too
        get_method(method).fn(make_tv(2), **hparams)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_wudi_rejects_cuda_where_there_is_none():
    with pytest.raises(ValueError, match=r"'wudi'.*device='cuda'.*not available"):
        get_method("wudi").validate(2, {**get_method("wudi").defaults, "device": "cuda"})


def test_unknown_hyperparameters_are_rejected():
    with pytest.raises(TypeError, match=r"'tsv_merge'.*k.*allowed: alpha, pointwise_convs, rank_fraction"):
        merge_task_vectors("tsv_merge", make_tv(2), k=3)


@pytest.mark.parametrize("method", STRONG)
def test_an_all_zero_task_vector_gives_finite_reproducible_deltas(method):
    tv = make_tv(3, seed=21, zero_task=1)
    first, second = merge_task_vectors(method, tv), merge_task_vectors(method, tv)
    for name, delta in first.items():
        assert torch.isfinite(delta).all() and torch.equal(delta, second[name])


def test_svd_retries_when_lapack_does_not_converge(monkeypatch):
    """Wide matrices go through their transpose; a convergence failure falls back to the other orientation."""
    real, failures = torch.linalg.svd, []

    def flaky(matrix, full_matrices=True):
        if not failures:
            failures.append(tuple(matrix.shape))
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(matrix, full_matrices=full_matrices)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    a = torch.randn(3, 7, dtype=torch.float64).float()
    u, s, vh = spectral.svd(a)
    assert failures == [(7, 3)] and u.shape == (3, 3) and vh.shape == (3, 7)
    assert_matches((u * s) @ vh, a.double())


@pytest.mark.parametrize("method", ["tsv_merge", "iso_c", "iso_cts", "wudi"])
def test_pointwise_convolutions_merge_as_the_matrices_they_are(method):
    """A 1x1 kernel [out, in, 1, 1] gets exactly the merge of its [out, in] matrix; with pointwise_convs off it
    takes the non-matrix fallback (task mean; WUDI: pretrained)."""
    generator = torch.Generator().manual_seed(3)
    kernel = torch.randn(3, 7, 5, 1, 1, generator=generator)
    as_conv = TaskVectors(["t0", "t1", "t2"], {"pw.weight": torch.zeros(7, 5, 1, 1)}, {"pw.weight": kernel})
    as_matrix = TaskVectors(["t0", "t1", "t2"], {"pw.weight": torch.zeros(7, 5)}, {"pw.weight": kernel[..., 0, 0]})
    fn = get_method(method).fn
    got = fn(as_conv)["pw.weight"]
    assert got.shape == (7, 5, 1, 1)
    assert_matches(got, fn(as_matrix)["pw.weight"], tol=1e-6)
    off = fn(as_conv, pointwise_convs=False)["pw.weight"]
    expected = torch.zeros(7, 5, 1, 1) if method == "wudi" else kernel.mean(0) * get_method(method).defaults.get(
        "alpha", 1.0)
    assert_matches(off, expected, tol=1e-6)
