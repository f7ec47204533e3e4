"""Progressive layer-wise distillation (adamerge/methods/learned/progressive.py): blocks found, inputs captured and propagated,
each merged block learning to reproduce its experts' blocks."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn

from adamerge.errors import ConfigError
from adamerge.methods.learned.adamerging import build_learned
from adamerge.methods.learned.progressive import block_of, find_blocks
from adamerge.pool.task_vectors import TaskVectors
from tests.helpers import TensorSplits, finetuned_states, make_heads


class _Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * torch.tanh(self.fc(self.norm(x)))


class BlockNet(nn.Module):
    """Stem, a list of residual blocks called with a keyword argument, and a final norm, like a transformer.
    ``skip=True`` feeds every block the stem's output added to the previous block's: not a plain sequence."""

    def __init__(self, dim: int = 6, depth: int = 3, skip: bool = False):
        super().__init__()
        self.stem = nn.Linear(4, dim)
        self.blocks = nn.ModuleList([_Block(dim) for _ in range(depth)])
        self.final = nn.LayerNorm(dim)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = h = self.stem(x)
        for block in self.blocks:
            h = block(h + h0 if self.skip else h, scale=0.5)
        return self.final(h)


def _pool(num_tasks: int = 2, skip: bool = False, scale: float = 0.4, blocks_only: bool = False):
    torch.manual_seed(0)
    backbone = BlockNet(skip=skip).eval()
    states = finetuned_states(backbone, num_tasks, scale=scale)
    if blocks_only:  # fine-tuned inside the blocks only: the stem and the final norm stay pretrained
        states = {t: {n: v if n.startswith("blocks.") else backbone.state_dict()[n] for n, v in s.items()}
                  for t, s in states.items()}
    vectors = TaskVectors.from_state_dicts(backbone.state_dict(), states)
    heads = make_heads(vectors.task_names)
    splits = TensorSplits({t: torch.randn(24, 4, generator=torch.Generator().manual_seed(i))
                           for i, t in enumerate(vectors.task_names)}, batch_size=8)
    return backbone, vectors, heads, splits


class _Steps(torch.utils.data.IterableDataset):
    """The trainer's batches: progressive distillation draws from its own cached activations, not from these."""

    def __init__(self, tasks, steps):
        self.tasks, self.steps = tasks, steps

    def __iter__(self):
        for _ in range(self.steps):
            yield {t: {"inputs": torch.zeros(1, 4)} for t in self.tasks}


def _learn(backbone, vectors, heads, splits, *, dtype=None, **hparams):
    """Progressive distillation learned to its last step (``dtype``: the module's, float64 in the exactness tests)."""
    module = build_learned("progressive_distillation", copy.deepcopy(backbone), vectors, heads, **hparams)
    if dtype is not None:
        module = module.to(dtype)
    _fit(module, splits, module.total_steps)
    return module


def _expert(backbone, vectors, task):
    model = copy.deepcopy(backbone)
    model.load_state_dict(vectors.state_dict_from_deltas(vectors.task_vector(task)), strict=False)
    return model


def test_blocks_are_the_largest_module_list_and_tensors_know_their_block():
    backbone = BlockNet()
    path, blocks = find_blocks(backbone)
    assert path == "blocks" and len(blocks) == 3
    names = list(backbone.state_dict())
    assert block_of(names, "blocks", 3) == [None, None, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, None, None]
    with pytest.raises(ConfigError, match="blocks='layers' is not a module list"):
        find_blocks(backbone, "layers")
    with pytest.raises(ConfigError, match="has no nn.ModuleList"):
        find_blocks(nn.Linear(2, 2))


@pytest.mark.parametrize("granularity", ["element", "tensor"])
def test_one_expert_is_distilled_back_exactly(granularity):
    """K = 1: the merge that reproduces the only expert block by block is the expert itself (α = 1 everywhere)."""
    backbone, vectors, heads, splits = _pool(num_tasks=1, blocks_only=True)
    # Outside the blocks the merge stays at its start (task arithmetic at 0.3, as in the authors' code): the expert was
    # fine-tuned inside the blocks only, so matching it there is matching it everywhere.
    steps = 150
    module = _learn(backbone, vectors, heads, splits, granularity=granularity, init_value=0.3, lr=0.1,
                    steps_per_block=steps, samples_per_task=24, batch_size=24)
    losses = [h["objective"] for h in module.history]
    assert all(losses[b * steps + steps - 1] < 0.05 * losses[b * steps] for b in range(3))
    x = splits.inputs["task0"]
    with torch.no_grad():
        expert = _expert(backbone, vectors, "task0")(x)
        gap, error = (backbone(x) - expert).abs().max(), (module.merged(x) - expert).abs().max()
    assert error < 0.03 * gap  # from the pretrained model's distance to the expert to a few percent of it


def test_each_block_learns_and_only_its_own_coefficients_move():
    backbone, vectors, heads, splits = _pool(num_tasks=3)
    module = build_learned("progressive_distillation", copy.deepcopy(backbone), vectors, heads, granularity="tensor",
                           lr=0.02, steps_per_block=15, samples_per_task=16, batch_size=16)
    module.distillation_source = splits
    start = module.merged.coefficients.detach().clone()
    snapshots = []
    trainer = L.Trainer(max_steps=module.total_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[_Snapshot(snapshots, every=15)])
    trainer.fit(module, torch.utils.data.DataLoader(_Steps(module.task_names, module.total_steps), batch_size=None))
    assert module.global_step == 45 and len(snapshots) == 3
    blocks = torch.tensor([-1 if b is None else b for b in module.tensor_block])
    for block, after in enumerate(snapshots):
        before = start if block == 0 else snapshots[block - 1]
        moved = (after != before).any(dim=1)
        assert moved[blocks == block].all() and not moved[blocks != block].any()
    assert torch.equal(snapshots[-1][blocks == -1], start[blocks == -1])  # outside the blocks: task arithmetic, fixed
    for block in range(3):  # the block loss falls within each block
        losses = [h["objective"] for h in module.history if h["block"] == block]
        assert sum(losses[-3:]) < sum(losses[:3])


class _Snapshot(L.Callback):
    def __init__(self, out, every):
        self.out, self.every = out, every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.out.append(module.merged.coefficients.detach().clone())


@pytest.mark.parametrize("skip", [False, True])
def test_propagated_inputs_equal_a_fresh_capture_or_it_falls_back(skip, caplog):
    """A plain sequence of blocks propagates each block's output to the next; one that is not (skip connections from
    the stem) is detected on the first propagation and re-captured by a forward through the blocks before."""
    backbone, vectors, heads, splits = _pool(skip=skip)
    module = _learn(backbone, vectors, heads, splits, granularity="tensor", lr=0.05, steps_per_block=3,
                    samples_per_task=8, batch_size=8)
    assert module._propagates is (not skip)
    assert ("not a plain sequence" in caplog.text) is skip
    # Whichever way, the cached inputs of the last block are the merged model's own activations there, and the
    # expert's inputs its own: a capture (each module merging itself, one-hot rows for the expert) gives the same.
    rows = module._cache["rows"]["task0"]
    cached = module._cache["tasks"]["task0"]
    torch.testing.assert_close(cached["merged"][0][0], module._capture(2, rows)[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached["expert"][0][0], module._capture(2, rows, task=0)[0][0], atol=1e-5, rtol=1e-5)
    # ... and a forward of the whole merge formed up front.
    from adamerge.methods.learned.progressive_activations import _StopForward

    reached = []

    def stop(_module, args):
        reached.append(args[0])
        raise _StopForward

    handle = module._block(2).register_forward_pre_hook(stop)
    with pytest.raises(_StopForward):
        torch.func.functional_call(module.merged.module, module.merged.merged_weights(), (rows,))
    handle.remove()
    torch.testing.assert_close(cached["merged"][0][0], reached[0], atol=1e-5, rtol=1e-5)


def test_residual_base_starts_from_the_base_and_keeps_it_outside_the_blocks():
    backbone, vectors, heads, splits = _pool()
    module = build_learned("progressive_distillation", copy.deepcopy(backbone), vectors, heads, base="iso_cts",
                           granularity="tensor")
    from adamerge.methods.registry import get_method

    spec = get_method("iso_cts")
    expected = spec.fn(vectors, **spec.resolve_hparams({}))
    for name, weight in module.merged.merged_weights().items():
        torch.testing.assert_close(weight, vectors.pretrained[name] + expected[name], atol=1e-5, rtol=1e-5)


def test_protected_tasks_and_alignment_vectors_are_refused_clearly():
    from adamerge.training.alignment import AlignmentVector

    backbone, vectors, heads, _ = _pool()
    module = build_learned("progressive_distillation", backbone, vectors, heads)
    with pytest.raises(ConfigError, match="cannot take protected tasks"):
        module.protect([])
    alignment = AlignmentVector({name: torch.zeros_like(v[0]) for name, v in vectors.vectors.items()}, 0.9, 0.6)
    with pytest.raises(ConfigError, match="cannot take an alignment vector"):
        build_learned("progressive_distillation", backbone, vectors, heads, alignment=alignment)


@pytest.mark.parametrize(("hparams", "message"), [
    ({"granularity": "row"}, "granularity"),
    ({"steps_per_block": 0}, "steps_per_block"),
    ({"samples_per_task": 2.5}, "samples_per_task"),
    ({"blocks": 3}, "blocks"),
])
def test_bad_settings_name_the_setting(hparams, message):
    from adamerge.methods.registry import get_method

    spec = get_method("progressive_distillation")
    with pytest.raises(ConfigError, match=message):
        spec.validate(2, spec.resolve_hparams(hparams))


def test_cached_text_batches_of_different_lengths_are_padded_after_their_rows():
    """Tokenised batches padded each to its own longest row concatenate, shorter ones zero-padded (masked) on the right."""
    from adamerge.methods.learned.block_arguments import concat_rows

    short = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    long = {"input_ids": torch.tensor([[8, 9, 10, 11, 12]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    rows = concat_rows([short, long])
    assert rows["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5]
    images = concat_rows([torch.zeros(2, 3, 4, 4), torch.ones(1, 3, 4, 4)])
    assert images.shape == (3, 3, 4, 4)


def test_learning_holds_one_block_and_element_coefficients_only_inside_the_blocks(monkeypatch):
    """Memory at LLM scale: element-wise coefficients exist for the blocks' tensors only (the stem and the final norm,
    never learned, keep their init row), and no step forms the whole merged model or a whole expert model -- a
    capture needs only the tensors before its block."""
    backbone, vectors, heads, splits = _pool(num_tasks=2)
    module = build_learned("progressive_distillation", copy.deepcopy(backbone), vectors, heads, granularity="element",
                           steps_per_block=2, samples_per_task=8, batch_size=8)
    merged = module.merged
    inside = [i for i, b in enumerate(module.tensor_block) if b is not None]
    assert len(inside) < len(merged.names) and sorted(merged.element_tensors) == inside
    # What learns is the first block's coefficients alone: the later blocks have nothing allocated yet.
    assert sum(p.numel() for p in module.trainable_parameters()) == \
        vectors.num_tasks * sum(merged.pretrained_tensors()[merged.names[i]].numel() for i in module.block_tensors(0))
    touched: list[int] = []
    monkeypatch.setattr(type(merged), "merged_weights", lambda *a, **k: pytest.fail("whole merged model formed"))
    original = module.expert_weights

    def expert_weights(task, block=None, indices=None):
        weights = original(task, block, indices)
        touched.append(len(weights))
        return weights

    module.expert_weights = expert_weights
    module.distillation_source = splits
    L.Trainer(max_steps=module.total_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False).fit(
        module, torch.utils.data.DataLoader(_Steps(module.task_names, module.total_steps), batch_size=None))
    assert touched and max(touched) < len(merged.names)
    # At the end: the last block learning, the others finished; together, every tensor inside the blocks.
    assert sorted([*merged.finished.indices(), *module.block_tensors(module.num_blocks - 1)]) == inside
    outside = [i for i in range(len(merged.names)) if i not in merged.element_tensors]
    rows = merged.coefficients_as_list()
    assert all(rows[i] == pytest.approx([0.3, 0.3]) for i in outside)  # the authors' task-arithmetic weight, not learned
    assert any(abs(rows[i][0] - 0.3) > 1e-4 for i in inside)


def test_distillation_rows_of_differently_padded_batches_are_padded_to_the_longest():
    """A causal LM's prompt batches are each padded to their own longest prompt: the cached rows right-pad them."""
    from adamerge.methods.learned.block_arguments import concat_rows

    short = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.tensor([[1, 1, 1]])}
    long = {"input_ids": torch.tensor([[8, 9, 10, 11, 12]]), "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    rows = concat_rows([short, long])
    assert rows["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]
    assert concat_rows([torch.ones(2, 3), torch.zeros(1, 3)]).shape == (3, 3)


# ------------------------------------------------- element-wise coefficients held one block at a time, and resumed


def _fit(module, splits, max_steps, ckpt_path=None, state_dir=None):
    """Learn to ``max_steps`` (from ``ckpt_path`` when given) through a Trainer; returns the trainer."""
    module.distillation_source = splits
    if state_dir is not None:
        module.merged.merge_per_module = True  # what a streamed pool sets: finished blocks then go to disk
        module.use_state_directory(state_dir)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(_Steps(module.task_names, module.total_steps), batch_size=None),
                ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return trainer


def _element_module(backbone, vectors, heads):
    return build_learned("progressive_distillation", copy.deepcopy(backbone), vectors, heads, granularity="element",
                         lr=0.05, steps_per_block=3, samples_per_task=8, batch_size=8)


def _all_coefficients(module):
    merged = module.merged
    return {i: merged.tensor_coefficients(i).detach().clone() for i in sorted(merged.element_tensors)}


def test_finished_blocks_written_to_disk_give_the_merge_kept_in_memory(tmp_path):
    """Over a streamed pool the finished blocks' element-wise coefficients are written out, one file per block, and
    read back when merged: the learning and the merge are those of the run that keeps them in memory."""
    backbone, vectors, heads, splits = _pool(num_tasks=2)
    kept = _element_module(backbone, vectors, heads)
    _fit(kept, splits, kept.total_steps)
    spilled = _element_module(backbone, vectors, heads)
    _fit(spilled, splits, spilled.total_steps, state_dir=tmp_path)
    blocks = sorted(p.name for p in (tmp_path / "element_coefficients").iterdir())
    assert blocks == ["block_00000", "block_00001"]  # the last block is still the learning one
    assert [p.name for p in sorted((tmp_path / "element_coefficients" / "block_00000").iterdir())] == \
        [f"tensor_{i:05d}.bin" for i in spilled.block_tensors(0)]
    assert not spilled.merged.finished.state()["memory"]  # nothing finished is held in memory
    expected, got = _all_coefficients(kept), _all_coefficients(spilled)
    assert expected.keys() == got.keys()
    for index in expected:
        torch.testing.assert_close(got[index], expected[index], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(spilled.merged.merged_weights(), kept.merged.merged_weights(), rtol=0, atol=0)
    first = spilled.block_tensors(0)[0]
    path = tmp_path / "element_coefficients" / "block_00000" / f"tensor_{first:05d}.bin"
    path.write_bytes(path.read_bytes()[:-4])  # a torn file is named, never read short
    with pytest.raises(Exception, match=f"cannot read the learned coefficients of merged tensor {first} from .*"
                                        f"tensor_{first:05d}.bin .*bytes, expected"):
        spilled.merged.merged_weights()


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_run_stopped_inside_a_block_resumes_to_the_uninterrupted_coefficients(tmp_path, on_disk):
    """A checkpoint taken in the third block (two finished, one learning) holds the learning block's coefficients and
    Adam's moments, and the finished ones (in it, or as the files it names); a fresh module resumed from it ends
    where the run that never stopped ends."""
    backbone, vectors, heads, splits = _pool(num_tasks=2)
    reference = _element_module(backbone, vectors, heads)
    _fit(reference, splits, reference.total_steps, state_dir=tmp_path / "reference" if on_disk else None)

    stopped = _element_module(backbone, vectors, heads)
    trainer = _fit(stopped, splits, 7, state_dir=tmp_path / "run" if on_disk else None)  # block 2, its second step
    assert stopped.merged.learning_block == 2
    trainer.save_checkpoint(tmp_path / "last.ckpt", weights_only=False)
    resumed = _element_module(backbone, vectors, heads)
    _fit(resumed, splits, resumed.total_steps, ckpt_path=str(tmp_path / "last.ckpt"),
         state_dir=tmp_path / "run" if on_disk else None)
    assert resumed.global_step == reference.global_step == 9
    expected, got = _all_coefficients(reference), _all_coefficients(resumed)
    for index in expected:  # a resumed block re-captures its inputs: float32 rounding apart
        torch.testing.assert_close(got[index], expected[index], rtol=0, atol=1e-5)


def test_the_element_wise_sum_reads_one_slice_at_a_time_and_has_the_plain_gradient():
    """Σ_k α_k ⊙ τ_k with slices fetched one at a time, forward and backward: the value and gradient of the plain
    formula (float64 gradcheck), and each slice fetched once per pass."""
    from adamerge.methods.learned.progressive_merged import _ElementwiseTaskSum

    tau = torch.randn(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fetched = []

    def fetch(index, k):
        fetched.append(k)
        return tau[k]

    alpha = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(_ElementwiseTaskSum.apply(alpha, fetch, 0), (alpha * tau).sum(0), rtol=0, atol=1e-12)
    assert fetched == [0, 1, 2]
    assert torch.autograd.gradcheck(lambda a: _ElementwiseTaskSum.apply(a, fetch, 0), (alpha,))
    fetched.clear()
    _ElementwiseTaskSum.apply(alpha, fetch, 0).pow(2).sum().backward()
    assert fetched == [0, 1, 2, 0, 1, 2]  # the backward fetched the slices again: none was kept
