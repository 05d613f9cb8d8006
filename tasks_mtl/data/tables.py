"""One table per task: every record from the bundled builders or the configured files.

This is what validation checks and what `prepare` deduplicates, so it deliberately keeps
duplicates, conflicting labels and malformed tag sequences: they are for the validation report
to name, not for this module to hide.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tasks_mtl.config import SPLITS, Config, TaskConfig
from tasks_mtl.data.bundled import build_bundled
from tasks_mtl.data.formats import read_records
from tasks_mtl.data.split import split_key, split_of
from tasks_mtl.data.tagging import convert, detect_scheme, scheme_prefixes, split_tag, validate_sequence

DATA_COLUMNS = {  # task type -> the columns a prepared record holds
    "classification": ["text", "label"],
    "pair_classification": ["text", "text_pair", "label"],
    "token_classification": ["tokens", "tags"],
    "mlm": ["text"],
}
META_COLUMNS = ["split", "source", "key"]  # where a record goes, where it came from, what was hashed


def load_task_table(cfg: Config, name: str) -> pd.DataFrame:
    """All records of task `name` with columns DATA_COLUMNS[type] + split, source, key.

    Split files give their own split; an `all` file (and bundled data) is split by the rule.
    Token tags are converted to the task's scheme when the file uses another one; sequences
    that do not parse under the file's scheme are left as they are for validation to report.
    Reader errors propagate as DataFormatError.
    """
    if name not in cfg.tasks:
        raise KeyError(f"unknown task {name!r}; configured tasks: {sorted(cfg.tasks)}")
    task = cfg.tasks[name]
    rows: list[dict] = []
    if task.bundled is not None:
        scheme = task.scheme if task.type == "token_classification" else None
        records = build_bundled(task.bundled, cfg.path(cfg.data.raw_dir), task.type, scheme)
        rows += _with_split(records, None)
    for split in [s for s in (*SPLITS, "all") if s in task.files]:
        rows += _with_split(_read_file(cfg, task, task.files[split]), None if split == "all" else split)
    columns = DATA_COLUMNS[task.type] + META_COLUMNS
    return pd.DataFrame(rows, columns=columns)


def _read_file(cfg: Config, task: TaskConfig, file: Path) -> list[dict]:
    records = read_records(cfg.path(file), task.format, task.type, source_name=Path(file).as_posix())
    if task.type == "token_classification":
        to_scheme(records, task.scheme)
    return records


def to_scheme(records: list[dict], target: str) -> None:
    """Convert the tags of well-formed sequences in place when the file's scheme is not `target`."""
    tags = [t for r in records for t in r["tags"]]
    if {split_tag(t)[0] for t in tags} <= scheme_prefixes(target):
        return  # already written in the target's letters (malformed ones included)
    try:
        source = detect_scheme(tags)
    except ValueError:
        return  # unknown prefixes: validation reports them
    if source == target:
        return
    for record in records:
        if validate_sequence(record["tags"], source) is None:
            record["tags"] = convert(record["tags"], source, target)


def _with_split(records: list[dict], split: str | None) -> list[dict]:
    for record in records:
        record["key"] = split_key(record)
        record["split"] = split or split_of(record["key"])
    return records
