"""trainer=fsdp: θ0 and the task vectors sharded over 2 CPU processes (gloo) by FSDP2 learn exactly what one process
learns, each rank holding half of them; its checkpoints resume, its merge exports, its config composes, and the methods
it cannot shard are refused by name."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from adamerge import load_backbone
from adamerge.errors import ConfigError
from adamerge.methods.learned.merged import MergedModel
from adamerge.pool.checkpoints import load_state_dict
from adamerge.pool.task_vectors import TaskVectors
from adamerge.training.preemption import PREEMPTED_EXIT_CODE
from adamerge.training.sharding import ShardedMergeStrategy, shard_merged_model
from tests import sharding_worker as worker

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> tuple[Path, dict]:
    """Every method of the worker learned on 2 processes, each seeing half of every batch (one run for all tests)."""
    out = tmp_path_factory.mktemp("sharded")
    env = {key: value for key, value in os.environ.items() if key not in ("MASTER_PORT", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_worker.py"), str(out)], env=env, cwd=out,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def single_process(method: str, steps: int = worker.STEPS) -> L.LightningModule:
    """The reference: the same module learned in this process on one device, seeing every batch whole."""
    module = worker.build_module(method)
    worker.fit(module, worker.step_batches(0, 1), steps, "auto", 1)
    return module


@pytest.mark.parametrize("method", list(worker.METHODS))
def test_two_sharded_processes_learn_the_coefficients_of_one(sharded_run, method):
    _, ranks = sharded_run
    reference = single_process(method)
    expected = torch.tensor(reference.coefficients(), dtype=torch.float64)
    assert len(ranks[0][method]["objective"]) == worker.STEPS
    for rank in (0, 1):  # the coefficients are replicated: both ranks end with the same λ, the one process's
        learned = torch.tensor(ranks[rank][method]["coefficients"], dtype=torch.float64)
        assert torch.allclose(learned, expected, rtol=0, atol=1e-6), (rank, learned - expected)
    assert not torch.allclose(expected, torch.tensor(worker.build_module(method).coefficients(), dtype=torch.float64),
                              atol=1e-3)  # it did learn
    # The export of the sharded merge (gathered by both ranks, written by rank 0) is the one process's merge.
    fused = torch.load(sharded_run[0] / f"{method}.fused.pt", weights_only=True)
    for name, tensor in reference.merge_and_unload().state_dict().items():
        assert torch.allclose(fused[name], tensor, rtol=0, atol=1e-6), name


@pytest.mark.parametrize("method", list(worker.METHODS))
def test_each_rank_holds_half_of_the_pretrained_weights_and_task_vectors(sharded_run, method):
    _, ranks = sharded_run
    shards = [ranks[rank][method]["shards"] for rank in (0, 1)]
    for kind in ("pretrained", "task_vectors"):
        total = shards[0][f"{kind}_total"]
        assert total == shards[1][f"{kind}_total"] > 0
        assert shards[0][kind] + shards[1][kind] == total  # each element on exactly one rank
        for shard in shards:  # flattened tensors split evenly, up to one element per tensor
            assert abs(shard[kind] - total / 2) <= 16, (kind, shard[kind], total)
    module = worker.build_module(method)
    merged = module.merged
    # What the unsharded merge keeps on its one device: θ0 and every task vector of every merged tensor.
    assert shards[0]["pretrained_total"] == sum(t.numel() for t in merged.pretrained_tensors().values())
    assert shards[0]["task_vectors_total"] == sum(merged.task_vector(i).numel() for i in range(len(merged.names)))


@pytest.mark.parametrize("method", list(worker.METHODS))
def test_no_rank_forms_the_merged_model_whole_while_learning(sharded_run, method):
    """The default merges module by module: each module gathers its own layer when it runs (forward and backward),
    one layer at a time, and the merged model is never formed whole for a step."""
    _, ranks = sharded_run
    for rank in (0, 1):
        assert ranks[rank][method]["whole_merges"] == 0
        assert ranks[rank][method]["most_gathered"] == 1


def test_a_streamed_pool_is_sharded_layer_by_layer_and_learns_the_same(sharded_run):
    """modelpool.streaming=disk: each layer's task vectors are read from the checkpoints into a block that is sharded
    before the next is read; the run learns the in-memory one-process coefficients, each rank holding half."""
    _, ranks = sharded_run
    single = single_process(worker.RESUMED)
    reference = dict(zip(single.merged.names, torch.tensor(single.coefficients(), dtype=torch.float64)))
    for rank in (0, 1):
        streamed = ranks[rank]["streamed"]
        assert sorted(streamed["names"]) == sorted(reference)  # (read in the checkpoints' order: one row per tensor)
        for name, row in zip(streamed["names"], torch.tensor(streamed["coefficients"], dtype=torch.float64)):
            assert torch.allclose(row, reference[name], rtol=0, atol=1e-6), (rank, name)
        assert streamed["whole_merges"] == 0 and streamed["most_gathered"] == 1
    shards = [ranks[rank]["streamed"]["shards"] for rank in (0, 1)]
    assert shards[0]["task_vectors"] + shards[1]["task_vectors"] == shards[0]["task_vectors_total"]
    assert shards[0]["task_vectors_total"] == ranks[0][worker.RESUMED]["shards"]["task_vectors_total"]


def test_a_pool_streamed_to_the_host_is_refused_under_fsdp(tmp_path):
    module = worker.build_module("adamerging_task_wise", streamed_from=tmp_path)
    module.merged._residency = "host"
    strategy = SimpleNamespace(device_mesh={"data_parallel": SimpleNamespace(device_type="cpu")}, cpu_offload=False)
    with pytest.raises(ConfigError, match="modelpool.streaming=host keeps every task vector on the host"):
        shard_merged_model(module.merged, strategy, "adamerging_task_wise")


@pytest.mark.parametrize("form", ["whole_merge", "shard_grad_op"])
def test_the_whole_merge_form_learns_the_same(sharded_run, form):
    """merge_per_module=false forms every merged tensor once a step (FSDP2's hooks gathering each layer for it), with
    each layer freed after its forward or kept until its backward: the same coefficients."""
    _, ranks = sharded_run
    learned = torch.tensor(ranks[0][form]["coefficients"], dtype=torch.float64)
    reference = torch.tensor(single_process(worker.RESUMED).coefficients(), dtype=torch.float64)
    assert torch.allclose(learned, reference, rtol=0, atol=1e-6)
    assert ranks[0][form]["whole_merges"] >= worker.STEPS


def test_a_sharded_run_resumes_from_its_checkpoint(sharded_run):
    out, ranks = sharded_run
    reference = single_process(worker.RESUMED)
    resumed = torch.tensor(ranks[0]["resumed"]["coefficients"], dtype=torch.float64)
    assert torch.allclose(resumed, torch.tensor(reference.coefficients(), dtype=torch.float64), rtol=0, atol=1e-6)
    # The checkpoint holds what learns and none of the sharded tensors.
    state = torch.load(out / worker.LAST_CHECKPOINT, weights_only=True)["state_dict"]
    assert "merged.coefficients" in state and not any(key.startswith("merged.blocks") for key in state)


def test_unsharded_merges_are_refused_with_the_method_and_the_strategy():
    strategy = ShardedMergeStrategy()
    for method in ("concrete_adamerging_layer_wise", "adarank"):
        module = worker.build_module(method)
        module._trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(ConfigError, match=rf"method '{method}' cannot run with trainer=fsdp"):
            module.configure_model()
    with pytest.raises(ConfigError, match="reshard_after_forward='yes' is invalid"):
        ShardedMergeStrategy(reshard_after_forward="yes")
    with pytest.raises(ConfigError, match="merge_per_module=1 is invalid"):
        ShardedMergeStrategy(merge_per_module=1)
    # A merge that keeps its task vectors in another form (LoRA factors, streamed, compressed) is not re-laid out.
    class LowRankLike(MergedModel):
        pass

    merged = worker.build_module("adamerging_task_wise").merged
    merged.__class__ = LowRankLike
    with pytest.raises(ConfigError, match="keeps its task vectors as LowRankLike .* cannot shard"):
        shard_merged_model(merged, strategy, "adamerging_task_wise")
    # CPU offload moves shards off an accelerator: on the CPU it is refused before the merge is re-laid out.
    module = worker.build_module("adamerging_task_wise")
    on_cpu = SimpleNamespace(device_mesh={"data_parallel": SimpleNamespace(device_type="cpu")}, cpu_offload=True)
    with pytest.raises(ConfigError, match="cpu_offload=true is invalid on the CPU"):
        shard_merged_model(module.merged, on_cpu, "adamerging_task_wise")
    assert type(module.merged) is MergedModel and len(list(module.merged.buffers())) > 1


def test_lightnings_own_sharding_strategies_are_refused():
    module = worker.build_module("adamerging_task_wise")
    for strategy in (L.pytorch.strategies.FSDPStrategy(), L.pytorch.strategies.ModelParallelStrategy()):
        module._trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(ConfigError, match=f"trainer.strategy={type(strategy).__name__} is not supported"):
            module.configure_model()
    assert type(module.merged) is MergedModel  # nothing was re-laid out


def test_cli_composes_trainer_fsdp():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("config", overrides=["trainer=fsdp", "trainer.devices=2", "trainer.strategy.cpu_offload=true"])
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert trainer_cfg["strategy"]["_target_"] == "adamerge.training.sharding.ShardedMergeStrategy"
    strategy = instantiate(trainer_cfg["strategy"])
    assert isinstance(strategy, ShardedMergeStrategy) and strategy.cpu_offload and strategy.reshard_after_forward
    assert strategy.merge_per_module  # the default: no rank forms the merged model whole
    assert trainer_cfg["use_distributed_sampler"] is False and trainer_cfg["devices"] == 2


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=concrete_adamerging_layer_wise"], "method 'concrete_adamerging_layer_wise' cannot run with trainer=fsdp"),
    (["method=adamerging_task_wise", "heads=adapt"], "heads=adapt cannot run with trainer=fsdp"),
])
def test_the_command_refuses_what_it_cannot_shard_before_loading(zoo, tmp_path, overrides, message):
    from tests.test_cli import adamerge

    result = adamerge(tmp_path / "run", zoo, *overrides, "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                      "logger=none", check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "task vectors:" not in result.stdout  # nothing was loaded


@pytest.mark.slow
def test_the_command_learns_exports_and_resumes_after_sigterm_with_trainer_fsdp_on_two_processes(zoo, tmp_path):
    """The normal runner path on 2 CPU processes, merging module by module with activation checkpointing (each MBConv
    stage run again in the backward, its layers gathered again). Uninterrupted, it learns, and rank 0's export
    (gathered from both ranks' shards) behaves as the merge rebuilt unsharded from the recorded coefficients. Stopped
    by a SIGTERM to rank 0, both ranks stop at the step boundary, rank 0 writes the checkpoint, and resume=true
    continues the sharded run to the uninterrupted run's coefficients. (One test: the uninterrupted run serves both.)"""
    from tests.test_cli import adamerge, adamerge_command, adamerge_env

    settings = ("method=adamerging_layer_wise", "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
                "trainer.max_steps=6", "checkpoint.every_n_steps=2", "activation_checkpointing=true", "logger=none",
                "trainer.enable_progress_bar=false", "++method_overrides.adamerging_layer_wise.lr=0.05")
    adamerge(tmp_path / "reference", zoo, *settings)
    reference = json.loads((tmp_path / "reference" / "results.json").read_text())
    assert 0 <= reference["average_accuracy"] <= 1 and len(reference["objective_history"]) == 6
    coefficients = torch.tensor(reference["coefficients"])
    assert not torch.allclose(coefficients, torch.full_like(coefficients, 0.3))  # it learned
    export = tmp_path / "reference" / "merged_model"
    backbone = load_backbone(export)
    backbone.load_state_dict(load_state_dict(zoo / "pretrained.safetensors"))
    finetuned = {t: load_state_dict(zoo / "finetuned" / f"{t}.safetensors") for t in reference["tasks"]}
    merged = MergedModel(backbone, TaskVectors.from_state_dicts(backbone.state_dict(), finetuned),
                         granularity="layer_wise", init_value=0.0).eval()
    with torch.no_grad():
        merged.coefficients.copy_(coefficients)
        images = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(load_backbone(export)(images), merged(images), atol=1e-5, rtol=1e-5)

    settings = (*settings, "export.enabled=false")  # the stopped run's export would not change what it learns
    stopped_dir = tmp_path / "stopped"
    process = subprocess.Popen(adamerge_command(stopped_dir, zoo, *settings), env=adamerge_env(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = stopped_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not checkpoint.exists():
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert torch.load(checkpoint, weights_only=True)["global_step"] < 6
    adamerge(stopped_dir, zoo, *settings, "resume=true")
    resumed = json.loads((stopped_dir / "results.json").read_text())
    assert len(resumed["objective_history"]) == 6
    assert torch.allclose(torch.tensor(resumed["coefficients"]), torch.tensor(reference["coefficients"]), atol=1e-6)
