"""The retrain flow's orchestration with the library replaced by small fakes: ordering, gating,
caching, retries and failure handling, on a real SQLite MLflow store and Prefect's ephemeral API."""

import json
from types import SimpleNamespace

import pytest

from flows import steps
from flows.retrain import flow_parameters, run_local
from tasks_mtl import registry, tracking
from tasks_mtl.config import Config

METRICS = {"sentiment": {"accuracy": 0.8, "macro_f1": 0.78}, "ner": {"f1": 0.5},
           "mlm": {"accuracy": 0.05, "perplexity": 900.0}}


@pytest.fixture
def fakes(prefect_api, mlflow_cfg, fake_checkpoint, monkeypatch):
    """Replace validate/prepare/tokenize/train/evaluate; record what ran."""
    import tasks_mtl.data.prepare
    import tasks_mtl.evaluate
    import tasks_mtl.tokenization
    import tasks_mtl.train
    import tasks_mtl.validation

    calls = {"validate": 0, "tokenize": 0, "train": [], "fail_stage_once": None, "valid": True, "metrics": METRICS,
             "champion_evaluated": []}

    def evaluate(cfg, checkpoint, split="test"):  # the champion, re-scored on this run's test split
        calls["champion_evaluated"].append(checkpoint)
        return METRICS

    def validate(cfg):
        calls["validate"] += 1
        ok = calls["valid"]
        summary = "validation passed" if ok else "validation FAILED (1 of 6 tasks)\n  - sentiment: expect_column_values_to_not_be_null"
        return SimpleNamespace(success=ok, summary=lambda: summary)

    def tokenize(cfg):
        calls["tokenize"] += 1
        out = cfg.path(cfg.data.tokenized_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "meta.json").write_text("{}")
        return out

    def train_stage(cfg, index, log=None, progress=None):
        if calls["fail_stage_once"] == index:
            calls["fail_stage_once"] = None
            raise RuntimeError("worker lost")
        calls["train"].append(index)
        out = cfg.path(cfg.training.output_dir) / f"{index + 1}-{cfg.training.stages[index].name}"
        out.mkdir(parents=True, exist_ok=True)
        (out / "mtl.json").write_text(json.dumps({"tasks": list(cfg.tasks)}))
        if log:
            log({"loss/sentiment": 1.0 / (index + 1), "weight/sentiment": 1.0}, index * 10)
        return out

    monkeypatch.setattr(tasks_mtl.validation, "validate", validate)
    monkeypatch.setattr(tasks_mtl.data.prepare, "prepare", lambda cfg: {})
    monkeypatch.setattr(tasks_mtl.tokenization, "tokenize", tokenize)
    monkeypatch.setattr(tasks_mtl.train, "train_stage", train_stage)
    monkeypatch.setattr(tasks_mtl.train, "write_loss_report", lambda cfg: cfg.path("reports/losses"))
    monkeypatch.setattr(tasks_mtl.evaluate, "evaluate_to_report", lambda cfg, checkpoint: calls["metrics"])
    monkeypatch.setattr(tasks_mtl.evaluate, "evaluate", evaluate)
    monkeypatch.setattr(steps.train_stage_step, "retry_delay_seconds", 0)
    mlflow_cfg.gates.thresholds = {"sentiment": {"accuracy": 0.6}, "ner": {"f1": 0.2}}
    return calls


def test_flow_parameters_rebuild_the_config(tmp_path):
    cfg = Config(root=tmp_path, seed=7, tasks={"sentiment": Config().tasks["sentiment"]})
    cfg.gates.thresholds = {"sentiment": {"accuracy": 0.7}}  # a dropped default gate stays dropped
    rebuilt = Config.model_validate(flow_parameters(cfg)["config"])
    assert rebuilt.model_dump() == cfg.model_dump()
    json.dumps(flow_parameters(cfg))  # a deployment must be able to store them
    assert flow_parameters(cfg, "params.yaml", "quick", {"seed": 3}) == {
        "params": "params.yaml", "profile": "quick", "overrides": {"seed": 3}}


def test_gated_registration_and_tokenize_cache(mlflow_cfg, fakes):
    cfg = mlflow_cfg
    first = run_local(cfg)
    assert "error" not in first, first.get("error")
    assert first["version"] == 1 and first["promoted"] and first["gates"]["decision"] == "promote"
    assert fakes["train"] == [0, 1, 2, 3] and fakes["tokenize"] == 1
    assert json.loads(cfg.path("reports/gates.json").read_text())["decision"] == "promote"
    assert registry.champion_metrics(cfg) == METRICS

    runs = tracking.client(cfg).search_runs([tracking.experiment_id(cfg)])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.metrics["test.sentiment.accuracy"] == 0.8 and parent.data.tags["gate"] == "promote"
    stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["stage"] for r in stages) == ["full", "joint", "pretrain", "warmup"]

    cfg.gates.thresholds = {"sentiment": {"accuracy": 0.99}}  # same data and model settings, stricter gate
    second = run_local(cfg)
    assert second["version"] == 2 and not second["promoted"] and second["gates"]["decision"] == "reject"
    assert fakes["tokenize"] == 1  # cached on data version + settings: not run again
    assert fakes["champion_evaluated"] == [registry.resolve_model_dir(cfg, None)]  # no champion on run 1
    no_regression = [g for g in second["gates"]["gates"] if g["kind"] == "no_regression"]
    assert no_regression and all(g["champion"] == METRICS[g["task"]][g["metric"]] for g in no_regression)
    rows = {r["version"]: r["aliases"] for r in registry.list_versions(cfg)}
    assert rows == {1: ["champion"], 2: ["challenger"]}


def test_bad_data_stops_the_flow_before_training(mlflow_cfg, fakes):
    fakes["valid"] = False
    result = run_local(mlflow_cfg)
    assert "expect_column_values_to_not_be_null" in result["error"]
    assert fakes["train"] == [] and result["version"] is None
    assert registry.list_versions(mlflow_cfg) == []


def test_a_failed_stage_is_retried_once(mlflow_cfg, fakes):
    fakes["fail_stage_once"] = 2  # the joint stage
    result = run_local(mlflow_cfg)
    assert "error" not in result, result.get("error")
    assert fakes["train"] == [0, 1, 2, 3] and result["version"] == 1
    client = tracking.client(mlflow_cfg)
    statuses = sorted(r.info.status for r in client.search_runs([tracking.experiment_id(mlflow_cfg)])
                      if r.data.tags.get("stage") == "joint")
    assert statuses == ["FAILED", "FINISHED"]  # the lost attempt is visible, the retry finished
