"""Freed host memory goes back to the system (adamerge/training/host_memory.py): with glibc's default dynamic mmap
threshold, blocks freed after a larger one was freed stay in a heap the process keeps; the fixed threshold the
command sets gives them back at once."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from adamerge.training import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

PROBE = textwrap.dedent("""
    import sys, torch
    from adamerge.training.host_memory import return_large_blocks_to_os, release_freed_memory
    def rss():
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
    if sys.argv[1] == "fixed":
        assert return_large_blocks_to_os()
    big = torch.ones(8 << 18); del big  # an 8 MiB block freed: glibc's dynamic threshold rises to it
    base = rss()
    blocks = [torch.ones(1 << 20) for _ in range(100)]  # 100 x 4 MiB, from the heap unless the threshold is fixed
    keep = blocks[-1]; del blocks  # every block freed but the last: the heap's top is in use, it cannot shrink
    if sys.argv[1] == "trim":
        release_freed_memory()
    print((rss() - base) / 2**20)
""")


def _kept_mib(mode: str, **env: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**os.environ, **env})
    return float(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_freed_tensors_go_back_to_the_system_with_the_fixed_threshold_or_a_trim():
    assert _kept_mib("default") > 200  # what the run kept before: the freed 396 MiB stay resident
    assert _kept_mib("fixed") < 40  # the one block still alive (4 MiB) and the interpreter's noise
    assert _kept_mib("trim") < 40  # malloc_trim gives the heap's free pages back after the fact


@pytest.mark.skipif(not GLIBC, reason="glibc's allocator only")
def test_a_threshold_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert host_memory.return_large_blocks_to_os() is False


def test_elsewhere_both_do_nothing(monkeypatch):
    monkeypatch.setattr(host_memory, "_libc", None)
    monkeypatch.setattr(host_memory.platform, "system", lambda: "Darwin")
    assert host_memory.return_large_blocks_to_os() is False
    host_memory.release_freed_memory()  # no error


def test_the_threshold_is_fixed_for_large_models_only(monkeypatch):
    """A small model keeps glibc's dynamic threshold (a fixed one makes every 1 MiB+ allocation an mmap: half again
    the image demo's wall time); a model of LARGE_MODEL_BYTES and up gets it, once the memory plan has sized it."""
    calls = []
    monkeypatch.setattr(host_memory, "return_large_blocks_to_os", lambda: calls.append(1) or True)
    assert host_memory.adapt_to_model(host_memory.LARGE_MODEL_BYTES - 1) is False and calls == []
    assert host_memory.adapt_to_model(host_memory.LARGE_MODEL_BYTES) is True and calls == [1]
