"""Preemption: SIGTERM / SIGINT to a real ``adamerge`` process mid-learning saves a checkpoint at the step boundary,
exits with PREEMPTED_EXIT_CODE and prints the command that resumes it; a second signal exits at once."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from adamerge.training.preemption import PREEMPTED_EXIT_CODE
from tests.test_cli import adamerge_command, adamerge_env
from tests.test_resume import _assert_close, _stable

MAX_STEPS = 30
# No periodic checkpoint falls inside the run: whatever is saved, the signal saved. The CSV logger writes its
# metrics every step, which tells the test how far learning has gone.
SETTINGS = ("method=adamerging_task_wise", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_n_steps=1000",
            "logger=csv", "+logger.flush_logs_every_n_steps=1", "trainer.enable_progress_bar=false",
            "export.enabled=false")
ENV = adamerge_env()


def _start(run_dir: Path, zoo: Path, *settings: str) -> subprocess.Popen:
    return subprocess.Popen(adamerge_command(run_dir, zoo, *settings), env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)


def _steps_logged(run_dir: Path) -> int:
    metrics = list(run_dir.glob("*/version_*/metrics.csv"))
    return max(len(metrics[0].read_text().splitlines()) - 1, 0) if metrics else 0


def _wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int, extra: Path | None = None) -> None:
    deadline = time.monotonic() + 240
    while _steps_logged(run_dir) < steps or (extra is not None and not extra.exists()):
        if process.poll() is not None:
            raise AssertionError(f"the run ended before it could be signalled:\n{process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "learning did not get under way"
        time.sleep(0.02)


def _read_until(process: subprocess.Popen, marker: str) -> str:
    seen = ""
    while marker not in seen:
        line = process.stderr.readline()
        assert line, f"the run ended without printing {marker!r}:\n{seen[-3000:]}"
        seen += line
    return seen


def test_sigterm_mid_learning_saves_exits_75_and_the_printed_command_resumes_to_the_same_result(zoo, tmp_path):
    reference_dir, stopped_dir = tmp_path / "reference", tmp_path / "stopped"
    reference = _start(reference_dir, zoo, *SETTINGS)  # uninterrupted, alongside
    stopped = _start(stopped_dir, zoo, *SETTINGS)
    try:
        _wait_for_steps(stopped, stopped_dir, 5)
        stopped.send_signal(signal.SIGTERM)
        out, err = stopped.communicate(timeout=120)
    finally:
        stopped.kill()
    assert stopped.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "received SIGTERM" in err and "Traceback" not in err
    checkpoint = stopped_dir / "checkpoints" / "last.ckpt"
    saved_step = torch.load(checkpoint, weights_only=True)["global_step"]
    assert 3 <= saved_step < MAX_STEPS, saved_step  # mid-learning, at a step boundary the signal chose
    assert f"stopped by SIGTERM at learning step {saved_step}; progress saved to {checkpoint}" in err
    assert not (stopped_dir / "results.json").exists()
    assert not list((stopped_dir / "checkpoints").glob(".*tmp"))

    # The one printed line is the exact command: run as printed (with this interpreter), it finishes the run.
    lines = [line for line in err.splitlines() if line.startswith("adamerge ") and "resume=true" in line]
    assert len(lines) == 1, err[-2000:]
    command = shlex.split(lines[0])
    assert command[-2:] == ["resume=true", f"hydra.run.dir={stopped_dir.absolute()}"]
    resumed = subprocess.run([sys.executable, "-m", "adamerge.cli.main", *command[1:]], env=ENV, capture_output=True,
                             text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint}" in resumed.stdout

    reference.communicate(timeout=300)
    assert reference.returncode == 0
    expected = json.loads((reference_dir / "results.json").read_text())
    actual = json.loads((stopped_dir / "results.json").read_text())
    assert len(actual["objective_history"]) == MAX_STEPS
    _assert_close(actual["coefficients"], expected["coefficients"], "coefficients")  # to 1e-6
    _assert_close(_stable(actual), _stable(expected))


def test_a_second_sigint_exits_at_once_and_keeps_the_last_checkpoint(zoo, tmp_path):
    run_dir = tmp_path / "run"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    process = _start(run_dir, zoo, *SETTINGS[:1], "trainer.max_steps=500", "checkpoint.every_n_steps=2",
                     *SETTINGS[3:])
    try:
        _wait_for_steps(process, run_dir, 3, extra=checkpoint)
        process.send_signal(signal.SIGINT)
        # Python runs a handler once for signals that arrive together: the second is sent once the first was handled.
        first = _read_until(process, "received SIGINT:")
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
        err = first + err
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGINT, err[-3000:]
    assert "received SIGINT again: exiting now" in err and "Traceback" not in err
    saved = torch.load(checkpoint, weights_only=True)  # whole: the hard exit never tears it
    assert saved["global_step"] >= 2 and saved["global_step"] % 2 == 0  # a periodic one, not a stop checkpoint
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.ckpt"]  # no temporary file left
    assert not (run_dir / "results.json").exists()
