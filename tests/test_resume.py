"""Resume after a kill: a comparison killed by SIGKILL while a Concrete method learns, resumed with resume=true,
ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from adamerge.data.datamodule import _AdaptationStream
from adamerge.training.resume import capture_rng, restore_rng
from tests.test_cli import adamerge, adamerge_command, adamerge_env

# Stage 1 (mask meta-learning) for 5 steps, then stage 2 with a *sampled* frozen mask: resuming must restore
# the stage, the sampled mask, the three optimisers, the RNG and the stream position -- and, with a protected task
# under a budget, its multiplier, L_ref and its own stream of protected batches.
SETTINGS = (
    "method.methods=[task_arithmetic,concrete_adamerging_layer_wise]", "protected=demo_digits",
    "++method_overrides.concrete_adamerging_layer_wise.meta_steps=5",
    "++method_overrides.concrete_adamerging_layer_wise.stage2_mask=sample",
    "++method_overrides.concrete_adamerging_layer_wise.mask_lr=0.05",
    "trainer.max_steps=14", "checkpoint.every_n_steps=3", "logger=csv", "trainer.enable_progress_bar=false",
)
VARYING = {"seconds", "peak_memory_mb", "heatmap", "export", "profile"}  # timings


def _kill_after_second_checkpoint(run_dir: Path, zoo: Path) -> None:
    """Start the run and SIGKILL it once the learned method's checkpoint has been replaced once (step 6,
    inside stage 2); the atomic rename gives every saved checkpoint a new inode."""
    checkpoint = run_dir / "concrete_adamerging_layer_wise" / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(adamerge_command(run_dir, zoo, *SETTINGS), env=adamerge_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    seen: set[int] = set()
    deadline = time.monotonic() + 300
    try:
        while len(seen) < 2:
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            try:
                seen.add(checkpoint.stat().st_ino)
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


def _assert_close(actual, expected, where: str = "results") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), where
        for key in expected:
            _assert_close(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            _assert_close(a, e, f"{where}[{index}]")
    elif isinstance(expected, float):
        assert math.isclose(actual, expected, rel_tol=0, abs_tol=1e-6), (where, actual, expected)
    else:
        assert actual == expected, (where, actual, expected)


def _stable(result: dict) -> dict:
    return {key: value for key, value in result.items() if key not in VARYING}


def test_killed_comparison_resumes_to_the_uninterrupted_result(zoo, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    adamerge(reference, zoo, *SETTINGS)
    _kill_after_second_checkpoint(killed, zoo)

    learned = killed / "concrete_adamerging_layer_wise"
    assert not (learned / "results.json").exists() and not (killed / "summary.json").exists()
    static_result = killed / "task_arithmetic" / "results.json"
    kept = static_result.read_bytes()
    saved = torch.load(learned / "checkpoints" / "last.ckpt", weights_only=True)
    assert 5 < saved["global_step"] < 14 and saved["adamerge"]["frozen_mask"] is not None  # killed in stage 2
    assert not any(key.startswith(("merged.module.", "heads.")) for key in saved["state_dict"])

    resumed = adamerge(killed, zoo, *SETTINGS, "resume=true")
    assert "task_arithmetic: finished before the interruption" in resumed.stdout
    assert "concrete_adamerging_layer_wise: resuming from" in resumed.stdout
    assert static_result.read_bytes() == kept

    for method in ("task_arithmetic", "concrete_adamerging_layer_wise"):
        expected = json.loads((reference / method / "results.json").read_text())
        actual = json.loads((killed / method / "results.json").read_text())
        _assert_close(_stable(actual), _stable(expected), method)
    assert len(json.loads((learned / "results.json").read_text())["objective_history"]) == 14
    assert len(json.loads((learned / "results.json").read_text())["protected"]["digits"]["multiplier_history"]) == 14
    summary = json.loads((killed / "summary.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["task_arithmetic", "concrete_adamerging_layer_wise"]
    assert not (learned / "checkpoints").exists()  # removed once results.json is written (checkpoint.keep=false)
    assert (learned / "merged_model" / "model.safetensors").exists()


def test_resume_refuses_other_settings_and_fresh_runs_refuse_leftover_checkpoints(zoo, tmp_path):
    run_dir = tmp_path / "run"
    adamerge(run_dir, zoo, "method=adamerging_task_wise", "trainer.max_steps=2", "logger=none",
             "export.enabled=false", "checkpoint.keep=true")
    changed = adamerge(run_dir, zoo, "method=adamerging_task_wise", "trainer.max_steps=2", "logger=none",
                       "export.enabled=false", "resume=true", "method.lr=0.5", check=False)
    assert changed.returncode == 1 and "with other settings: method.lr (was 0.001)" in changed.stderr
    fresh = adamerge(run_dir, zoo, "method=adamerging_task_wise", "trainer.max_steps=2", "logger=none",
                     "export.enabled=false", check=False)
    assert fresh.returncode == 1 and "pass resume=true" in fresh.stderr


def test_stream_resumes_at_the_step_it_was_saved():
    import numpy as np

    datasets = {"a": np.arange(7), "b": np.arange(5)}

    def batches(stream, count):
        return [{task: rows.tolist() for task, rows in batch.items()} for _, batch in zip(range(count), stream)]

    expected = batches(_AdaptationStream(datasets, batch_size=3, seed=1), 9)
    later = _AdaptationStream(datasets, batch_size=3, seed=1)
    later.start_step = 4
    assert batches(later, 5) == expected[4:]
    assert expected[0] != expected[4]  # the test would pass vacuously on a constant stream


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save({"rng": capture_rng()}, tmp_path / "rng.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(torch.load(tmp_path / "rng.ckpt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


@pytest.mark.parametrize("every", [-1, 1.5])
def test_checkpoint_frequency_must_be_a_count(every):
    from adamerge.training.resume import StepCheckpoint

    with pytest.raises(ValueError, match="every_n_steps"):
        StepCheckpoint("/tmp/unused", every)
