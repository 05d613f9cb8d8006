"""Single-task baselines for delta-m: each task trained alone on the multi-task run's stage list.

A single-task run keeps the stages (steps, learning rates, freezing) but trains one task, so its
optimizer takes the same number of steps as the multi-task run: equal compute per run, all of it
on one task, on its plain loss (`equal`). A features stage is kept only for a task whose head has n-gram
features. Used by
`benchmarks/mtl_gain.py` and `mtl leaderboard` (tasks_mtl/leaderboard.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks_mtl.config import Config, load_config
from tasks_mtl.evaluate import evaluate, multi_task_gain

Metrics = dict[str, dict[str, float]]


def single_task_config(params: str | Path | None, profile: str | None, overrides: dict[str, Any], base: Config,
                       task: str, out: Path) -> Config:
    """The configuration of `task` trained alone, writing under `out`; `base` is the multi-task run's."""
    stages = [s.model_dump(mode="json") | {"tasks": [task], "weighting": "equal", "weighting_args": {}}
              for s in base.training.stages
              if not s.features_only or base.tasks[task].has_features()]  # a features stage needs features
    return load_config(params, profile=profile, overrides={
        **overrides, "training.output_dir": str(out), "reports_dir": str(out / "reports"), "training.stages": stages})


def single_task_metrics(cfg: Config, task: str, checkpoint: Path) -> dict[str, float]:
    """The task's test metrics from its single-task checkpoint (only the task it trained is scored)."""
    alone = cfg.model_copy(update={"tasks": {task: cfg.tasks[task]}})
    return evaluate(alone, checkpoint)[task]


def single_task_baselines(params: str | Path | None, profile: str | None, overrides: dict[str, Any], base: Config,
                          tasks: list[str], out: Path, train: Callable[[Config, str], Path]) -> Metrics:
    """{task: test metrics} of each task trained alone under `out/single-<task>`; `train(cfg, task)` trains one
    configuration and returns the checkpoint to score (finished stages are reused by the trainer)."""
    single = {}
    for task in tasks:
        cfg = single_task_config(params, profile, overrides, base, task, Path(out) / f"single-{task}")
        single[task] = single_task_metrics(cfg, task, train(cfg, task))
    return single


def gain_summary(multi: Metrics, single: Metrics, lower_is_better: tuple[str, ...]) -> dict[str, Any]:
    """delta-m per task (%) against the single-task runs, and their mean (None without baselines)."""
    gains = multi_task_gain(multi, single, lower_is_better)
    return {"delta_m": {t: round(v, 2) for t, v in gains.items()},
            "mean_delta_m": round(sum(gains.values()) / len(gains), 2) if gains else None}
