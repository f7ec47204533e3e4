"""Giving freed host memory back to the system (glibc), so a run's resident set follows what it holds.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc raises its mmap threshold every time a large
mmapped block is freed (up to 32 MiB), after which blocks of that size come from the heap, and a heap that is
fragmented is not given back: after loading a model tensor by tensor and running each expert once, a process kept
about 3 GiB more resident than it held (the Qwen2.5-0.5B-shaped bench, bench/llm_scale.py), which is what made
progressive distillation need 3 × one model instead of the model plus one block. A fixed threshold keeps every
large block mmapped (freed at once) -- set for large models only (:func:`adapt_to_model`: its mmaps cost time) --
and :func:`release_freed_memory` trims the heap after a phase that allocated much and kept little. Elsewhere (macOS,
Windows, musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters (glibc's malloc.h)
M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 1 << 20  # blocks from 1 MiB up are mmapped: a tensor of 512 float32 × 512 and up
# The fixed threshold costs every allocation of 1 MiB and up a fresh mmap and its page faults: on the 13 MB image demo
# that was half again the wall time (sys time 22 s against 3 s for 30 steps), for nothing to give back. So the command
# fixes it only for a model at least this large, where a fragmented heap holds gigabytes.
LARGE_MODEL_BYTES = 1 << 30
_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None and platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            return None
    return _libc


def return_large_blocks_to_os(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (and the heap's trim threshold with it) for this process.

    Left alone when the user set ``MALLOC_MMAP_THRESHOLD_`` (glibc's own switch) or when this is not glibc.
    Returns whether the setting took effect."""
    libc = _glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    done = bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold))) and bool(libc.mallopt(M_TRIM_THRESHOLD, int(threshold)))
    log.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, done)
    return done


def adapt_to_model(model_bytes: int) -> bool:
    """:func:`return_large_blocks_to_os` for a model of at least :data:`LARGE_MODEL_BYTES` (as the run will hold it);
    glibc's own dynamic threshold otherwise. Returns whether the threshold was fixed."""
    return model_bytes >= LARGE_MODEL_BYTES and return_large_blocks_to_os()


def release_freed_memory() -> None:
    """Give the heap's free pages back to the system (``malloc_trim``); nothing elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
