"""`mtl prepare`: per-task train/validation/test JSONL, deduplicated, conflicts dropped.

Runs after validation and refuses to run when the last validation report says it failed.
Output rows are ordered by sha1 of their split key (a fixed pseudo-shuffle, the same on every
machine) and written as canonical JSON, so the prepared directory is byte-for-byte
reproducible and DVC only re-runs downstream stages when the data really changed.
"""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from tasks_mtl.config import SPLITS, Config
from tasks_mtl.data.ingest import write_atomic
from tasks_mtl.data.tables import DATA_COLUMNS, load_task_table

# Columns that identify "the same input"; two records with the same input and different
# labels conflict. Pairs need both texts (one sentence has an is_next and a not_next partner).
CONFLICT_COLUMNS = {
    "classification": ["text"],
    "pair_classification": ["text", "text_pair"],
    "token_classification": ["key"],
    "mlm": [],  # no labels, nothing to conflict
}
# A record duplicated across split files is kept in the first split here: a text seen in test
# must not also be trained on.
SPLIT_PRIORITY = {split: i for i, split in enumerate(("test", "validation", "train"))}
SUMMARY_NAME = "summary.json"
VALIDATION_REPORT = "validation.json"


class ValidationFailedError(RuntimeError):
    """The last validation report failed; preparing that data would train on bad input."""


def check_validation(cfg: Config) -> None:
    """Raise when reports/validation.json exists and does not say success."""
    report = cfg.path(cfg.reports_dir) / VALIDATION_REPORT
    if not report.exists():
        return
    try:
        success = json.loads(report.read_text(encoding="utf-8")).get("success")
    except (json.JSONDecodeError, AttributeError):
        message = f"{report} is not a readable validation report; run `mtl validate`"
        raise ValidationFailedError(message) from None
    if success is False:
        raise ValidationFailedError(
            f"data validation failed (see {report}); fix the data and run `mtl validate` before `mtl prepare`"
        )


def prepare_task(cfg: Config, name: str) -> tuple[dict[str, list[str]], dict[str, dict[str, int]]]:
    """Canonical JSON lines per split for one task, and per-split counts of what was removed."""
    task = cfg.tasks[name]
    columns = DATA_COLUMNS[task.type]
    table = load_task_table(cfg, name)
    table["record"] = [
        json.dumps(dict(zip(columns, values)), ensure_ascii=False, sort_keys=True)
        for values in table[columns].itertuples(index=False, name=None)
    ]
    table["priority"] = table["split"].map(SPLIT_PRIORITY)
    table = table.sort_values("priority", kind="stable")

    duplicated = table["record"].duplicated(keep="first")
    removed_duplicates = table.loc[duplicated, "split"].value_counts()
    table = table.loc[~duplicated]

    conflicting = _conflicts(table, CONFLICT_COLUMNS[task.type])
    removed_conflicts = table.loc[conflicting, "split"].value_counts()
    conflict_texts = table.loc[conflicting].groupby("split")["key"].nunique()
    table = table.loc[~conflicting]

    table["order"] = [hashlib.sha1(key.encode("utf-8")).hexdigest() for key in table["key"]]
    table = table.sort_values(["order", "record"], kind="stable")

    lines: dict[str, list[str]] = {}
    stats: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        records = table.loc[table["split"] == split, "record"].tolist()
        cap = _cap(cfg, name, split)
        kept = records if cap is None else records[:cap]
        lines[split] = kept
        stats[split] = {
            "rows": len(kept),
            "duplicates_removed": int(removed_duplicates.get(split, 0)),
            "conflicts_dropped": int(removed_conflicts.get(split, 0)),
            "conflicting_texts": int(conflict_texts.get(split, 0)),
            "capped": len(records) - len(kept),
        }
    return lines, stats


def prepare(cfg: Config) -> dict:
    """Write prepared/<task>/<split>.jsonl and prepared/summary.json; returns the summary."""
    check_validation(cfg)
    out = cfg.path(cfg.data.prepared_dir)
    summary: dict[str, dict[str, dict[str, int]]] = {}
    for name in cfg.tasks:
        lines, summary[name] = prepare_task(cfg, name)
        for split, records in lines.items():
            write_atomic(out / name / f"{split}.jsonl", "".join(f"{r}\n" for r in records).encode("utf-8"))
    text = json.dumps(summary, ensure_ascii=False, sort_keys=True, indent=2) + "\n"
    write_atomic(out / SUMMARY_NAME, text.encode("utf-8"))
    return summary


def read_split(cfg: Config, task: str, split: str) -> list[dict]:
    """Records of one prepared split (data columns only)."""
    path = cfg.path(cfg.data.prepared_dir) / task / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; run `mtl prepare` first")
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _conflicts(table: pd.DataFrame, columns: list[str]) -> pd.Series:
    """True for every row whose input occurs with more than one distinct record (label/tags)."""
    if not columns or table.empty:
        return pd.Series(False, index=table.index)
    rows = table[columns].itertuples(index=False, name=None)
    inputs = [json.dumps(values, ensure_ascii=False) for values in rows]
    distinct = table.assign(_input=inputs).groupby("_input")["record"].transform("nunique")
    return distinct > 1


def _cap(cfg: Config, name: str, split: str) -> int | None:
    task = cfg.tasks[name]
    cap = task.max_rows.get(split)
    if task.type == "mlm" and split == "train":
        cap = cfg.data.mlm_sentences if cap is None else min(cap, cfg.data.mlm_sentences)
    return cap
