"""The leaderboard: one profile trained once per loss weighting (and sampler) of a list, same seed and budget.

Each entry `weighting` or `weighting:sampler` (e.g. `famo`, `equal:temperature`) replaces the weighting
(and sampler) of every multi-task stage that is not a features stage; everything else (data, seed,
stages, steps) stays the profile's. Entries train under `<out>/<entry>/`; a stage that an earlier entry
already trained with the same key (a shared features stage) is copied, not trained again. `budget`
caps the minutes of training each run does itself: at the cap the stage stops, saves, and the run is
scored as far as it got (`cut` in the table). Every entry is scored on the test split and compared with
single-task runs of equal steps (tasks_mtl/baselines.py): delta-m per task and its mean decide the winner.

Writes reports/leaderboard.json and reports/leaderboard.html. `child(name, tags)` (optional) opens one
tracking run per entry and baseline, a context manager yielding an object with `logger()`,
`log_task_metrics`, `log_metrics` and `set_tags` (tasks_mtl.tracking.RunTracker.child): this module
imports no MLflow.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks_mtl.baselines import gain_summary, single_task_baselines
from tasks_mtl.config import Config, load_config
from tasks_mtl.evaluate import evaluate
from tasks_mtl.runlog import stage_dir, stage_log, stage_timing

ChildRun = Callable[[str, dict[str, str]], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Entry:
    weighting: str
    sampler: str | None = None  # None: each stage keeps its own

    @property
    def name(self) -> str:
        return self.weighting + (f"@{self.sampler}" if self.sampler else "")

    @classmethod
    def parse(cls, spec: str) -> Entry:
        weighting, _, sampler = spec.strip().partition(":")
        return cls(weighting, sampler or None)


def entry_config(params: str | Path | None, profile: str | None, overrides: dict[str, Any], base: Config,
                 entry: Entry, out: Path) -> Config:
    """The profile with the entry's weighting and sampler on its multi-task stages, writing under `out`."""
    stages = []
    for s in base.training.stages:
        stage = s.model_dump(mode="json")
        if not s.features_only and len(s.task_names(base.tasks)) > 1:
            if s.weighting != entry.weighting:
                stage |= {"weighting": entry.weighting, "weighting_args": {}}
            if entry.sampler and s.sampler != entry.sampler:
                stage |= {"sampler": entry.sampler, "sampler_args": {}}
        stages.append(stage)
    return load_config(params, profile=profile, overrides={
        **overrides, "training.output_dir": str(out), "reports_dir": str(out / "reports"), "training.stages": stages})


def _copy_done_stage(cfg: Config, index: int, donors: list[Config]) -> float | None:
    """Copy stage `index` from a donor that finished it with the same key; its recorded seconds, or None."""
    from tasks_mtl.train import is_done, stage_key

    if is_done(cfg, index):
        return 0.0
    key = stage_key(cfg, index)
    for donor in donors:
        if is_done(donor, index) and stage_key(donor, index) == key:
            shutil.copytree(stage_dir(donor, index), stage_dir(cfg, index))
            for record in (stage_log, stage_timing):  # its curves and wall time belong to this run too (and to
                if record(donor, index).exists():  # a later entry that copies the stage from this one)
                    shutil.copy2(record(donor, index), record(cfg, index))
            timing = stage_timing(cfg, index)
            return float(json.loads(timing.read_text())["seconds"]) if timing.exists() else 0.0
    return None


def train_run(cfg: Config, budget_minutes: float | None = None, log=None,
              donors: list[Config] | None = None) -> dict[str, Any]:
    """Train every stage of `cfg` within the budget: {checkpoint, steps_done, steps_planned, train_seconds, cut}.

    The budget starts with the first stage that is not `features_only`: a features stage is the same for every
    entry (trained by the first, copied to the others), so counting it would take the first entry's time only."""
    from tasks_mtl.checkpoint import load_state
    from tasks_mtl.conflict import write_conflict_report
    from tasks_mtl.train import stage_steps, train_sizes, train_stage

    deadline = None
    checkpoint, seconds, done, cut = None, 0.0, 0, False
    planned = sum(stage_steps(cfg, s, train_sizes(cfg, s)) for s in cfg.training.stages)
    for index, stage in enumerate(cfg.training.stages):
        if budget_minutes and deadline is None and not stage.features_only:
            deadline = time.time() + 60 * budget_minutes
        copied = _copy_done_stage(cfg, index, donors or [])
        started = time.perf_counter()
        checkpoint = train_stage(cfg, index, log, deadline=deadline)
        seconds += copied if copied is not None else time.perf_counter() - started
        if checkpoint.name.endswith(".resume"):  # the budget ran out inside this stage
            done, cut = done + int(load_state(checkpoint)["step"]), True
            break
        done += stage_steps(cfg, stage, train_sizes(cfg, stage))
    write_conflict_report(cfg)
    return {"checkpoint": str(checkpoint), "steps_done": done, "steps_planned": planned,
            "train_seconds": round(seconds, 1), "cut": cut}


def _score(row: dict[str, Any]) -> float:
    """What ranks a row: mean delta-m, else (no baselines) the mean of each task's first metric."""
    if row.get("mean_delta_m") is not None:
        return float(row["mean_delta_m"])
    firsts = [next(iter(m.values())) for m in row["metrics"].values() if m]
    return sum(firsts) / len(firsts) if firsts else float("-inf")


def run_leaderboard(params: str | Path | None, profile: str | None, entries: list[str], out: Path,
                    steps: int | None = None, budget_minutes: float | None = None, tasks: list[str] | None = None,
                    overrides: dict[str, Any] | None = None, child: ChildRun | None = None) -> dict[str, Any]:
    """Train, score and rank every entry; write reports/leaderboard.{json,html}; return the board."""
    from tasks_mtl.data.prepare import prepare
    from tasks_mtl.leaderboard_report import write_board
    from tasks_mtl.report import read_training_logs
    from tasks_mtl.tokenization import tokenize

    child = child or (lambda name, tags: nullcontext(None))
    out = Path(out).resolve()
    first = load_config(params, profile=profile, overrides=overrides or {})
    scale = {f"training.stages.{i}.steps": steps for i in range(len(first.training.stages))} if steps else {}
    overrides = {**(overrides or {}), **scale}
    base = load_config(params, profile=profile, overrides=overrides)
    if not all((base.path(base.data.prepared_dir) / t / "train.jsonl").exists() for t in base.tasks):
        prepare(base)  # else the prepared splits are used as they are (`mtl prepare` refreshes them)
    tokenize(base)
    runs = [Entry.parse(e) for e in entries]
    for entry in runs:  # an unknown weighting or sampler fails here, before anything trains
        entry_config(params, profile, overrides, base, entry, out / entry.name)
    lower = tuple(base.gates.lower_is_better)

    def tracked(name: str, tags: dict[str, str], work: Callable[[Any], tuple[dict, dict]]) -> dict:
        with child(name, tags) as run:
            metrics, figures = work(run)
            if run is not None:
                run.log_task_metrics(metrics)
                run.log_metrics({k: float(v) for k, v in figures.items() if isinstance(v, (int, float))})
                figures["run_id"] = getattr(run, "run_id", None)
        return figures

    def single(cfg: Config, task: str) -> Path:
        result: dict[str, Any] = {}

        def work(run):
            result.update(train_run(cfg, budget_minutes, run.logger() if run else None))
            return {}, dict(result)
        tracked(f"single-{task}", {"leaderboard": "single", "task": task}, work)
        return Path(result["checkpoint"])

    chosen = [t for t in (list(base.tasks) if tasks is None else tasks) if t in base.tasks]
    baselines = single_task_baselines(params, profile, overrides, base, chosen, out, single)
    rows, donors = [], []
    for entry in runs:
        cfg = entry_config(params, profile, overrides, base, entry, out / entry.name)

        def work(run, cfg=cfg, entry=entry):
            trained = train_run(cfg, budget_minutes, run.logger() if run else None, donors)
            started = time.perf_counter()
            metrics = evaluate(cfg, Path(trained["checkpoint"]))
            row = {"name": entry.name, "weighting": entry.weighting, "sampler": entry.sampler, **trained,
                   "eval_seconds": round(time.perf_counter() - started, 1), "metrics": metrics,
                   **gain_summary(metrics, baselines, lower), "output_dir": str(cfg.path(cfg.training.output_dir)),
                   "curves": read_training_logs(cfg)[0]}  # {"loss"|"weight": {task: [(step, value)]}}
            if run is not None:
                run.set_tags({"leaderboard": "entry", "weighting": entry.weighting, "sampler": entry.sampler or "-"})
            return metrics, row
        rows.append(tracked(entry.name, {"leaderboard": "entry"}, work))
        donors.append(cfg)
    board = {"profile": base.profile, "seed": base.seed, "steps": steps, "budget_minutes": budget_minutes,
             "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
             "single_task": baselines, "rows": sorted(rows, key=_score, reverse=True)}
    board["winner"] = board["rows"][0]["name"] if rows else None
    write_board(base, board)
    return board


def winner_config(params: str | Path | None, profile: str | None, board: dict[str, Any],
                  overrides: dict[str, Any] | None = None) -> tuple[Config, Path, dict]:
    """(the winner's configuration, its checkpoint, its metrics): what registering it needs."""
    row = board["rows"][0]
    first = load_config(params, profile=profile, overrides=overrides or {})
    scale = ({f"training.stages.{i}.steps": board["steps"] for i in range(len(first.training.stages))}
             if board.get("steps") else {})
    overrides = {**(overrides or {}), **scale}
    base = load_config(params, profile=profile, overrides=overrides)
    entry = Entry(row["weighting"], row["sampler"])
    cfg = entry_config(params, profile, overrides, base, entry, Path(row["output_dir"]))
    return cfg, Path(row["checkpoint"]), row["metrics"]
