"""`mtl leaderboard` on the tiny project: a row per method with finite metrics, child runs in a real SQLite
MLflow store, the winner registered as challenger; and a run cut by its time budget is still scored."""

from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from tasks_mtl.cli import app

STAGES = [{"name": "joint", "tasks": ["sentiment", "ner", "cws", "nsp"], "steps": 4, "encoder_lr": 1e-3,
           "head_lr": 3e-3, "sampler": "round_robin"}]


def _finite(metrics: dict) -> bool:
    return all(math.isfinite(v) for values in metrics.values() for v in values.values())


@pytest.mark.slow
def test_leaderboard_ranks_methods_logs_child_runs_and_registers_the_winner(tmp_path, monkeypatch):
    from tiny_project import make_tiny_project

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = make_tiny_project(tmp_path, {"training": {"stages": STAGES, "conflict_every": 2}})
    result = CliRunner().invoke(app, [
        "leaderboard", "--methods", "equal,famo", "--params", str(tmp_path / "params.yaml"), "--steps", "3",
        "--tasks", "sentiment,cws", "--out", str(tmp_path / "board"), "--budget", "30", "--register-winner"])
    assert result.exit_code == 0, result.output + repr(result.exception)

    board = json.loads((tmp_path / "reports" / "leaderboard.json").read_text())
    rows = {row["name"]: row for row in board["rows"]}
    assert set(rows) == {"equal", "famo"}
    for row in rows.values():
        assert {"sentiment", "ner", "cws", "nsp"} <= set(row["metrics"]) and _finite(row["metrics"])
        assert set(row["delta_m"]) == {"sentiment", "cws"} and math.isfinite(row["mean_delta_m"])
        assert row["steps_done"] == row["steps_planned"] == 3 and not row["cut"]
        assert row["train_seconds"] > 0 and {"sentiment", "cws"} <= set(row["curves"]["loss"])
    assert rows["famo"]["curves"]["weight"]["cws"] != rows["equal"]["curves"]["weight"]["cws"]
    assert board["winner"] == board["rows"][0]["name"]
    assert board["rows"][0]["mean_delta_m"] >= board["rows"][1]["mean_delta_m"]
    assert set(board["single_task"]) == {"sentiment", "cws"} and _finite(board["single_task"])
    page = (tmp_path / "reports" / "leaderboard.html").read_text()
    assert "famo" in page and "equal" in page and page.count("<svg") >= 8  # loss and weight per task
    assert (tmp_path / "board" / "famo" / "reports" / "conflict.html").exists()

    uri = "sqlite:///" + str(cfg.path("mlflow.db"))
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "leaderboard")
    assert parent.data.tags["winner"] == board["winner"] and parent.info.status == "FINISHED"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"equal", "famo", "single-sentiment", "single-cws"}
    for name in ("equal", "famo"):
        run = children[name]
        assert run.info.status == "FINISHED" and math.isfinite(run.data.metrics["test.ner.f1"])
        assert run.data.metrics["mean_delta_m"] == pytest.approx(rows[name]["mean_delta_m"])
        assert client.get_metric_history(run.info.run_id, "loss/cws")
        assert any(k.startswith("conflict/") for k in run.data.metrics)  # the task-conflict samples
    version = client.get_model_version_by_alias(cfg.registry.model_name, "challenger")
    assert version.tags["run_id"] == children[board["winner"]].info.run_id


@pytest.mark.slow
def test_a_run_cut_by_its_budget_is_scored_as_far_as_it_got(tmp_path):
    from tiny_project import make_tiny_project

    from tasks_mtl.leaderboard import run_leaderboard

    make_tiny_project(tmp_path, {"training": {"stages": STAGES}})
    board = run_leaderboard(tmp_path / "params.yaml", None, ["equal"], tmp_path / "board", budget_minutes=1e-6,
                            tasks=[])
    (row,) = board["rows"]
    assert row["cut"] and row["steps_done"] == 1 and row["steps_planned"] == 4
    assert _finite(row["metrics"]) and row["mean_delta_m"] is None and row["checkpoint"].endswith(".resume")


@pytest.mark.slow
def test_the_budget_leaves_out_the_shared_features_stage(tmp_path):
    """The first entry trains the features stage that every other entry copies: the budget starts after it, so
    the first entry's own stages get the same minutes as everyone's (a features stage cut at its first step
    left the first entry of a real board 339 of 800 joint steps against 800 for the entries after it)."""
    from tiny_project import make_tiny_project

    from tasks_mtl.leaderboard import run_leaderboard

    stages = [{"name": "features", "features_only": True, "steps": 3, "head_lr": 5e-3}, *STAGES]
    make_tiny_project(tmp_path, {"tasks": {"sentiment": {"tfidf": True}, "nsp": {"ngram_bag": 8}},  # nsp: SGD steps
                                 "training": {"stages": stages}})
    board = run_leaderboard(tmp_path / "params.yaml", None, ["equal"], tmp_path / "board", budget_minutes=1e-6,
                            tasks=[])
    (row,) = board["rows"]
    assert row["cut"] and row["steps_planned"] == 3 + 4
    assert row["steps_done"] == 3 + 1  # the features stage whole, then the budget: one joint step


def test_a_copied_stage_keeps_its_curves_and_wall_time_for_the_next_entry_that_copies_it(tmp_path, monkeypatch):
    """Entries share a finished stage (the features stage) by copying it; the copy carries the stage's log and
    timing record, so an entry that copies it from an earlier copy still counts the stage's real seconds."""
    from tiny_project import make_tiny_project

    from tasks_mtl import train
    from tasks_mtl.leaderboard import _copy_done_stage
    from tasks_mtl.runlog import stage_dir, stage_log, stage_timing

    first, second, third = (make_tiny_project(tmp_path / name) for name in ("a", "b", "c"))
    done = {str(first.root)}
    monkeypatch.setattr(train, "is_done", lambda cfg, index: str(cfg.root) in done)
    monkeypatch.setattr(train, "stage_key", lambda cfg, index: f"stage-{index}")  # the same stage for all three
    stage_dir(first, 0).mkdir(parents=True)
    (stage_dir(first, 0) / "done.json").write_text("{}")
    stage_log(first, 0).write_text("step,loss\n1,0.5\n")
    stage_timing(first, 0).write_text(json.dumps({"seconds": 42.5}))

    assert _copy_done_stage(second, 0, [first]) == 42.5
    done.add(str(second.root))
    assert stage_log(second, 0).read_text() == "step,loss\n1,0.5\n"
    assert json.loads(stage_timing(second, 0).read_text())["seconds"] == 42.5
    assert _copy_done_stage(third, 0, [second]) == 42.5  # copied from a copy: still the stage's own seconds
    assert (stage_dir(third, 0) / "done.json").exists()
    assert _copy_done_stage(first, 0, [second]) == 0.0  # a finished stage is not copied over
