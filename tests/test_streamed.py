"""Streamed task vectors (adamerge/pool/{lazy_checkpoints,streamed,streamed_vectors,compressed}.py,
adamerge/methods/data_free/{streamed,radix}.py, adamerge/methods/learned/merged_streamed.py): lazy
safetensors reading, every data-free method block by block against the in-memory merge, learning with τ fetched in
the forward and backward passes against the in-memory gradients, low-rank compression, the memory plan's terms, and
the peak memory measured in a fresh process."""

from __future__ import annotations

import importlib.util
import json
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from adamerge.pool.checkpoints import CheckpointError, load_state_dict
from adamerge.errors import ConfigError
from adamerge.methods import get_method
from adamerge.methods.data_free.radix import order_statistics
from adamerge.methods.data_free.static import static_method
from adamerge.methods.learned.merged import MergedModel
from adamerge.methods.learned.merged_streamed import LowRankMergedModel, StreamedMergedModel
from adamerge.pool.compressed import LowRankTaskVectors, check_compression, compress, kept_rank
from adamerge.pool.key_filters import block_layer_groups
from adamerge.pool.lazy_checkpoints import LazyStateDict, lazy_state_dict
from adamerge.pool.streamed import block_runs
from adamerge.pool.streamed_vectors import StreamedTaskVectors
from adamerge.pool.task_vectors import TaskVectors

ROOT = Path(__file__).resolve().parent.parent
F64 = torch.float64
TASKS = ("alpha", "beta", "gamma")


class Net(nn.Module):
    """Embedding-like matrix, three blocks under ``body.layers`` (so BLOCK_PATTERN finds them), a head."""

    def __init__(self, dim: int = 6, depth: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.body = nn.Module()
        self.body.layers = nn.ModuleList([nn.Sequential(nn.Linear(dim, 2 * dim), nn.Tanh(), nn.Linear(2 * dim, dim))
                                          for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.body.layers:
            h = h + layer(h)
        return self.head(self.norm(h))


def _write_shards(state: dict, directory: Path, parts: int = 2) -> Path:
    """``state`` as ``model-0000i-of-0000n.safetensors`` shards and their ``model.safetensors.index.json``."""
    directory.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for i in range(parts):
        shard = f"model-{i + 1:05d}-of-{parts:05d}.safetensors"
        chunk = names[i::parts]
        save_file({n: state[n].contiguous() for n in chunk}, str(directory / shard))
        weight_map.update({n: shard for n in chunk})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """θ0 (one file) and three fine-tuned float64 checkpoints: a file, a sharded directory, a bare shard index."""
    root = tmp_path_factory.mktemp("streamed")
    torch.manual_seed(0)
    net = Net().double()
    pretrained = {n: t.detach().clone() for n, t in net.state_dict().items()}
    save_file(pretrained, str(root / "pretrained.safetensors"))
    states = {}
    for k, task in enumerate(TASKS):
        generator = torch.Generator().manual_seed(k + 1)
        states[task] = {n: t + 0.2 * torch.randn(t.shape, generator=generator, dtype=F64) for n, t in pretrained.items()}
    save_file(states["alpha"], str(root / "alpha.safetensors"))
    _write_shards(states["beta"], root / "beta")
    _write_shards(states["gamma"], root / "gamma_shards", parts=3)
    sources = {"alpha": root / "alpha.safetensors", "beta": root / "beta",
               "gamma": root / "gamma_shards" / "model.safetensors.index.json"}
    return {"root": root, "pretrained": root / "pretrained.safetensors", "sources": sources, "states": states}


def _in_memory(files) -> TaskVectors:
    return TaskVectors.from_state_dicts(load_state_dict(files["pretrained"]),
                                        {t: load_state_dict(Path(s).parent if s.name.endswith(".json") else s)
                                         for t, s in files["sources"].items()}, storage_dtype=F64)


def _streamed(files, residency="disk") -> StreamedTaskVectors:
    return StreamedTaskVectors.from_sources(files["pretrained"], files["sources"], storage_dtype=F64,
                                            residency=residency)


# ----------------------------------------------------------------------------------------------- lazy reading


def test_lazy_reading_of_a_file_a_sharded_set_and_an_index_reads_only_what_is_accessed(files):
    for task, source in files["sources"].items():
        lazy = lazy_state_dict(source)
        assert isinstance(lazy, LazyStateDict) and lazy.reads == 0
        assert set(lazy) == set(files["states"][task])
        assert {n: s.shape for n, s in lazy.specs.items()} == {n: tuple(t.shape) for n, t in files["states"][task].items()}
        name = "body.layers.1.2.weight"
        torch.testing.assert_close(lazy[name], files["states"][task][name], rtol=0, atol=0)
        assert lazy.reads == 1  # one tensor read, the rest untouched
    assert len(lazy_state_dict(files["sources"]["gamma"]).files) == 3


def test_lazy_reading_of_a_save_pretrained_directory_sharded_and_not(tmp_path):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path / "single")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for directory in ("single", "sharded"):
        lazy = lazy_state_dict(tmp_path / directory)
        whole = load_state_dict(tmp_path / directory)
        assert list(lazy) == list(whole)
        for name in whole:
            torch.testing.assert_close(lazy[name], whole[name], rtol=0, atol=0)
    assert len(lazy_state_dict(tmp_path / "sharded").files) > 2


def test_pickled_checkpoints_are_refused_with_a_conversion_hint(tmp_path, files):
    state = load_state_dict(files["pretrained"])
    torch.save(state, tmp_path / "model.bin")
    (tmp_path / "hf").mkdir()
    torch.save(state, tmp_path / "hf" / "pytorch_model.bin")
    for source in (tmp_path / "model.bin", tmp_path / "hf"):
        with pytest.raises(CheckpointError, match="cannot be memory-mapped safely.*convert it to safetensors"):
            lazy_state_dict(source)
    with pytest.raises(CheckpointError, match="not in the local cache"):
        lazy_state_dict("nobody/not-a-cached-model")


def test_validation_comes_from_headers_and_non_finite_values_are_named_on_read(tmp_path, files):
    pre = load_state_dict(files["pretrained"])
    bad_shape = {**pre, "head.weight": torch.zeros(3, 7, dtype=F64)}
    missing = {n: t for n, t in pre.items() if n != "norm.bias"}
    nan = {**pre, "body.layers.2.0.weight": pre["body.layers.2.0.weight"].clone().fill_(float("nan"))}
    for name, state in (("shape", bad_shape), ("missing", missing), ("nan", nan)):
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    with pytest.raises(CheckpointError, match=r"parameter 'head.weight' has shape \(3, 7\) but the pretrained"):
        StreamedTaskVectors.from_sources(files["pretrained"], {"x": tmp_path / "shape.safetensors"})
    with pytest.raises(CheckpointError, match="is missing parameters present in.*'norm.bias'"):
        StreamedTaskVectors.from_sources(files["pretrained"], {"x": tmp_path / "missing.safetensors"})
    vectors = StreamedTaskVectors.from_sources(files["pretrained"], {"x": tmp_path / "nan.safetensors"})
    vectors.vectors["body.layers.1.0.weight"]  # fine: only the bad tensor is refused, when it is read
    with pytest.raises(CheckpointError, match=r"'body.layers.2.0.weight' has 72 non-finite \(NaN/Inf\) values"):
        vectors.vectors["body.layers.2.0.weight"]


@pytest.mark.parametrize("piece", [7, 1 << 20])
def test_radix_order_statistics_are_kthvalue_exactly(monkeypatch, piece):
    import adamerge.methods.data_free.radix

    monkeypatch.setattr(adamerge.methods.data_free.radix, "_PIECE", piece)  # keys are histogrammed in pieces of this many entries
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(3, 4000, generator=generator) * torch.logspace(-8, 3, 4000)
    values[:, :300] = 0.0
    values[:, 300:400] = -0.0
    values[:, 400:700] = values[:, 700:1000]  # ties
    values[1, ::7] = -values[1, ::7]
    chunks = [values[:, :1], values[:, 1:1500], values[:, 1500:1500], values[:, 1500:]]
    positions = [0, 1, 299, 300, 399, 400, 1234, 3998, 3999]
    found = order_statistics(lambda: iter(chunks), 3, positions)
    for j, position in enumerate(positions):
        expected = values.kthvalue(position + 1, dim=1).values
        assert torch.equal(found[j], expected), (position, found[j], expected)


# ----------------------------------------------------------------------------------------- data-free methods

METHOD_CASES = [
    ("weight_average", {}), ("task_arithmetic", {"scaling_coefficient": [0.3, 0.5, 0.2]}),
    ("ties", {"scope": "model"}), ("ties", {"scope": "tensor", "top_k": 0.5}), ("ties", {"top_k": 1.0}),
    ("dare", {"seed": 3}), ("dare", {"combine": "ties", "scope": "model"}),
    ("dare", {"combine": "ties", "scope": "tensor"}), ("breadcrumbs", {"top_beta": 0.1, "bottom_gamma": 0.3}),
    ("pcb", {"scope": "model"}), ("pcb", {"scope": "tensor", "inter_balancing": "pairwise"}),
    ("pcb", {"scope": "model", "inter_balancing": "raw_sum", "pcb_ratio": 0.3}),
    ("tsv_merge", {}), ("iso_c", {}), ("iso_cts", {"common_space_fraction": 0.5}), ("wudi", {"steps": 25, "lr": 1e-3}),
    ("pretrained", {}),
]


def test_every_data_free_method_has_a_case():
    from adamerge.methods import available_methods

    assert {m for m, _ in METHOD_CASES} == set(available_methods("static"))


@pytest.mark.parametrize("method,hparams", METHOD_CASES, ids=[f"{m}-{'-'.join(map(str, h.values()))}"
                                                              for m, h in METHOD_CASES])
def test_streamed_merge_equals_the_in_memory_merge(files, method, hparams):
    memory, streamed = _in_memory(files), _streamed(files)
    assert streamed.names == memory.names
    spec = get_method(method)
    expected = spec.fn(memory, **spec.resolve_hparams(hparams))
    alive: list[weakref.ref] = []
    most = 0
    original = streamed.stacked

    def tracked(name):
        nonlocal most  # no gc.collect(): a block must be freed by reference counting, not by a later collection
        alive[:] = [r for r in alive if r() is not None]
        stacked = original(name)
        alive.append(weakref.ref(stacked))
        most = max(most, len(alive))
        return stacked

    streamed.stacked = tracked
    got = spec.fn(streamed, **spec.resolve_hparams(hparams))
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=f"{method} {name}")
    # Only the current block's K slices are ever alive together (a block here has 4 tensors).
    assert most <= max(len(block) for block in streamed.blocks()) == 4
    merged = streamed.state_dict_from_deltas(got)
    for name, tensor in memory.state_dict_from_deltas(expected).items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6)


def test_model_scope_methods_read_the_pool_a_fixed_number_of_times(files):
    streamed = _streamed(files)
    tensors = len(streamed.names)
    get_method("ties").fn(streamed, scope="model")
    assert streamed.formed == 4 * tensors  # thresholds (2 reads), sign fallback, merge
    streamed.formed = 0
    get_method("pcb").fn(streamed, scope="model")
    assert streamed.formed == 5 * tensors
    streamed.formed = 0
    get_method("tsv_merge").fn(streamed)
    assert streamed.formed == tensors
    host = _streamed(files, residency="host")
    get_method("ties").fn(host, scope="model")
    assert host.formed == tensors and host.memory_bytes() == _in_memory(files).memory_bytes()


def test_a_method_without_a_declared_streamed_form_is_refused(files, monkeypatch):
    from adamerge.methods import registry

    name = "test_streamed_unknown_method"
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # registered for this test only
    static_method(name, lambda num_tasks, hparams: None)(lambda task_vectors: {})
    with pytest.raises(ConfigError, match=f"method '{name}' has no streamed form.*register_block_local"):
        get_method(name).fn(_streamed(files))


def test_blocks_are_contiguous_runs_in_model_order():
    names = ["embed.weight", "model.layers.0.a", "model.layers.0.b", "model.layers.1.a", "model.norm.weight",
             "model.layers.1.b", "head.weight"]
    assert block_runs(names) == [["embed.weight"], ["model.layers.0.a", "model.layers.0.b"], ["model.layers.1.a"],
                                 ["model.norm.weight"], ["model.layers.1.b"], ["head.weight"]]


# ------------------------------------------------------------------------------------------- learning, streamed


def _steps(merged: MergedModel, steps: int = 3) -> list[torch.Tensor]:
    """A few Adam steps on a fixed float64 batch; the coefficients' gradient of each step."""
    merged.coefficients.data = merged.coefficients.data.double()
    optimizer = torch.optim.Adam([merged.coefficients], lr=0.05)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(7), dtype=F64)
    grads = []
    for _ in range(steps):
        optimizer.zero_grad()
        merged(x).log_softmax(-1).exp().square().sum().backward()
        grads.append(merged.coefficients.grad.clone())
        optimizer.step()
        merged.clamp_coefficients_()
    return grads


@pytest.mark.parametrize("granularity,groups", [("layer_wise", "block"), ("layer_wise", None), ("task_wise", None)])
@pytest.mark.parametrize("residency", ["disk", "host"])
@pytest.mark.parametrize("per_module", [True, False], ids=["per-module", "whole-merge"])
def test_learned_gradients_equal_the_in_memory_path(files, granularity, groups, residency, per_module):
    memory, streamed = _in_memory(files), _streamed(files, residency)
    layer_groups = block_layer_groups(memory.names) if groups else None
    kwargs = {"granularity": granularity, "init_value": [0.3, 0.4, 0.5], "layer_groups": layer_groups}
    reference = MergedModel(Net().double(), memory, **kwargs)
    model = StreamedMergedModel(Net().double(), streamed, **kwargs)
    model.merge_per_module = per_module
    assert not [n for n, _ in model.named_buffers() if "_task_vector_" in n]
    expected, got = _steps(reference), _steps(model)
    for step, (a, b) in enumerate(zip(expected, got)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=f"step {step}")
    torch.testing.assert_close(model.coefficients, reference.coefficients, rtol=0, atol=1e-6)
    passes = len(memory.names) * 3
    if per_module:  # forward and backward; a bias or norm through the whole-tensor path, also twice
        assert 2 * passes <= model.fetches <= 3 * passes
    else:  # every tensor's slices: once forward, once backward
        assert model.fetches == 2 * passes
    if residency == "disk":
        assert streamed.memory_bytes() == 0


def test_backward_fetches_the_slices_again_instead_of_saving_them(files):
    streamed = _streamed(files)
    model = StreamedMergedModel(Net().double(), streamed, granularity="task_wise", init_value=0.3)
    model.coefficients.data = model.coefficients.data.double()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        weights = model.merged_weights()
    assert all(shape[:1] != (len(TASKS),) or len(shape) == 1 for shape in saved)  # no [K, *shape] τ kept
    before = model.fetches
    sum(w.sum() for w in weights.values()).backward()
    assert model.fetches - before == len(streamed.names)


@pytest.mark.parametrize("per_module", [True, False], ids=["per-module", "whole-merge"])
def test_a_streamed_step_reads_one_task_s_slice_at_a_time(files, monkeypatch, per_module):
    """The peak of a streamed step must not grow with K: the merge and its backward read τ_k one task at a time and
    never form a tensor's ``[K, *shape]`` stack (for a large vocabulary's embedding that stack is K × 0.5 GB)."""
    memory, streamed = _in_memory(files), _streamed(files)
    reference = MergedModel(Net().double(), memory, init_value=[0.3, 0.4, 0.5])
    model = StreamedMergedModel(Net().double(), streamed, init_value=[0.3, 0.4, 0.5])
    model.merge_per_module = per_module
    monkeypatch.setattr(StreamedTaskVectors, "stacked", lambda *a: pytest.fail("a [K, ...] stack was formed"))
    reads = []
    original = StreamedTaskVectors.task_slice
    monkeypatch.setattr(StreamedTaskVectors, "task_slice", lambda self, name, task, rows=None, base=None:
                        reads.append(task) or original(self, name, task, rows, base))
    for a, b in zip(_steps(reference, 1), _steps(model, 1)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    if per_module:  # task by task within every band, and every tensor read at least forward and backward
        assert reads == list(range(len(TASKS))) * (len(reads) // len(TASKS)) and len(reads) >= 2 * len(TASKS) * len(memory.names)
    else:
        assert reads == list(range(len(TASKS))) * 2 * len(memory.names)  # forward and backward, task by task


def test_per_module_merging_reads_weights_a_band_at_a_time(files, monkeypatch):
    """Merging module by module, a linear weight is read and formed a band of rows at a time, forward and backward:
    nothing of a weight's whole size is formed (the Qwen bench's tied 152k-row embedding is 0.5 GB in float32)."""
    from adamerge.methods.learned import merged_per_module

    monkeypatch.setattr(merged_per_module, "BAND_ELEMENTS", 8)
    memory, streamed = _in_memory(files), _streamed(files)
    reference = MergedModel(Net().double(), memory, init_value=[0.3, 0.4, 0.5])
    model = StreamedMergedModel(Net().double(), streamed, init_value=[0.3, 0.4, 0.5])
    assert model.merge_per_module  # what a streamed pool does by default
    shapes = {name: tensor.shape for name, tensor in memory.pretrained.items()}
    whole = []
    original = StreamedTaskVectors.task_slice

    def read(self, name, task, rows=None, base=None):
        if len(shapes[name]) == 2 and shapes[name].numel() > 8 and rows is None:
            whole.append(name)
        elif rows is not None:
            assert (rows[1] - rows[0]) * shapes[name][1] <= max(8, shapes[name][1])  # a band is one row at least
        return original(self, name, task, rows, base)

    monkeypatch.setattr(StreamedTaskVectors, "task_slice", read)
    for a, b in zip(_steps(reference, 2), _steps(model, 2)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    assert not whole, f"weights read whole: {sorted(set(whole))}"


def test_a_learned_module_shares_the_pool_s_pretrained_weights(llama_pool):
    """build_learned_module builds the merged model on the pool's own θ0 (no second copy of the model), and learning
    leaves the pool's backbone as it was."""
    from adamerge import build_learned_module

    pool = _hf_pool(llama_pool, streaming="disk")
    before = {n: t.clone() for n, t in pool.backbone.state_dict().items()}
    module = build_learned_module(pool, "adamerging_layer_wise", "entropy")
    own = dict(pool.backbone.named_parameters())
    for name, parameter in module.merged.module.named_parameters():
        assert parameter.data_ptr() == own[name].data_ptr(), name
    optimizer = module.configure_optimizers()
    inputs = {"input_ids": torch.randint(0, 64, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    module.accumulate_gradients({t: {"inputs": inputs} for t in pool.task_names}, module.merged.merged_weights())
    optimizer.step()
    assert module.merged.coefficients.grad.abs().sum() > 0
    for name, tensor in pool.backbone.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert pool.fresh_backbone().state_dict()["model.embed_tokens.weight"].data_ptr() != \
        own["model.embed_tokens.weight"].data_ptr()


def test_a_shared_backbone_is_never_written_when_the_recorded_pretrained_weights_differ(llama_pool):
    """The merged model takes θ0 from the task vectors; where they differ from the pool's backbone (e.g. another
    storage dtype) it must rebind its own tensor, not copy into storage it shares with the pool."""
    from adamerge.methods.learned.merged import MergedModel

    pool = _hf_pool(llama_pool)
    vectors = pool.task_vectors()
    name = "model.embed_tokens.weight"
    vectors.pretrained[name] = vectors.pretrained[name] + 1.0
    before = pool.backbone.state_dict()[name].clone()
    merged = MergedModel(pool.shared_backbone(), vectors)
    torch.testing.assert_close(dict(merged.module.named_parameters())[name], vectors.pretrained[name])
    assert torch.equal(pool.backbone.state_dict()[name], before)


def test_progressive_distillation_streams_one_block_and_learns_as_in_memory():
    """Float64 throughout: the coefficients learned over a streamed pool (each tensor's slices read one task at a time,
    one block's at a step) are the in-memory pool's to 1e-6, per tensor and per element."""
    from tests.helpers import TensorSplits
    from tests.test_progressive import _learn, _pool

    backbone, vectors, heads, splits = _pool(num_tasks=2)
    backbone = backbone.double()
    states = {t: {n: v.double() for n, v in vectors.state_dict_from_deltas(vectors.task_vector(t)).items()}
              for t in vectors.task_names}
    in_memory = TaskVectors.from_state_dicts(backbone.state_dict(), states)
    streamed = StreamedTaskVectors.from_states(backbone.state_dict(), states)
    splits = TensorSplits({t: x.double() for t, x in splits.inputs.items()}, batch_size=8)

    for granularity in ("tensor", "element"):
        hparams = {"granularity": granularity, "lr": 0.05, "steps_per_block": 4, "samples_per_task": 8, "batch_size": 8}
        expected = _learn(backbone, in_memory, heads, splits, dtype=torch.float64, **hparams)
        got = _learn(backbone, streamed, heads, splits, dtype=torch.float64, **hparams)
        assert isinstance(got.merged, StreamedMergedModel)
        learned = sorted(expected.merged.element_tensors) if granularity == "element" else range(len(expected.merged.names))
        for index in learned:  # element-wise: every block's, finished or learning
            assert got.merged.tensor_coefficients(index).dtype == torch.float64
            torch.testing.assert_close(got.merged.tensor_coefficients(index), expected.merged.tensor_coefficients(index),
                                       rtol=0, atol=1e-6)


def test_methods_that_hold_every_task_vector_refuse_a_streamed_pool(files):
    from adamerge.methods.learned.adamerging import build_learned
    from tests.helpers import make_heads

    streamed = _streamed(files)
    heads = make_heads(streamed.task_names)
    with pytest.raises(ConfigError, match="keeps every task vector resident.*modelpool.streaming=false"):
        build_learned("concrete_task_arithmetic", Net().double(), streamed, heads)
    with pytest.raises(ConfigError, match="base_form=split .* streamed or compressed pool never holds"):
        build_learned("adamerging_task_wise_plus_plus", Net().double(), streamed, heads)
    module = build_learned("adamerging_layer_wise_on_iso_cts", Net().double(), streamed, heads)  # residual: streams
    assert isinstance(module.merged, StreamedMergedModel) and module.merged.task_names[-1] == "base_merge"


# ---------------------------------------------------------------------------------------- the pool, end to end


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llama_pool(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    paths = _bench("memory_plan_check").build_pool(root, hidden=32, intermediate=48, layers=2, vocab=64, tasks=3)
    model = transformers.AutoModelForCausalLM.from_pretrained(paths["gamma"])
    model.save_pretrained(root / "gamma_sharded", max_shard_size="30KB")  # a sharded save_pretrained directory
    paths["gamma"] = root / "gamma_sharded"
    return paths


def _hf_pool(paths, **settings):
    from adamerge.backbones.heads import Identity
    from adamerge.backbones.hf_checkpoints import HFModelPool

    finetuned = {t: str(p) for t, p in paths.items() if t != "pretrained"}
    return HFModelPool(backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": str(paths["pretrained"])},
                       finetuned=finetuned, heads={t: Identity() for t in finetuned},
                       pretrained=str(paths["pretrained"]), auto_class="AutoModelForCausalLM", **settings)


def test_a_streamed_pool_gives_the_in_memory_pool_s_vectors_merges_and_gradients(llama_pool):
    from adamerge.methods.learned.adamerging import build_learned

    memory, streamed = _hf_pool(llama_pool).task_vectors(), _hf_pool(llama_pool, streaming=True).task_vectors()
    assert isinstance(streamed, StreamedTaskVectors) and streamed.names == memory.names
    assert streamed.memory_report()["task_vectors_mb"] == 0
    for name in memory.names:
        torch.testing.assert_close(streamed.vectors[name], memory.vectors[name], rtol=0, atol=0)
    for method in ("ties", "iso_cts"):
        a, b = get_method(method).fn(memory), get_method(method).fn(streamed)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    pool = _hf_pool(llama_pool)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    batch = {t: {"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}} for t in memory.task_names}
    grads = []
    for vectors in (memory, streamed):
        module = build_learned("adamerging_layer_wise", pool.fresh_backbone(), vectors, pool.heads, lr=0.05,
                               layer_groups="block")
        module.accumulate_gradients(batch, module.merged.merged_weights())
        grads.append(module.merged.coefficients.grad.clone())
    assert type(module.merged) is StreamedMergedModel and grads[0].abs().min() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)
    assert streamed.export_record() == {"streaming": "disk", "compression": None}


def test_the_export_records_how_the_task_vectors_were_held(llama_pool, tmp_path):
    from adamerge.export.from_run import export_merge

    pool = _hf_pool(llama_pool, streaming="host", compression={"energy": 0.9})
    vectors = pool.task_vectors()
    assert isinstance(vectors, LowRankTaskVectors)
    deltas = get_method("task_arithmetic").fn(vectors)
    model = pool.fresh_backbone()
    model.load_state_dict(vectors.state_dict_from_deltas(deltas), strict=False)
    out = export_merge(tmp_path / "export", "task_arithmetic", model, pool, None, tasks=vectors.task_names,
                       merged_tensors=vectors.names, hyperparameters={}, outcome={"accuracy": {}}, task_vectors=vectors)
    record = json.loads((out / "merge_config.json").read_text())
    assert record["task_vectors"]["streaming"] == "host"
    compression = record["task_vectors"]["compression"]
    assert compression["setting"] == {"energy": 0.9} and 0.9 <= compression["kept_energy"] < 1
    assert 0 < compression["ratio"] <= 1  # noise task vectors have flat spectra: 90 % of the energy is most of the rank
    assert "compressed to low rank" in record["mergekit"]["not_expressible"]


def test_the_memory_plan_s_streamed_terms_are_what_the_streamed_objects_hold(llama_pool):
    from adamerge.cli.run_memory import plan_for_pool
    from adamerge.pool import memory_plan

    finetuned = {t: p for t, p in llama_pool.items() if t != "pretrained"}
    plans = {mode: plan_for_pool(llama_pool["pretrained"], finetuned, auto_class="AutoModelForCausalLM",
                                 batch_size=2, sequence_length=8, on_device=True, streaming=mode)
             for mode in (None, "host", "disk")}
    memory = _hf_pool(llama_pool).task_vectors()
    largest = max(v[0].numel() for v in memory.vectors.values())
    for mode in ("host", "disk"):
        plan, run, model = plans[mode]
        assert model.largest_tensor == largest
        assert plan.device["task vectors"] == 0
        # What a step merging module by module holds: one band of one weight (float32 here), its float32 merge and
        # gradient, whatever K is; no merged weights or gradients of the whole model.
        from adamerge.methods.learned import merged_per_module

        assert merged_per_module.BAND_ELEMENTS == memory_plan.BAND_ELEMENTS
        assert plan.device["task-vector slices"] == min(largest, memory_plan.BAND_ELEMENTS) * (4 + 12)
        assert plan.device["merged weights"] == plan.device["their gradients"] == 0
        assert not any("checkpoints being read" in term for term in plan.host)
    assert plans["host"][0].host["task vectors"] == memory.memory_bytes()
    assert plans["disk"][0].host["task vectors"] == 0
    assert plans[None][0].device["task vectors"] == memory.memory_bytes()
    assert plans["disk"][0].host_peak < plans[None][0].host_peak
    assert plans["disk"][0].device_peak < plans[None][0].device_peak


# ------------------------------------------------------------------------------------------------- compression


def test_compression_at_full_rank_is_no_compression(files):
    memory = _in_memory(files)
    full = compress(_streamed(files), {"rank": 100})
    assert full.compression_report()["kept_energy"] == pytest.approx(1.0)
    for name in memory.names:
        torch.testing.assert_close(full.vectors[name], memory.vectors[name], rtol=0, atol=1e-10)
    for method, hparams in (("ties", {"scope": "model"}), ("tsv_merge", {})):
        a, b = get_method(method).fn(memory, **hparams), get_method(method).fn(full, **hparams)
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6)
    kwargs = {"granularity": "layer_wise", "init_value": 0.3, "layer_groups": block_layer_groups(memory.names)}
    expected = _steps(MergedModel(Net().double(), memory, **kwargs))
    model = LowRankMergedModel(Net().double(), full, **kwargs)
    assert not [n for n, _ in model.named_buffers() if "_task_vector_" in n]
    for a, b in zip(expected, _steps(model)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    for index, name in enumerate(memory.names):  # one task's slice alone, reconstructed (element-wise distillation)
        for task in range(memory.num_tasks):
            torch.testing.assert_close(model.task_slice(index, task), memory.vectors[name][task], rtol=0, atol=1e-10)
        torch.testing.assert_close(model.task_vector(index), memory.vectors[name], rtol=0, atol=1e-10)


@pytest.mark.parametrize("setting", [{"rank": 2}, {"rank_fraction": 0.34}, {"energy": 0.8}])
def test_low_rank_compression_is_the_explicit_svd_truncation(files, setting):
    memory = _in_memory(files)
    compressed = compress(memory, setting)
    for name in memory.names:
        stacked = memory.vectors[name]
        if stacked.dim() != 3:
            assert torch.equal(compressed.vectors[name], stacked)  # not a matrix: kept dense
            continue
        for k in range(len(TASKS)):
            u, s, vh = torch.linalg.svd(stacked[k], full_matrices=False)
            rank = {"rank": 2, "rank_fraction": -(-34 * min(stacked.shape[1:]) // 100)}.get(next(iter(setting)))
            if "energy" in setting:
                share = s.square().cumsum(0) / s.square().sum()
                rank = int((share < 0.8).sum()) + 1
            truncated = (u[:, :rank] * s[:rank]) @ vh[:rank]
            torch.testing.assert_close(compressed.vectors[name][k], truncated, rtol=0, atol=1e-10)
    report = compressed.compression_report()
    assert report["ratio"] < 1 and report["kept_energy"] < 1
    # Learning over the factors equals learning over their dense reconstruction.
    dense = TaskVectors(memory.task_names, memory.pretrained, {n: compressed.vectors[n] for n in memory.names})
    expected = _steps(MergedModel(Net().double(), dense, granularity="task_wise", init_value=0.3))
    got = _steps(LowRankMergedModel(Net().double(), compressed, granularity="task_wise", init_value=0.3))
    for a, b in zip(expected, got):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_compression_settings_are_checked():
    assert check_compression(None) is None and check_compression({"rank": 4}) == {"rank": 4}
    for bad, message in (({"rank": 0}, "whole number"), ({"energy": 1.5}, r"fraction in \(0, 1\]"),
                         ({"rank": 2, "energy": 0.5}, "exactly one"), ({"ranks": 2}, "unknown: ranks"),
                         ("low", "null or one of")):
        with pytest.raises(ConfigError, match=message):
            check_compression(bad)
    assert kept_rank(torch.tensor([3.0, 2.0, 1.0, 0.0]), {"energy": 1.0}) == 3
    assert kept_rank(torch.tensor([3.0, 4.0]).sort(descending=True).values, {"energy": 16 / 25}) == 1
    assert kept_rank(torch.zeros(3), {"energy": 0.5}) == 0


# ------------------------------------------------------------------------------------------------- peak memory


def test_streamed_merge_and_learning_hold_less_than_in_memory(tmp_path):
    """Measured in fresh processes (peak RSS over the merge / the learning steps, bench/streaming.py's measurement) on
    a pool whose task vectors dominate: the streamed paths must hold well under the in-memory ones."""
    bench = _bench("streaming")
    paths = bench.build_pool(tmp_path, hidden=256, intermediate=688, layers=8, vocab=2048, tasks=4)
    merge = {mode: bench.run_measurement(paths, "merge", mode, method="task_arithmetic") for mode in ("memory", "disk")}
    learn = {mode: bench.run_measurement(paths, "learn", mode, steps=1) for mode in ("memory", "disk")}
    vectors_mb = merge["memory"]["task_vectors_mb"]
    assert vectors_mb > 20
    # In memory: the K checkpoints and the K task vectors (≈ 2 × vectors_mb); streamed: one block's slices.
    assert merge["disk"]["peak_mb"] < merge["memory"]["peak_mb"] - vectors_mb
    assert learn["disk"]["peak_mb"] < learn["memory"]["peak_mb"] - 0.5 * vectors_mb


# ------------------------------------------------------------------------------------------------ a whole run


@pytest.mark.parametrize("method", [[], ["method=progressive_distillation", "~method.layer_groups", "method.steps_per_block=2",
                                          "method.samples_per_task=2", "method.batch_size=2"]],
                         ids=["default", "progressive_element_wise"])
def test_a_streamed_run_learns_what_the_in_memory_run_learns_and_records_it(tmp_path, method):
    """The command end to end (memory plan, experts, learning under the trainer, export) with modelpool.streaming on
    a tiny causal-LM pool of full save_pretrained checkpoints: the learned coefficients equal the in-memory run's.
    Progressive distillation's element-wise coefficients of finished blocks go to the checkpoint directory over the
    streamed pool (kept in memory otherwise) and leave with it once the results are written."""
    import datasets
    from hydra import compose, initialize_config_dir

    from adamerge.methods.configs import CONF_DIR
    from adamerge.cli.runner import run
    from tests.test_causal_lm import PROMPTS, char_tokenizer

    paths = _bench("memory_plan_check").build_pool(tmp_path / "pool", hidden=32, intermediate=48, layers=2, vocab=128,
                                                   tasks=2)
    char_tokenizer(paths["pretrained"])
    overrides = ["experiment=causal_lm_qwen25_1p5b", f"modelpool.pretrained={paths['pretrained']}", "trainer=cpu",
                 "modelpool.backbone.dtype=float32", "modelpool.storage_dtype=float32", "method.autocast_dtype=null",
                 "trainer.max_steps=2", "logger=none", "trainer.enable_progress_bar=false", "data.num_workers=0",
                 "~modelpool.finetuned", "~modelpool.heads", "~data.tasks", *method]
    for task, prompts in zip(("alpha", "beta"), PROMPTS.values()):
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": prompts})}).save_to_disk(tmp_path / task)
        overrides += [f"+modelpool.finetuned.{task}={paths[task]}", f"+modelpool.heads.{task}._target_=adamerge.backbones.heads.Identity",
                      f"+data.tasks.{task}.path={tmp_path / task}", f"+data.tasks.{task}.split=test",
                      f"+data.tasks.{task}.preprocessor._target_=adamerge.backbones.hf.PromptPreprocessor",
                      f"+data.tasks.{task}.preprocessor.tokenizer={paths['pretrained']}"]
    rows = {}
    for streaming in ("false", "disk"):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[*overrides, f"modelpool.streaming={streaming}"])
        rows[streaming] = run(cfg, tmp_path / f"run_{streaming}")["rows"][0]
    torch.testing.assert_close(torch.tensor(rows["disk"]["coefficients"]), torch.tensor(rows["false"]["coefficients"]),
                               rtol=0, atol=1e-6)
    record = json.loads((Path(rows["disk"]["export"]) / "merge_config.json").read_text())
    assert record["task_vectors"] == {"streaming": "disk", "compression": None}
    assert "task_vectors" not in json.loads((Path(rows["false"]["export"]) / "merge_config.json").read_text())
    assert not list((tmp_path / "run_disk").rglob("checkpoints"))  # the finished blocks' files went with them


def test_a_streamed_step_runs_every_task_s_token_batch_through_one_per_module_merge(llama_pool):
    """A streamed pool merges module by module; with ``task_batching=auto`` the tasks' token batches (of different
    lengths: right-padded with their attention masks, outputs cropped back) go through one forward, so the merge is
    made once a step, not once per task. The gradient is the in-memory, task-by-task one; so are the experts'
    outputs, taken through one-hot views that copy nothing."""
    from adamerge import build_learned_module
    from adamerge.methods.learned.merged_streamed import expert_backbones

    memory_pool, streamed_pool = _hf_pool(llama_pool), _hf_pool(llama_pool, streaming="disk")
    memory = build_learned_module(memory_pool, "adamerging_layer_wise", "entropy")
    streamed = build_learned_module(streamed_pool, "adamerging_layer_wise", "entropy")
    streamed.set_task_batching("auto")
    assert streamed.merges_per_module and not memory.merges_per_module
    generator = torch.Generator().manual_seed(0)
    batch = {}
    for i, task in enumerate(memory.task_names):
        mask = torch.ones(2, 4 + 2 * i, dtype=torch.long)
        mask[1, -1] = 0  # a padded row of the task's own
        batch[task] = {"inputs": {"input_ids": torch.randint(0, 64, (2, 4 + 2 * i), generator=generator),
                                  "attention_mask": mask}}
    expected = memory.accumulate_gradients(batch, memory.merged.merged_weights())
    got = streamed.accumulate_gradients(batch, None)
    assert streamed.task_batching_used == "joint"
    assert got == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(streamed.merged.coefficients.grad, memory.merged.coefficients.grad, atol=1e-6, rtol=1e-4)
    assert memory.merged.coefficients.grad.abs().max() > 1e-6  # not vacuous
    views = expert_backbones(streamed_pool, streamed_pool.task_vectors())
    inputs = batch[memory.task_names[0]]["inputs"]
    for task in memory.task_names:
        expected = memory_pool.backbone_with(memory_pool.task_vectors(), task)(**inputs).logits
        torch.testing.assert_close(views(task)(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
    assert expert_backbones(memory_pool, memory_pool.task_vectors()) is None


def test_a_band_read_with_theta0_in_hand_equals_one_read_from_both_checkpoints(files):
    """A band of τ_k read alone from the checkpoints, with θ0's rows given by the caller (its float32 module) or read,
    is the same as that band of the whole slice; a float64 θ0 is never replaced by a float32 copy."""
    streamed = _streamed(files)
    name = max(streamed.names, key=lambda n: streamed.pretrained[n].numel())
    whole = streamed.task_slice(name, 1)
    theta0 = streamed.pretrained[name]
    assert theta0.dtype == F64
    for base in (None, theta0[1:3].float() + 1.0):  # a wrong float32 base must be ignored for a float64 θ0
        torch.testing.assert_close(streamed.task_slice(name, 1, (1, 3), base), whole[1:3], rtol=0, atol=0)


def test_per_module_merging_runs_under_autocast(files):
    """Under bfloat16 autocast (16-bit activations and gradients, float32 merged weights) the banded path gives the
    whole merge's outputs and coefficient gradients, to bfloat16's precision."""
    memory, streamed = _in_memory(files), _streamed(files)
    reference = MergedModel(Net().float(), memory, init_value=[0.3, 0.4, 0.5])
    model = StreamedMergedModel(Net().float(), streamed, init_value=[0.3, 0.4, 0.5])
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    grads, outputs = [], []
    for merged in (reference, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = merged(x)
        out.float().square().sum().backward()
        outputs.append(out.float())
        grads.append(merged.coefficients.grad)
    torch.testing.assert_close(outputs[1], outputs[0], atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(grads[1], grads[0], atol=5e-2, rtol=5e-2)


def test_per_module_merging_refuses_a_backbone_that_recomputes_its_layers(llama_pool):
    """Activation checkpointing would run the layers again in the backward, after the per-module merge is over (on
    θ0): a clear error rather than a silently wrong gradient."""
    from adamerge import build_learned_module
    from adamerge.errors import ConfigError

    module = build_learned_module(_hf_pool(llama_pool, streaming="disk"), "adamerging_layer_wise", "entropy")
    module.merged.module.gradient_checkpointing_enable()
    module.merged.module.train()
    inputs = {"input_ids": torch.randint(0, 64, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with pytest.raises(ConfigError, match="checkpointing on"):
        module.merged(**inputs)
    with torch.no_grad():  # evaluation recomputes nothing: allowed
        module.merged(**inputs)


def _saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``run()`` runs the forward (views counted whole)."""
    total = []

    def pack(tensor):
        total.append(tensor.untyped_storage().nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return sum(total), out


@pytest.mark.parametrize("pool_kind", ["streamed", "lora"])
def test_activation_checkpointing_recomputes_each_block_with_its_merge(llama_pool, tmp_path, pool_kind):
    """activation_checkpointing=true over a merge made module by module: each decoder layer keeps only its inputs and
    runs again in the backward with its merge, so the coefficient gradients are those without it, for much less
    kept; a merge formed whole up front is refused (its recomputation would run on θ0)."""
    from adamerge import build_learned_module
    from adamerge.errors import ConfigError

    if pool_kind == "lora":
        from tests.test_lora import _adapter
        paths = {"pretrained": llama_pool["pretrained"]}
        for seed, task in enumerate(("a", "b")):
            paths[task] = _adapter(llama_pool["pretrained"], tmp_path / task, seed + 1, r=2, lora_alpha=4)
        pool = _hf_pool(paths)
    else:
        pool = _hf_pool(llama_pool, streaming="disk")
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    grads, kept = [], []
    for setting in (False, True):
        module = build_learned_module(pool, "adamerging_layer_wise", "entropy")
        module.set_activation_checkpointing(setting)
        merged = module.merged.double()
        with torch.no_grad():
            merged.coefficients.uniform_(0.1, 0.6, generator=torch.Generator().manual_seed(2))
        size, out = _saved_bytes(lambda: merged(**inputs).logits)
        out.square().mean().backward()
        grads.append(merged.coefficients.grad.clone())
        kept.append(size)
    assert len(module.merged.checkpoint_blocks) == 2  # the decoder layers
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-12)
    assert grads[0].abs().min() > 0 and kept[1] < kept[0] / 2, kept

    memory = build_learned_module(_hf_pool(llama_pool), "adamerging_layer_wise", "entropy")
    with pytest.raises(ConfigError, match="activation_checkpointing=true needs a merge made module by module"):
        memory.set_activation_checkpointing(True)
    with pytest.raises(ConfigError, match="activation_checkpointing='model.nowhere' is not a module list"):
        build_learned_module(pool, "adamerging_layer_wise", "entropy").set_activation_checkpointing("model.nowhere")
