"""The memory plan: shapes from headers and meta builds, its terms against the real objects, and preflight's
refusal. The plan against measured peak RSS takes a fresh process per pool size (tens of seconds on two cores): that
check is bench/memory_plan_check.py (bench/results/memory_plan_check.md)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from hydra import compose, initialize_config_dir

from adamerge.pool.inventory import InventoryUnavailable, checkpoint_inventory, meta_inventory
from adamerge.pool.memory_plan import plan_memory, smallest_fitting_change
from adamerge.pool.memory_shapes import RunShape, model_shape
from adamerge.methods.configs import CONF_DIR
from adamerge.backbones.heads import Identity
from adamerge.backbones.hf_checkpoints import HFModelPool
from adamerge.cli.run_memory import MemoryPlanError, check_memory_plan, plan_for_pool, sharded_devices

ROOT = Path(__file__).resolve().parent.parent
SPEC = importlib.util.spec_from_file_location("memory_plan_check", ROOT / "bench" / "memory_plan_check.py")
bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(bench)


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory) -> dict[str, Path]:
    return bench.build_pool(tmp_path_factory.mktemp("plan"), hidden=64, intermediate=96, layers=2, vocab=256, tasks=2)


def test_headers_and_meta_build_give_the_checkpoint_s_tensors(pool_dirs, tmp_path):
    loaded = transformers.AutoModelForCausalLM.from_pretrained(pool_dirs["pretrained"]).state_dict()
    inventory = checkpoint_inventory(pool_dirs["pretrained"])
    assert {n: s.shape for n, s in inventory.items()} == {n: tuple(t.shape) for n, t in loaded.items()}
    assert all(spec.dtype == "F32" for spec in inventory.values())
    config = json.loads((pool_dirs["pretrained"] / "config.json").read_text())
    meta = meta_inventory(config, "AutoModelForCausalLM")
    assert {n: s.shape for n, s in meta.items()} == {n: s.shape for n, s in inventory.items()}
    tied = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    tied.save_pretrained(tmp_path / "gpt2")  # save_pretrained drops the tied lm_head; the meta build must too
    assert set(meta_inventory(tied.config.to_dict(), "AutoModelForCausalLM")) == set(checkpoint_inventory(tmp_path / "gpt2"))
    torch.save(loaded, tmp_path / "model.bin")
    with pytest.raises(InventoryUnavailable, match="pickled"):
        checkpoint_inventory(tmp_path / "model.bin")


def test_plan_terms_equal_what_the_pool_holds(pool_dirs):
    finetuned = {t: str(p) for t, p in pool_dirs.items() if t != "pretrained"}
    pool = HFModelPool(backbone={"_target_": "adamerge.backbones.hf.causal_lm", "model": str(pool_dirs["pretrained"])},
                       finetuned=finetuned, heads={t: Identity() for t in finetuned}, storage_dtype="bfloat16",
                       pretrained=str(pool_dirs["pretrained"]), auto_class="AutoModelForCausalLM")
    vectors = pool.task_vectors()
    plan, run, model = plan_for_pool(pool_dirs["pretrained"], finetuned, auto_class="AutoModelForCausalLM",
                                     storage_dtype="bfloat16", batch_size=2, sequence_length=16, on_device=True)
    assert plan.device["task vectors"] == vectors.memory_bytes()
    assert plan.device["frozen model"] == sum(t.numel() * t.element_size() for t in pool.backbone.state_dict().values())
    assert model.largest_tensor == max(v[0].numel() for v in vectors.vectors.values())
    assert model.decoder is not None and model.decoder.layers == 2 and model.decoder.kv_hidden == 32


def test_fitting_settings_are_found_in_order():
    model = model_shape(checkpoint_inventory_like(), config={"hidden_size": 64, "intermediate_size": 128,
                                                             "num_hidden_layers": 2, "num_attention_heads": 4,
                                                             "vocab_size": 1000})
    run = RunShape(num_tasks=4, storage_bytes=4, checkpoint_bytes=model.model_bytes, activation_bytes=4,
                   batch_size=64, sequence_length=256, tasks_per_step=4)
    plan = plan_memory(model, run, on_device=False)
    limit = plan_memory(model, RunShape(**{**run.__dict__, "storage_bytes": 2, "tasks_per_step": 1,
                                           "batch_size": 8}), on_device=False).host_peak
    changes, fitted = smallest_fitting_change(run, lambda r: plan_memory(model, r, on_device=False), limit, None)
    # Cheapest first: what costs nothing of the result, then reading instead of holding, then smaller batches.
    assert changes == ["modelpool.storage_dtype=bfloat16", "task_batching=sequential", "modelpool.streaming=disk",
                       "activation_checkpointing=true", "data.batch_size=8"]
    assert fitted.host_peak <= limit < plan.host_peak
    assert smallest_fitting_change(run, lambda r: plan_memory(model, r, on_device=False), 1.0, None) is None
    # Eight tasks' vectors on one GPU: streaming them is the whole fix, the batch stays as it is.
    many = RunShape(num_tasks=8, storage_bytes=2, checkpoint_bytes=model.model_bytes, activation_bytes=4, batch_size=1,
                    sequence_length=16)
    on_gpu = plan_memory(model, many, on_device=True)
    streamed = plan_memory(model, dataclasses.replace(many, streaming="disk"), on_device=True)
    assert streamed.device_peak < on_gpu.device_peak
    changes, fitted = smallest_fitting_change(many, lambda r: plan_memory(model, r, on_device=True), None,
                                              streamed.device_peak)
    assert changes == ["modelpool.streaming=disk"] and fitted.device_peak <= streamed.device_peak
    # Progressive distillation's element-wise coefficients: tensor-wise ones are the last resort.
    element = dataclasses.replace(many, streaming="disk", activation_checkpointing=True, element_coefficients=True)
    tensor = plan_memory(model, dataclasses.replace(element, element_coefficients=False), on_device=True,
                         working_set="progressive")
    changes, _ = smallest_fitting_change(element, lambda r: plan_memory(model, r, on_device=True,
                                                                        working_set="progressive"),
                                         None, tensor.device_peak)
    assert changes == ["method.granularity=tensor"]


def test_trainer_fsdp_plans_the_pretrained_weights_and_task_vectors_split_over_the_devices(pool_dirs):
    from adamerge.pool.inventory import TensorSpec

    model = model_shape({f"model.layers.{i}.mlp.up_proj.weight": TensorSpec((128, 64), "F32") for i in range(16)})
    run = RunShape(num_tasks=4, storage_bytes=4, checkpoint_bytes=model.model_bytes, activation_bytes=4, batch_size=8,
                   sequence_length=0)
    whole = plan_memory(model, run, on_device=True)
    merged_whole = plan_memory(model, run, on_device=True, devices=8, sharded=True, sharded_per_module=False)
    split = plan_memory(model, run, on_device=True, devices=8, sharded=True)  # merged module by module: the default
    assert split.device_count == 8 and split.device_peak < merged_whole.device_peak < whole.device_peak
    for plan in (split, merged_whole):
        assert plan.device["task vectors"] == -(-whole.device["task vectors"] // 8)
        assert plan.device["frozen model"] == -(-whole.device["frozen model"] // 8)  # every tensor here is merged
    assert merged_whole.device["merged weights"] == whole.device["merged weights"]  # formed whole on every rank
    assert merged_whole.device["their gradients"] == whole.device["their gradients"]
    assert merged_whole.device["gathered layers"] == 2 * model.largest_tensor * 4 * (1 + 4)  # θ0, 4 τ; and the next
    assert split.device["merged weights"] == split.device["their gradients"] == 0  # never whole
    assert split.device["gathered layers"] == model.largest_tensor * 4 * (1 + 4)  # the layer its module runs
    assert split.device["merge band"] == model.largest_tensor * 12
    # One process per device on the node, each loading the pool on the host: 8 host copies, said so.
    assert split.host_peak == 8 * whole.host_peak and "8 processes on one node" in split.render()
    # Streamed from disk: the same shards on the devices, and no task vector on the host of any rank.
    streamed = plan_memory(model, dataclasses.replace(run, streaming="disk"), on_device=True, devices=8, sharded=True)
    assert streamed.device == split.device
    assert streamed.host_peak < split.host_peak
    assert all(value == 0 for term, value in streamed.host.items() if "task vectors" in term)
    # The command plans trainer=fsdp on the devices it names (and on the CPU nothing is sharded: one process's plan).
    assert sharded_devices(_run_config(pool_dirs, "trainer=fsdp", "trainer.devices=4"), on_device=True) == 4
    assert sharded_devices(_run_config(pool_dirs, "trainer=fsdp", "trainer.devices=4"), on_device=False) == 1
    assert sharded_devices(_run_config(pool_dirs, "trainer=ddp", "trainer.devices=4"), on_device=True) == 1


def checkpoint_inventory_like() -> dict:
    from adamerge.pool.inventory import TensorSpec

    return {"model.embed_tokens.weight": TensorSpec((1000, 64), "F32"),
            **{f"model.layers.{i}.mlp.up_proj.weight": TensorSpec((128, 64), "F32") for i in range(2)}}


def _run_config(pool_dirs, *overrides: str):
    tasks = [t for t in pool_dirs if t != "pretrained"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[
            "experiment=causal_lm_qwen25_1p5b", f"modelpool.pretrained={pool_dirs['pretrained']}",
            "modelpool.backbone.dtype=float32", "modelpool.storage_dtype=float32", "method.autocast_dtype=null",
            "~modelpool.finetuned", "~modelpool.heads", "~data.tasks", "data.batch_size=32",
            *[f"+modelpool.finetuned.{t}={pool_dirs[t]}" for t in tasks],
            *[f"+data.tasks.{t}.preprocessor.max_length=512" for t in tasks], *overrides])


def test_preflight_prints_the_plan_and_refuses_what_does_not_fit(pool_dirs, monkeypatch, capsys):
    cfg = _run_config(pool_dirs)
    plan = check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=False)
    out = capsys.readouterr().out
    assert "memory plan (before loading; 2 tasks, learning on the CPU)" in out and "activations" in out
    smaller = plan_for_pool(pool_dirs["pretrained"], {t: pool_dirs[t] for t in ("alpha", "beta")},
                            auto_class="AutoModelForCausalLM", storage_dtype="bfloat16", batch_size=4,
                            sequence_length=512)[0]
    monkeypatch.setattr("adamerge.cli.run_memory.memory_limits",
                        lambda on_device, headroom: ((smaller.host_peak + plan.host_peak) / 2, None))
    with pytest.raises(MemoryPlanError, match=r"exceeds 90% of the free memory \(host .*it fits with "
                                              r"modelpool.storage_dtype=bfloat16 modelpool.streaming=disk .*"
                                              r"memory_plan.force=true runs it anyway"):
        check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=False)
    assert check_memory_plan(_run_config(pool_dirs, "memory_plan.force=true"), ["adamerging_layer_wise"], on_device=False)
    assert "running anyway (memory_plan.force=true)" in capsys.readouterr().out
    monkeypatch.setattr("adamerge.cli.run_memory.memory_limits", lambda on_device, headroom: (1.0, None))
    with pytest.raises(MemoryPlanError, match="no storage dtype, task batching, streaming, activation checkpointing "
                                              "or batch size makes it fit: merge fewer tasks or use a larger machine"):
        check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=False)
    # On a GPU: the device's limit is checked too, and sharding is among the ways out.
    monkeypatch.setattr("adamerge.cli.run_memory.memory_limits", lambda on_device, headroom: (1e15, None))
    on_gpu = check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=True)
    monkeypatch.setattr("adamerge.cli.run_memory.memory_limits",
                        lambda on_device, headroom: (1e15, on_gpu.device_peak / 2))
    with pytest.raises(MemoryPlanError, match=r"\(device .* > .*\); it fits with .*memory_plan.force=true"):
        check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=True)
    monkeypatch.setattr("adamerge.cli.run_memory.memory_limits", lambda on_device, headroom: (1e15, 1.0))
    with pytest.raises(MemoryPlanError, match=r"shard over several GPUs \(trainer=fsdp trainer.devices=N\)"):
        check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=True)


def test_a_plan_without_shapes_says_why(pool_dirs, tmp_path, capsys):
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.bin")
    cfg = _run_config(pool_dirs, f"modelpool.pretrained={tmp_path / 'model.bin'}")
    assert check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=False) is None
    out = capsys.readouterr().out
    assert "memory plan: not made" in out and "pickled checkpoint" in out


def test_a_progressive_run_is_planned_as_its_block_steps_and_a_mixed_one_as_the_larger_step(pool_dirs, capsys):
    """Progressive distillation holds one block and one task's cached inputs a step, whatever task_batching says: its
    run is planned so (a 70B run must not be refused by the end-to-end plan); with another learned method beside it,
    the end-to-end step is the larger and is planned."""
    from adamerge.cli.run_memory import learned_working_set

    assert learned_working_set(["progressive_distillation"], {}) == ("progressive", True)  # the authors' default
    assert learned_working_set(["progressive_distillation"],
                               {"progressive_distillation": {"granularity": "tensor"}}) == ("progressive", False)
    assert learned_working_set(["progressive_distillation", "adamerging_layer_wise"], {}) == ("end_to_end", False)
    assert learned_working_set([], {}) == ("end_to_end", False)

    cfg = _run_config(pool_dirs, "task_batching=joint")
    end_to_end = check_memory_plan(cfg, ["adamerging_layer_wise"], on_device=False)
    tensor = check_memory_plan(cfg, ["progressive_distillation"], on_device=False,
                               hyperparameters={"progressive_distillation": {"granularity": "tensor"}})
    element = check_memory_plan(cfg, ["progressive_distillation"], on_device=False)
    mixed = check_memory_plan(cfg, ["progressive_distillation", "adamerging_layer_wise"], on_device=False)
    capsys.readouterr()
    # Block steps never form the vocabulary's logits, and hold one task's batch through one block.
    assert "step: logits" in end_to_end.host and "step: logits" not in tensor.host
    assert tensor.host["step: activations"] < end_to_end.host["step: activations"] / 2
    assert tensor.host_peak < end_to_end.host_peak and mixed.host_peak == end_to_end.host_peak
    assert element.host["step: optimiser"] > tensor.host["step: optimiser"]  # K coefficients per element of the blocks
