"""sha256 manifests: what a directory adamerge wrote held, so a changed, truncated or missing file is caught.

Caches (the demo zoo) carry ``manifest.json``; exports record the same map in ``merge_config.json``'s
``files``. Opening either compares every recorded file with its hash (:func:`find_damage`): a cache that fails
is rebuilt, an export that fails is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from adamerge.storage.atomic import write_atomic

MANIFEST = "manifest.json"


def sha256_of_files(files: Iterable[Path]) -> str:
    """One sha256 over the bytes of ``files``, read in this order (a checkpoint's shards in name order)."""
    h = hashlib.sha256()
    for file in files:
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def file_hashes(directory: Path, exclude: Collection[str] = ()) -> dict[str, str]:
    """sha256 of every file under ``directory`` by relative POSIX path, but those named in ``exclude``."""
    return {
        file.relative_to(directory).as_posix(): sha256_of_files([file])
        for file in sorted(directory.rglob("*"))
        if file.is_file() and file.relative_to(directory).as_posix() not in exclude
    }


@dataclass(frozen=True)
class Damage:
    """The first file of a directory that does not match its manifest."""

    name: str
    problem: str  # "outside" (a recorded path escapes the directory), "missing", "modified", "unrecorded"
    expected: str | None = None
    actual: str | None = None

    def describe(self, directory: Path) -> str:
        what = {"outside": "is recorded but lies outside the directory", "missing": "is missing",
                "unrecorded": "is not in the manifest",
                "modified": f"does not match its recorded sha256 (recorded {str(self.expected)[:16]}…, found "
                            f"{str(self.actual)[:16]}…): modified, truncated or corrupted"}[self.problem]
        return f"{directory / self.name} {what}"


def find_damage(directory: Path, recorded: Mapping[str, str], complete: bool = False,
                exclude: Collection[str] = ()) -> Damage | None:
    """The first recorded file that is missing or whose bytes changed; with ``complete``, also a file present
    but unrecorded (``exclude`` names files that may be there without a hash, such as the manifest itself)."""
    for name, expected in recorded.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return Damage(name, "outside")
        file = directory / name
        if not file.is_file():
            return Damage(name, "missing")
        actual = sha256_of_files([file])
        if actual != expected:
            return Damage(name, "modified", str(expected), actual)
    if complete:
        for file in sorted(directory.rglob("*")):
            name = file.relative_to(directory).as_posix()
            if file.is_file() and name not in recorded and name not in exclude:
                return Damage(name, "unrecorded")
    return None


def write_manifest(directory: Path) -> Path:
    """Record every file of ``directory`` in ``directory/manifest.json`` (written last, atomically)."""
    return write_atomic(directory / MANIFEST, json.dumps(file_hashes(directory, exclude={MANIFEST}), indent=1) + "\n")


def manifest_problem(directory: Path) -> str | None:
    """Why ``directory`` cannot be trusted as written (no manifest, a file changed, missing or added), or None."""
    path = directory / MANIFEST
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return f"{path} is missing"
    except (OSError, ValueError) as error:
        return f"{path} is unreadable ({error})"
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        return f"{path} is not a map of file names to sha256 hashes"
    damage = find_damage(directory, recorded, complete=True, exclude={MANIFEST})
    return damage.describe(directory) if damage is not None else None
