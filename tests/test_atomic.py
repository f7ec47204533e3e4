"""A full disk loses nothing: ENOSPC injected at the write leaves the previous file intact, no partial file behind,
and a DiskFullError (an AdamergeError and an OSError) naming the path and the bytes it needed."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from adamerge.storage.atomic import DiskFullError, write_atomic
from adamerge.errors import AdamergeError
from adamerge.export.writer import export_merged
from adamerge.reporting.results import write_json, write_summary
from adamerge.training.resume import AtomicCheckpointIO
from tests.helpers import TinyConvNet


@pytest.fixture
def full_disk_under(monkeypatch):
    """``full(root)``: from now on, writes to files under ``root`` fill the disk: the first write of each file
    gets half its bytes out, then the device reports ENOSPC. Other writes (pytest's own) pass through."""
    original = os.write
    roots: list[str] = []
    writes: dict[int, int] = {}

    def write(fd: int, data) -> int:
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            target = ""
        if not any(target.startswith(root) for root in roots):
            return original(fd, data)
        writes[fd] = writes.get(fd, 0) + 1
        if writes[fd] == 1 and len(data) > 1:
            return original(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write)
    return lambda root: roots.append(str(Path(root).resolve()))


def _listing(directory: Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*"))


def test_write_atomic_keeps_the_previous_file_and_names_path_and_size(tmp_path, full_disk_under):
    target = tmp_path / "results.json"
    write_atomic(target, "previous\n")
    full_disk_under(tmp_path)
    payload = b"x" * 5000
    with pytest.raises(DiskFullError) as raised:
        write_atomic(target, payload)
    assert isinstance(raised.value, AdamergeError) and isinstance(raised.value, OSError)
    assert raised.value.errno == errno.ENOSPC and raised.value.needed == 5000
    assert f"no space left to write {target}: it needs 5,000 bytes" in str(raised.value)
    assert target.read_text() == "previous\n"
    assert _listing(tmp_path) == ["results.json"]  # the half-written temporary file is gone


def test_results_and_summaries_survive_a_full_disk(tmp_path, full_disk_under):
    row = {"method": "m", "accuracy": {"a": 0.5}, "average_accuracy": 0.5}
    write_json(tmp_path / "results.json", row)
    write_summary(tmp_path, [row], ["a"])
    before = {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)}
    full_disk_under(tmp_path)
    better = {**row, "accuracy": {"a": 0.9}, "average_accuracy": 0.9}
    with pytest.raises(DiskFullError, match="results.json"):
        write_json(tmp_path / "results.json", better)
    with pytest.raises(DiskFullError, match="summary"):
        write_summary(tmp_path, [better], ["a"])
    assert {name: (tmp_path / name).read_bytes() for name in _listing(tmp_path)} == before


def test_a_checkpoint_that_does_not_fit_keeps_the_last_one(tmp_path, full_disk_under):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(3)}}, path)
    full_disk_under(tmp_path)
    with pytest.raises(DiskFullError, match=r"last\.ckpt: it needs [\d,]+ bytes") as raised:
        io.save_checkpoint({"global_step": 6, "state_dict": {"w": torch.ones(1000)}}, path)
    assert raised.value.needed > 4000  # the serialised checkpoint, 1000 float32 and more
    assert torch.load(path, weights_only=True)["global_step"] == 4
    assert _listing(path.parent) == ["last.ckpt"]


def test_an_export_that_does_not_fit_keeps_the_previous_export(tmp_path, monkeypatch):
    import adamerge.export.writer

    directory = tmp_path / "merged_model"
    export_merged(TinyConvNet(5), directory, merge_config={"method": "first"}, model_card=False)
    before = {name: (directory / name).read_bytes() for name in _listing(directory)}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(adamerge.export.writer, "save_model", disk_full)
    model = TinyConvNet(5)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with pytest.raises(DiskFullError, match=f"{directory}: it needs at least {weights:,} bytes"):
        export_merged(model, directory, merge_config={"method": "second"}, overwrite=True, model_card=False)
    assert {name: (directory / name).read_bytes() for name in _listing(directory)} == before
    assert _listing(tmp_path) == ["merged_model", *(f"merged_model/{name}" for name in sorted(before))]
