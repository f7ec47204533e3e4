"""End to end: the `adamerge` command on a reduced demo zoo (same code path as the real demo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adamerge import load_backbone
from adamerge.pool.checkpoints import load_state_dict
from adamerge.demo.zoo import build_demo_zoo
from adamerge.methods.learned.merged import MergedModel
from adamerge.backbones.heads import linear_head
from adamerge.pool.task_vectors import TaskVectors

# Big enough that fine-tuning matters (each fine-tuned model clearly beats the probe) and that task arithmetic
# loses to interference, small enough for CI (about 80 s to build on one core; one thread, as REDUCED_RECIPE says why).
LEARNING_RECIPE = {
    "threads": 1,
    "train_size": 640,
    "test_size": 160,
    "finetune": {"steps": 120, "batch_size": 32, "lr": 1e-4, "optimizer": "adam", "schedule": "cosine"},
}
RESULT_KEYS = {"method", "config", "tasks", "accuracy", "average_accuracy", "coefficients", "seconds", "peak_memory_mb"}


def adamerge_env() -> dict[str, str]:
    """The environment of every ``adamerge`` command a test starts: wandb offline, no hub, no warnings."""
    return {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def adamerge_command(run_dir: Path, zoo: Path, *overrides: str) -> list[str]:
    """The ``adamerge`` command line of a test run on ``zoo`` into ``run_dir`` (``--`` flags go before the overrides),
    for tests that start it themselves (to signal or kill it); :func:`adamerge` runs it to the end."""
    flags = [o for o in overrides if o.startswith("--")]
    overrides = tuple(o for o in overrides if not o.startswith("--"))
    return [sys.executable, "-m", "adamerge.cli.main", *flags, f"zoo_dir={zoo}", "num_threads=1",
            f"hydra.run.dir={run_dir}", "data.eval_batch_size=64", "data.batch_size=8", *overrides]


def adamerge(run_dir: Path, zoo: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(adamerge_command(run_dir, zoo, *overrides), capture_output=True, text=True,
                            env=adamerge_env(), timeout=600, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"adamerge failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def test_comparison_run_learns_writes_schema_and_exports(zoo, tmp_path):
    run_dir = tmp_path / "run"
    adamerge(
        run_dir, zoo,
        "method.methods=[pretrained,individual,task_arithmetic,ties,adamerging_layer_wise]",
        "trainer.max_steps=12", "++method_overrides.adamerging_layer_wise.lr=0.05", "logger=wandb",
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    tasks = json.loads((zoo / "zoo.json").read_text())["tasks"]
    assert summary["tasks"] == tasks
    assert [r["method"] for r in summary["rows"]] == ["pretrained", "individual", "task_arithmetic", "ties", "adamerging_layer_wise"]
    for row in summary["rows"]:
        # Agreement with each task's expert is measured for every method, data-free ones included.
        assert set(row) == {"method", "accuracy", "average_accuracy", "expert_agreement"} and set(row["accuracy"]) == set(tasks)
        assert set(row["expert_agreement"]) == set(tasks)
        assert abs(row["average_accuracy"] - sum(row["accuracy"].values()) / len(tasks)) < 1e-9
    assert "| adamerging_layer_wise |" in (run_dir / "summary.md").read_text()

    result = json.loads((run_dir / "adamerging_layer_wise" / "results.json").read_text())
    assert RESULT_KEYS <= set(result)
    coefficients = torch.tensor(result["coefficients"])
    assert coefficients.shape[1] == len(tasks) and coefficients.shape[0] > 100  # [layer][task]
    assert coefficients.min() >= 0 and coefficients.max() <= 1
    history = result["objective_history"]
    assert len(history) == 12 and sum(history[-3:]) / 3 < sum(history[:3]) / 3  # the objective decreases
    assert len(result["entropy_history"]) == 12 and set(result["label_free"]) == set(tasks)
    assert (run_dir / "adamerging_layer_wise" / "coefficients.png").stat().st_size > 1000
    assert any((run_dir / "adamerging_layer_wise" / "wandb").glob("offline-run-*"))

    # The export reloads, and equals the merge rebuilt from the recorded coefficients.
    export = run_dir / "adamerging_layer_wise" / "merged_model"
    config = json.loads((export / "merge_config.json").read_text())
    assert config["method"] == "adamerging_layer_wise" and config["coefficients"] == result["coefficients"]
    assert len(config["sources"]["digits"]["sha256"]) == 64 and "torch" in config["versions"]
    reloaded = load_backbone(export)
    backbone = load_backbone(export)  # a second copy to hold θ0
    backbone.load_state_dict(load_state_dict(zoo / "pretrained.safetensors"))
    finetuned = {t: load_state_dict(zoo / "finetuned" / f"{t}.safetensors") for t in tasks}
    vectors = TaskVectors.from_state_dicts(backbone.state_dict(), finetuned)
    merged = MergedModel(backbone, vectors, granularity="layer_wise", init_value=0.0).eval()
    with torch.no_grad():
        merged.coefficients.copy_(coefficients)
        images = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(reloaded(images), merged(images), atol=1e-5, rtol=1e-5)
        head = linear_head(zoo / "heads" / "digits.safetensors")
        assert torch.equal(head(reloaded(images)).argmax(-1), head(merged(images)).argmax(-1))

    for row in ("pretrained", "task_arithmetic"):
        assert set(json.loads((run_dir / row / "results.json").read_text())) >= RESULT_KEYS


def test_concrete_methods_run_and_save_masks(zoo, tmp_path):
    adamerge(tmp_path / "ta", zoo, "method=concrete_task_arithmetic", "trainer.max_steps=3", "logger=tensorboard")
    config = json.loads((tmp_path / "ta" / "merged_model" / "merge_config.json").read_text())
    assert 0 <= config["mask"]["kept_fraction_total"] <= 1
    assert config["mask"]["memory"]["logits_mb"] > 0
    assert any((tmp_path / "ta").rglob("events.out.tfevents.*"))  # the TensorBoard logger wrote its run
    assert (tmp_path / "ta" / "concrete_mask.safetensors").exists()

    adamerge(tmp_path / "am", zoo, "method=concrete_adamerging_layer_wise", "method.meta_steps=2",
             "trainer.max_steps=4", "logger=none")
    result = json.loads((tmp_path / "am" / "results.json").read_text())
    assert len(result["entropy_history"]) == 4
    mask = tmp_path / "am" / "concrete_mask.safetensors"
    assert mask.exists()
    # Stage 2 alone, starting from the saved mask.
    # A value typed on the command line wins over an experiment's method_overrides, even the file default.
    adamerge(tmp_path / "am2", zoo, "method=concrete_adamerging_layer_wise", f"method.mask_path={mask}",
             "trainer.max_steps=2", "logger=none", "++method_overrides.concrete_adamerging_layer_wise.mask_lr=0.5",
             "method.mask_lr=0.001")
    result = json.loads((tmp_path / "am2" / "results.json").read_text())
    assert result["method"] == "concrete_adamerging_layer_wise" and result["config"]["mask_lr"] == 0.001


def test_a_method_gives_the_same_result_alone_and_after_others_in_a_comparison(zoo, tmp_path):
    """Each method starts from the run's seed: a Concrete mask (sampled from the global generator) must not depend
    on the learned method that ran before it and drew from the same generators."""
    common = ("trainer.max_steps=3", "logger=none", "export.enabled=false")
    adamerge(tmp_path / "alone", zoo, "method=concrete_task_arithmetic", *common)
    adamerge(tmp_path / "after", zoo, "method=compare", "method.methods=[adamerging_task_wise,concrete_task_arithmetic]",
             *common)
    alone = json.loads((tmp_path / "alone" / "results.json").read_text())
    after = json.loads((tmp_path / "after" / "concrete_task_arithmetic" / "results.json").read_text())
    assert after["objective_history"] == alone["objective_history"]
    assert after["accuracy"] == alone["accuracy"]


def test_bad_checkpoint_fails_clearly_and_writes_no_export(zoo, tmp_path):
    broken = tmp_path / "broken.safetensors"
    state = load_state_dict(zoo / "finetuned" / "digits.safetensors")
    state["_conv_stem.weight"] = state["_conv_stem.weight"][:, :2].contiguous()
    from safetensors.torch import save_file

    save_file(state, str(broken))
    result = adamerge(tmp_path / "bad", zoo, "method=adamerging_task_wise", f"modelpool.finetuned.digits={broken}",
                      "logger=none", check=False)
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "broken.safetensors" in message and "_conv_stem.weight" in message
    assert not (tmp_path / "bad" / "merged_model").exists() and not (tmp_path / "bad" / "results.json").exists()


def test_ddp_on_two_cpu_processes(zoo, tmp_path):
    run_dir = tmp_path / "ddp"
    adamerge(run_dir, zoo, "method=adamerging_task_wise", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
             "trainer.max_steps=2", "logger=none")
    result = json.loads((run_dir / "results.json").read_text())
    assert len(result["coefficients"]) == 4 and 0 <= result["average_accuracy"] <= 1
    assert (run_dir / "merged_model" / "model.safetensors").exists()


@pytest.mark.slow
def test_default_settings_learned_merging_beats_static(tmp_path):
    """The project's promise on a fresh (reduced) zoo with the default objective and the demo's settings: the
    recommended learned merge (a Concrete mask over TSV-M) beats every data-free merge here, Iso-C and
    Iso-CTS included, and agrees with the experts more than its start; plain layer-wise AdaMerging beats task
    arithmetic, its starting point, and the pretrained model."""
    zoo = build_demo_zoo(tmp_path / "cache", recipe=LEARNING_RECIPE, progress=False)
    run_dir = tmp_path / "run"
    data_free = ("weight_average", "task_arithmetic", "ties", "tsv_merge", "iso_c", "iso_cts")
    adamerge(run_dir, zoo, f"method.methods=[pretrained,{','.join(data_free)},adamerging_layer_wise,"
             "concrete_task_arithmetic_on_tsv_merge]", "trainer.max_steps=50", "logger=none", "export.enabled=false",
             "data.batch_size=16")
    rows = {row["method"]: row["average_accuracy"] for row in json.loads((run_dir / "summary.json").read_text())["rows"]}
    assert rows["concrete_task_arithmetic_on_tsv_merge"] > max(rows[m] for m in data_free), rows
    assert rows["adamerging_layer_wise"] > max(rows["task_arithmetic"], rows["pretrained"]), rows

    result = json.loads((run_dir / "concrete_task_arithmetic_on_tsv_merge" / "results.json").read_text())
    assert result["objective"]["name"] == "weighted_sum"
    assert [t["name"] for t in result["objective"]["terms"]] == ["expert_kl", "information_maximization"]
    tasks = result["tasks"]
    assert set(result["label_free"]) == set(tasks)
    for signals in result["label_free"].values():
        assert set(signals) == {"objective_start", "objective_end", "prediction_changed", "expert_agreement_start",
                                "expert_agreement_end"}
        assert 0 <= signals["prediction_changed"] <= 1
    agreement = result["unlabeled"]["expert_agreement"]
    assert set(agreement) == set(tasks) and all(0 <= v <= 1 for v in agreement.values())
    assert sum(s["expert_agreement_end"] for s in result["label_free"].values()) > sum(
        s["expert_agreement_start"] for s in result["label_free"].values())
    assert sum(s["objective_end"] for s in result["label_free"].values()) < sum(
        s["objective_start"] for s in result["label_free"].values())
    assert len(result["objective_history"]) == 50


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=adamerging_layer_wise", "method.lr=abc"], "hyperparameter lr='abc' is invalid"),
    (["method=adamerging_layer_wise", "trainer.max_steps=0"], "trainer.max_steps=0 is invalid"),
    (["method=concrete_adamerging_layer_wise", "method.mask_path=/nowhere/mask.safetensors"], "mask_path"),
    (["method=ties", "method.top_k=1.5"], "top_k=1.5 is invalid"),
    (["objective=entropie"], "objective/entropie"),  # Hydra's own message lists the available objectives
    (["objective=confident_entropy", "objective.threshold=2"], "threshold"),
    (["protected=demo_digits", "protected.tasks.digits.budget=-1"], "protected.tasks.digits.budget=-1 is invalid"),
])
def test_bad_settings_fail_before_loading_with_one_clean_message(zoo, tmp_path, overrides, message):
    result = adamerge(tmp_path / "run", zoo, *overrides, "logger=none", check=False)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "run" / "results.json").exists() and "task vectors:" not in result.stdout


def test_refused_export_leaves_the_run_directory_untouched_even_by_hydra(zoo, tmp_path):
    """Hydra writes .hydra/ into the run dir before the job starts: the guard callback refuses first."""
    run_dir = tmp_path / "kept"
    kept = {run_dir / "merged_model" / "model.safetensors": b"weights", run_dir / "coefficients.png": b"png",
            run_dir / ".hydra" / "config.yaml": b"the kept run's config"}
    for path, content in kept.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    result = adamerge(run_dir, zoo, "method=adamerging_task_wise", "logger=none", check=False)
    assert result.returncode == 1
    assert "merged_model already exists; set export.overwrite=true" in result.stderr and "Traceback" not in result.stderr
    assert {path: path.read_bytes() for path in kept} == kept
    assert sorted(p.name for p in run_dir.rglob("*") if p.is_file()) == ["coefficients.png", "config.yaml", "model.safetensors"]
