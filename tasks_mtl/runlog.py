"""Where a training stage leaves its results, and its log's format: one place for the trainer that writes
them and the readers (loss report, run report, evaluation) that must not import torch to find them.

Stage `index` (0-based) of a run writes `<output_dir>/<index+1>-<name>/` (its checkpoint) and, beside it,
`<index+1>-<name>.log.csv`: long CSV rows `step,stage,metric,value` (`loss/<task>`, `weight/<task>`,
`lr/<group>`, `tokens_per_s`, ...), appended at each logging step, and `<index+1>-<name>.timing.json`
(`{"seconds": ...}`, the stage's wall time). Time and speed (with the log's `tokens_per_s`) are the only
results that differ between two runs of a stage, so they stay out of the checkpoint and out of `done.json`,
and `.dvcignore` keeps both files out of the `checkpoints` hash: two `dvc repro` runs lock the same output.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from tasks_mtl.config import Config

HEADER = ["step", "stage", "metric", "value"]


def stage_dir(cfg: Config, index: int) -> Path:
    """The checkpoint directory of stage `index`."""
    return cfg.path(cfg.training.output_dir) / f"{index + 1}-{cfg.training.stages[index].name}"


def stage_log(cfg: Config, index: int) -> Path:
    """The log file of stage `index`, beside its checkpoint directory."""
    out = stage_dir(cfg, index)
    return out.with_name(out.name + ".log.csv")


def stage_timing(cfg: Config, index: int) -> Path:
    """The wall-time record of stage `index`, beside its checkpoint directory."""
    out = stage_dir(cfg, index)
    return out.with_name(out.name + ".timing.json")


def append_log(path: Path, step: int, stage: str, metrics: dict[str, float]) -> None:
    """One logging step's metrics as rows of the stage's log (the header first, in a new file)."""
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(HEADER)
        for key, value in sorted(metrics.items()):
            writer.writerow([step, stage, key, f"{value:.6g}"])


def read_logs(cfg: Config) -> Iterator[tuple[int, str, str, float]]:
    """(step, stage, metric, value) of every stage's log that exists, in stage order; a row that does not
    parse (the cut last line of an interrupted stage) is skipped."""
    for index in range(len(cfg.training.stages or [])):
        yield from _rows(stage_log(cfg, index))


def _rows(path: Path) -> Iterator[tuple[int, str, str, float]]:
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                yield int(row["step"]), row["stage"], row["metric"], float(row["value"])
            except (KeyError, TypeError, ValueError):
                continue


def read_stage_log(cfg: Config, index: int) -> dict[int, dict[str, float]]:
    """Stage `index`'s logged metrics by global step (what its `log` callback was given, step by step)."""
    steps: dict[int, dict[str, float]] = {}
    for step, _, metric, value in _rows(stage_log(cfg, index)):
        steps.setdefault(step, {})[metric] = value
    return steps
