"""`mtl leaderboard`: the weighting leaderboard (tasks_mtl/leaderboard.py) with its MLflow runs and registration.

One parent MLflow run `leaderboard` holds a child run per entry and per single-task baseline (their
per-step losses and weights, test metrics, delta-m, seconds) and the table as artifacts. With
`register_winner` the best entry's checkpoint is registered through `registry.log_and_register` with its
gate results, so it gets the profile's candidate alias (`challenger`; `smoke` for a non-production
profile) and goes through the normal gates; `champion` is never moved here.

`run_board` is plain Python (what the CLI and tests call); `leaderboard_flow` is the same as a Prefect flow
for a work pool (one step: the entries share donors and baselines, so they run in order).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from tasks_mtl import registry, tracking
from tasks_mtl.config import load_config
from tasks_mtl.gates import evaluate_gates
from tasks_mtl.leaderboard import run_leaderboard, winner_config


def run_board(params: str | Path | None, profile: str | None, entries: list[str], out: Path,
              steps: int | None = None, budget_minutes: float | None = None, tasks: list[str] | None = None,
              overrides: dict[str, Any] | None = None, register_winner: bool = False) -> dict[str, Any]:
    """Run the board inside a parent MLflow run; returns the board (+ `parent_run_id`, `registered_version`)."""
    cfg = load_config(params, profile=profile, overrides=overrides or {})
    parent = tracking.RunTracker.start(cfg, run_name="leaderboard", tags={"leaderboard": "parent"})
    try:
        board = run_leaderboard(params, profile, entries, out, steps=steps, budget_minutes=budget_minutes,
                                tasks=tasks, overrides=overrides, child=parent.child)
        reports = cfg.path(cfg.reports_dir)
        parent.log_artifacts([reports / "leaderboard.json", reports / "leaderboard.html"], "leaderboard")
        parent.set_tags({"winner": board["winner"] or "-", "entries": ",".join(entries)})
        board["parent_run_id"], board["registered_version"] = parent.run_id, None
        if register_winner and board["winner"]:
            winner_cfg, checkpoint, metrics = winner_config(params, profile, board, overrides)
            champion = registry.champion_version(winner_cfg)
            gates = evaluate_gates(winner_cfg, metrics, champion and registry.version_metrics(winner_cfg, champion),
                                   champion)
            board["registered_version"] = registry.log_and_register(
                winner_cfg, checkpoint, metrics, gates, run_id=board["rows"][0].get("run_id"))
    except BaseException:
        parent.finish("FAILED")
        raise
    parent.finish()
    return board


@task(name="leaderboard", cache_policy=NO_CACHE)
def leaderboard_step(**kwargs: Any) -> dict[str, Any]:
    return run_board(**kwargs)


@flow(name="leaderboard")
def leaderboard_flow(entries: list[str], params: str = "params.yaml", profile: str | None = None,
                     out: str = "benchmarks/out/leaderboard", steps: int | None = None,
                     budget_minutes: float | None = None, tasks: list[str] | None = None,
                     register_winner: bool = False) -> dict[str, Any]:
    return leaderboard_step(params=params, profile=profile, entries=entries, out=Path(out), steps=steps,
                            budget_minutes=budget_minutes, tasks=tasks, register_winner=register_winner)
