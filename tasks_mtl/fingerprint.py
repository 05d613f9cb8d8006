"""One fingerprint for every cached output: configuration, data and the code that makes it.

The stage key (train.stage_key), the tokenized cache (tokenization.tokenize) and the Prefect cache of
the tokenize step (flows/steps.tokenize_cache_key) all come from `fingerprint`, so editing model.py, a
task type or a weighting method makes each of them run again instead of reusing an output that the
old code made. The code part is `source_hash`: sha256 over the relative path and bytes of every .py file
of the `tasks_mtl` package (the same tree dvc.yaml lists as a dependency), computed once per process.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent  # the tree whose source the fingerprint covers


@functools.cache
def source_hash(root: Path = PACKAGE_DIR) -> str:
    """sha256 of the package source: each .py file's path relative to `root` and its bytes, sorted by path.
    Cached per process and root (a process runs the code it imported, so later edits are not its code)."""
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix()):
        if "__pycache__" in file.parts:
            continue
        digest.update(file.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def files_hash(files: list[Path], root: Path) -> str:
    """sha256 over each file's path relative to `root` and its bytes, in the order given; a missing file
    counts as its path alone. The identity of data files to pass to `fingerprint` as its inputs."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode("utf-8") + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest() if file.exists() else b"missing")
    return digest.hexdigest()


def fingerprint(inputs: Any, /, **sections: Any) -> str:
    """sha256 of the inputs' identity (a data hash or any JSON-able value), the given config sections
    (JSON-able values, pydantic models dumped first) and the package source."""
    parts = {
        "code": source_hash(PACKAGE_DIR),  # looked up per call: a test may point it at a copy
        "inputs": inputs,
        "config": {name: _plain(value) for name, value in sections.items()},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
