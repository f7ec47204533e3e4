"""One writer per directory, with real processes: a run directory in use is refused with its holder's pid, a lock
left by a dead process is taken over, and two processes asking for the same demo zoo build it once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adamerge.storage.locking import RUN_LOCK, FileLock, LockHeldError, acquire_run_lock, release_run_lock
from tests.test_cli import adamerge, adamerge_env

ENV = adamerge_env()


def _wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"the process ended before {what}: {process.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_second_run_on_the_same_directory_is_refused_and_a_dead_holders_lock_is_taken_over(zoo, tmp_path, capsys):
    run_dir = tmp_path / "run"
    lock = run_dir / RUN_LOCK
    first = subprocess.Popen(
        [sys.executable, "-m", "adamerge.cli.main", f"zoo_dir={zoo}", "num_threads=1", f"hydra.run.dir={run_dir}",
         "method=adamerging_task_wise", "trainer.max_steps=10000", "logger=none", "export.enabled=false",
         "trainer.enable_progress_bar=false"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        # run_config.json is written by the run itself, after Hydra finished writing .hydra/
        _wait_for(lambda: (run_dir / "run_config.json").is_file() and lock.is_file(), first, "the run to start")
        written_by_first = (run_dir / ".hydra" / "config.yaml").read_bytes()
        assert json.loads(lock.read_text())["pid"] == first.pid

        second = adamerge(run_dir, zoo, "method=adamerging_task_wise", "resume=true", "logger=none", check=False)
        assert second.returncode == 1
        assert f"is in use by pid {first.pid} on host" in second.stderr, second.stderr[-2000:]
        assert (run_dir / ".hydra" / "config.yaml").read_bytes() == written_by_first  # refused before Hydra wrote
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    # SIGKILL left the lock file behind; the kernel released the lock itself, so the next process takes it over.
    assert json.loads(lock.read_text())["pid"] == first.pid
    acquire_run_lock(run_dir)
    try:
        assert f"taking over {lock}, left by pid {first.pid}" in capsys.readouterr().err
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        release_run_lock(run_dir)
    assert not lock.exists()  # a clean release leaves nothing to take over


def test_run_lock_is_reentrant_within_a_process_and_refuses_another(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from adamerge.storage.locking import acquire_run_lock; "
         "acquire_run_lock(sys.argv[1]); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeldError, match=f"pid {holder.pid} on host"):
            acquire_run_lock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    acquire_run_lock(tmp_path)
    acquire_run_lock(tmp_path)  # the CLI's guard and the run both hold it
    release_run_lock(tmp_path)
    assert json.loads((tmp_path / RUN_LOCK).read_text())["pid"] == os.getpid()  # still held once
    assert not FileLock(tmp_path / RUN_LOCK).try_acquire()  # flock: another open file of the same path is refused
    release_run_lock(tmp_path)
    assert not (tmp_path / RUN_LOCK).exists()


def test_one_directory_spelled_two_ways_is_one_reentrant_lock(tmp_path):
    """A run directory given with ``..`` (e.g. ``--runs study/text/..``) is the same lock as its plain path: the guard
    and the run of one process share it rather than the run refusing a lock its own process holds."""
    (tmp_path / "runs" / "cell").mkdir(parents=True)
    plain, roundabout = tmp_path / "runs" / "cell", tmp_path / "runs" / "cell" / ".." / "cell"
    acquire_run_lock(roundabout)
    acquire_run_lock(plain)
    release_run_lock(plain)
    assert json.loads((plain / RUN_LOCK).read_text())["pid"] == os.getpid()  # still held once
    release_run_lock(roundabout)
    assert not (plain / RUN_LOCK).exists()


TINY_RECIPE = {"tasks": ["digits"], "train_size": 64, "test_size": 16, "threads": 1,
               "probe": {"C": 1.0, "max_iter": 20}, "finetune": {"steps": 1, "batch_size": 4}}
BUILD = ("import json, sys; from adamerge.demo.zoo import build_demo_zoo; "
         "print('zoo', build_demo_zoo(recipe=json.loads(sys.argv[1])), flush=True)")


def test_two_processes_asking_for_the_same_zoo_build_it_once(tmp_path):
    env = {**ENV, "ADAMERGE_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-c", BUILD, json.dumps(TINY_RECIPE)]
    builder = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    waiter = None
    try:
        line = builder.stdout.readline()
        assert "building" in line, line
        builder.send_signal(signal.SIGSTOP)  # hold the build (and its lock) until the second process waits on it
        waiter = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        message = ""
        while "waiting for" not in message:
            message = waiter.stderr.readline()
            assert message, "the second process ended without waiting"
        assert f"waiting for pid {builder.pid} on host" in message and "building the demo zoo" in message, message
        builder.send_signal(signal.SIGCONT)
        built_out, _ = builder.communicate(timeout=120)
        waited_out, waited_err = waiter.communicate(timeout=120)
    finally:
        builder.kill()
        if waiter is not None:
            waiter.kill()
    assert builder.returncode == 0 and waiter.returncode == 0, waited_err[-2000:]
    assert "building" not in waited_out  # it reused the zoo the first process built
    built = [line.split(" ", 1)[1] for line in (line + built_out).splitlines() if line.startswith("zoo ")]
    reused = [line.split(" ", 1)[1] for line in waited_out.splitlines() if line.startswith("zoo ")]
    assert built == reused and len(built) == 1
    zoo = Path(built[0])
    assert (zoo / "manifest.json").is_file()
    assert sorted(p.name for p in zoo.parent.iterdir()) == [zoo.name]  # no staging dir, no lock file left
