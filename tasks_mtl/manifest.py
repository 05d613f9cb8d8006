"""Directories written whole or not at all, with a checksum of every file.

A checkpoint is written into a sibling `<dir>.tmp/`; each file is flushed to disk (fsync), then
`manifest.json` (size and sha256 of every other file) is written last, and the directory is renamed
into place. During the swap the previous directory waits at `<dir>.old/`, so at any instant one complete
copy exists. A reader checks the files against the manifest before using any of them: a truncated or
altered file is found, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
UNLISTED = {MANIFEST, "done.json"}  # done.json is written beside a finished stage's checkpoint afterwards


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, or its size or checksum differs from the manifest."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path) -> dict[str, dict]:
    """Flush every file of `directory` to disk, then write and flush its manifest (the last file written)."""
    files = sorted(p for p in directory.rglob("*")
                   if p.is_file() and p.relative_to(directory).as_posix() not in UNLISTED)
    entries = {}
    for path in files:
        _fsync(path)
        entries[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = directory / MANIFEST
    with manifest.open("w", encoding="utf-8") as fh:
        json.dump({"files": entries}, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    for folder in sorted({p.parent for p in files} | {directory}):
        _fsync(folder)
    return entries


def verify_manifest(directory: Path, required: bool = False) -> bool:
    """Check every file the manifest lists (present, same size, same sha256). Returns whether a manifest was
    there to check; raises CorruptCheckpointError naming the first bad file, or a missing manifest when
    `required` (a resume save, always written with one)."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        if required:
            raise CorruptCheckpointError(f"{directory}: no {MANIFEST} (the save did not finish)")
        return False
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise CorruptCheckpointError(f"{manifest}: unreadable ({err})") from err
    for name, entry in sorted(entries.items()):
        path = directory / name
        if not path.is_file():
            raise CorruptCheckpointError(f"{directory}: {name} is missing")
        if path.stat().st_size != entry["bytes"]:
            raise CorruptCheckpointError(f"{directory}: {name} has {path.stat().st_size} bytes, the manifest "
                                         f"says {entry['bytes']} (truncated or altered)")
        if sha256_file(path) != entry["sha256"]:
            raise CorruptCheckpointError(f"{directory}: {name} does not match its sha256 in {MANIFEST}")
    return True


def replace_directory(tmp: Path, out: Path) -> Path:
    """Put the finished `tmp` at `out`. The old `out` moves to `<out>.old` first and is deleted after, so a
    crash at any point leaves a complete copy at `out` or at `<out>.old`."""
    old = out.with_name(out.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    _fsync(out.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out
