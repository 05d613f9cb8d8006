"""The registry on a real SQLite MLflow store: versions, aliases, promotion, rollback, loading."""

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from tasks_mtl import registry, tracking
from tasks_mtl.config import Config
from tasks_mtl.gates import evaluate_gates

METRICS = {"sentiment": {"accuracy": 0.8, "macro_f1": 0.79}, "ner": {"f1": 0.5},
           "mlm": {"accuracy": 0.05, "perplexity": 900.0}}


def _gates(cfg, metrics, champion=None):
    cfg.gates.thresholds = {"sentiment": {"accuracy": 0.6}, "ner": {"f1": 0.2}}
    return evaluate_gates(cfg, metrics, champion)


def test_tracking_store_and_artifacts_live_in_the_root(mlflow_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # the CWD must not matter
    assert tracking.tracking_uri(mlflow_cfg) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    exp = tracking.client(mlflow_cfg).get_experiment(tracking.experiment_id(mlflow_cfg))
    assert exp.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_tracking_uri_precedence(mlflow_cfg, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/m.db")
    assert tracking.tracking_uri(mlflow_cfg) == "sqlite:////elsewhere/m.db"
    mlflow_cfg.registry.tracking_uri = "http://127.0.0.1:5000"
    assert tracking.tracking_uri(mlflow_cfg) == "http://127.0.0.1:5000"


def test_run_tracker_logs_params_steps_and_nested_stage_runs(mlflow_cfg):
    tracker = tracking.RunTracker.start(mlflow_cfg, run_name="t", tags={"data_hash": "abc"})
    with tracker.stage("warmup") as stage:
        log = stage.logger()
        log({"loss/sentiment": 0.7, "weight/sentiment": 1.0}, 1)
        log({"loss/sentiment": 0.5, "weight/sentiment": 1.0}, 2)
    tracker.log_task_metrics(METRICS)
    tracker.finish()
    client = tracking.client(mlflow_cfg)
    parent = client.get_run(tracker.run_id)
    assert parent.data.params["training.stages.1.name"] == "warmup"
    assert parent.data.metrics["test.sentiment.accuracy"] == 0.8
    assert parent.data.tags["data_hash"] == "abc" and parent.info.status == "FINISHED"
    child = client.get_run(stage.run_id)
    assert child.data.tags["mlflow.parentRunId"] == tracker.run_id
    history = client.get_metric_history(stage.run_id, "loss/sentiment")
    assert [(m.step, m.value) for m in history] == [(1, 0.7), (2, 0.5)]


def test_failed_stage_marks_its_run_failed(mlflow_cfg):
    tracker = tracking.RunTracker.start(mlflow_cfg)
    with pytest.raises(RuntimeError), tracker.stage("joint") as stage:
        raise RuntimeError("boom")
    assert tracking.client(mlflow_cfg).get_run(stage.run_id).info.status == "FAILED"


def test_register_promote_rollback(mlflow_cfg, fake_checkpoint):
    cfg = mlflow_cfg
    assert registry.champion_metrics(cfg) is None
    assert registry.list_versions(cfg) == []

    gates1 = _gates(cfg, METRICS)
    v1 = registry.log_and_register(cfg, fake_checkpoint, METRICS, gates1)
    assert v1 == 1
    client = tracking.client(cfg)
    mv1 = client.get_model_version(cfg.registry.model_name, "1")
    assert mv1.aliases == ["challenger"]
    assert mv1.tags["gate"] == "passed" and float(mv1.tags["metric.sentiment.accuracy"]) == 0.8
    assert mv1.tags["data_hash"] and mv1.tags["git_commit"]
    assert registry.champion_metrics(cfg) is None  # registering never crowns

    assert registry.promote_if_passed(cfg, v1, gates1)
    assert registry.champion_metrics(cfg) == METRICS
    mv1 = client.get_model_version(cfg.registry.model_name, "1")
    assert mv1.tags["promoted_by"] == "retrain-flow" and mv1.tags["previous_champion"] == ""

    worse = {"sentiment": {"accuracy": 0.7, "macro_f1": 0.69}, "ner": {"f1": 0.5},
           "mlm": {"accuracy": 0.05, "perplexity": 900.0}}
    gates2 = _gates(cfg, worse, registry.champion_metrics(cfg))
    assert not gates2["passed"]
    v2 = registry.log_and_register(cfg, fake_checkpoint, worse, gates2)
    assert not registry.promote_if_passed(cfg, v2, gates2)
    rows = {r["version"]: r for r in registry.list_versions(cfg)}
    assert rows[1]["aliases"] == ["champion"] and rows[2]["aliases"] == ["challenger"]
    assert rows[2]["gate"] == "failed" and "sentiment.accuracy=0.700" in rows[2]["metrics"]

    registry.promote(cfg, v2, reason="hand-picked", who="alice")
    mv2 = client.get_model_version(cfg.registry.model_name, "2")
    assert mv2.tags["promoted_by"] == "alice" and mv2.tags["promoted_reason"] == "hand-picked"
    assert mv2.tags["previous_champion"] == "1" and mv2.tags["promoted_at"]
    assert registry.champion_metrics(cfg) == worse

    assert registry.rollback(cfg, reason="bad outputs") == 1
    assert int(client.get_model_version_by_alias(cfg.registry.model_name, "champion").version) == 1
    assert client.get_model_version(cfg.registry.model_name, "2").tags["rolled_back_reason"] == "bad outputs"
    with pytest.raises(LookupError):  # version 1 replaced nobody
        registry.rollback(cfg, reason="again")
    with pytest.raises(LookupError, match="has no version 99"):
        registry.promote(cfg, 99, reason="typo")


def test_cli_expected_failures_end_in_one_line(mlflow_cfg, tmp_path):
    import subprocess
    import sys

    import os

    mtl = [sys.executable, "-c", "from tasks_mtl.cli import main; main()"]
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir()
    elsewhere.mkdir()
    params = str(project / "params.yaml")
    (project / "params.yaml").write_text("seed: 1\n")
    registry.list_versions(Config(root=project))  # the project's registry exists (and is empty)
    assert (project / "mlflow.db").is_file()
    for args, message in [
        (["promote", "99", "--params", params], "has no version 99"),
        (["rollback", "--params", params], "no champion to roll back from"),
        (["validate", "--params", str(project / "typo.yaml")], "typo.yaml not found"),
        (["models", "--params", str(project / "typo.yaml")], "typo.yaml not found"),
        (["pipeline", "--params", "typo.yaml"], "typo.yaml not found"),
    ]:
        done = subprocess.run([*mtl, *args], capture_output=True, text=True, cwd=elsewhere, timeout=120,
                              env=os.environ | {"COLUMNS": "200"})
        out = " ".join((done.stdout + done.stderr).split())
        assert done.returncode != 0 and message in out, (args, out)
        assert "Traceback" not in out and len(done.stdout.strip().splitlines()) == 1, out  # stderr: MLflow's own log
    assert not any(elsewhere.iterdir())  # nothing is created where the command was run


def _mtl(args: list[str], root: Path) -> tuple[str, str]:
    """`mtl ARGS --params root/params.yaml` in a fresh interpreter: (its first output line, its last line
    `exit <code> mlflow imported <bool>`)."""
    import subprocess
    import sys

    code = ("import sys; from tasks_mtl.cli import main; sys.argv = ['mtl', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit as exit:\n    code = exit.code\nelse:\n    code = 0\n"
            "print('exit', code, 'mlflow imported', 'mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, *args, "--params", str(root / "params.yaml")],
                          capture_output=True, text=True, cwd=root, timeout=120, check=False)
    lines = done.stdout.strip().splitlines()
    assert lines, done.stderr
    return lines[0], lines[-1]


def test_registry_commands_without_a_registry_answer_at_once_and_create_none(tmp_path, monkeypatch):
    """A fresh project has no mlflow.db: promote and rollback fail in one line, models lists nothing, each
    without importing MLflow (1.5 s of the 2 s an error may take) and without creating the database."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    for args, message, exit_code in [
        (["promote", "3"], "no registry at", 1),
        (["rollback"], "no registry at", 1),
        (["models"], "no versions: no registry at", 0),
    ]:
        first, last = _mtl(args, tmp_path)
        assert message in first and str(tmp_path / "mlflow.db") in first, first
        assert last == f"exit {exit_code} mlflow imported False"
        assert not (tmp_path / "mlflow.db").exists()


def test_a_registry_without_that_version_or_a_champion_answers_before_mlflow_loads(mlflow_cfg, fake_checkpoint):
    """On an existing registry, a version that is not there and a rollback with no champion are read from the
    SQLite tables (tasks_mtl/store.py) and refused without MLflow; what is there still goes through MLflow."""
    from tasks_mtl import store

    cfg, root = mlflow_cfg, mlflow_cfg.root
    version = registry.log_and_register(cfg, fake_checkpoint, METRICS, _gates(cfg, METRICS))
    assert (store.surely_lacks_version(cfg, version), store.surely_lacks_version(cfg, version + 1)) == (False, True)
    assert store.surely_lacks_alias(cfg, registry.CHAMPION)
    (root / "params.yaml").write_text("seed: 1\n")  # the same root, so the same mlflow.db

    first, last = _mtl(["promote", str(version + 1)], root)
    assert f"has no version {version + 1}" in first and last == "exit 1 mlflow imported False"
    first, last = _mtl(["rollback"], root)
    assert "no champion to roll back from" in first and last == "exit 1 mlflow imported False"
    first, last = _mtl(["promote", str(version)], root)  # a real version: MLflow moves the alias
    assert first == f"champion -> version {version}" and last == "exit 0 mlflow imported True"
    assert not store.surely_lacks_alias(cfg, registry.CHAMPION)
    first, last = _mtl(["rollback"], root)  # a champion that replaced none: MLflow's answer
    assert "replaced no earlier champion" in first and last == "exit 1 mlflow imported True"

    # a store it cannot read (another schema, or a server) never counts as lacking anything
    other = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"tracking_uri": "http://127.0.0.1:9"})})
    assert not store.surely_lacks_version(other, 99) and not store.surely_lacks_alias(other, "champion")
    (root / "empty.db").touch()
    bare = cfg.model_copy(update={"registry": cfg.registry.model_copy(
        update={"tracking_uri": f"sqlite:///{root / 'empty.db'}"})})
    assert not store.surely_lacks_version(bare, 99) and not store.surely_lacks_alias(bare, "champion")


def test_resolve_model_dir(mlflow_cfg, fake_checkpoint):
    cfg = mlflow_cfg
    with pytest.raises(registry.NoChampionError, match="no champion yet"):
        registry.resolve_model_dir(cfg, None)
    assert registry.resolve_model_dir(cfg, str(fake_checkpoint)) == fake_checkpoint.resolve()
    with pytest.raises(FileNotFoundError):
        registry.resolve_model_dir(cfg, str(fake_checkpoint / "nope"))

    version = registry.log_and_register(cfg, fake_checkpoint, METRICS, _gates(cfg, METRICS))
    registry.promote(cfg, version, reason="test")
    local = registry.resolve_model_dir(cfg, None)
    assert json.loads((local / "mtl.json").read_text()) == {"tasks": ["sentiment"]}
    assert registry.resolve_model_dir(cfg, f"models:/{cfg.registry.model_name}/1") == local  # cached
    with pytest.raises(FileNotFoundError):
        registry.resolve_model_dir(cfg, f"models:/{cfg.registry.model_name}/7")


def test_pyfunc_returns_prediction_records(mlflow_cfg, fake_checkpoint, capfd):
    """The registered model is models-from-code (its code file stored with it, nothing pickled), registering
    warns about no serialisation, and fetching it shows no download bars."""
    cfg = mlflow_cfg
    registry.log_and_register(cfg, fake_checkpoint, METRICS, _gates(cfg, METRICS))
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg))
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{cfg.registry.model_name}/1"))
    flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor.get("model_code_path") and "python_model" not in flavor
    assert not list(local.rglob("*.pkl"))
    assert "CloudPickle" not in capfd.readouterr().err
    registry.resolve_model_dir(cfg, f"models:/{cfg.registry.model_name}/1")
    assert "Downloading artifacts" not in capfd.readouterr().err
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@challenger")
    out = model.predict(pd.DataFrame({"text": ["很好", "太差了"], "text_pair": ["是的", None]}))
    assert [r["text"] for r in out] == ["很好", "太差了"]
    assert "nsp" in out[0] and "nsp" not in out[1]
    json.dumps(out, ensure_ascii=False)  # what `mlflow models serve` has to do
    only_text = model.predict(pd.DataFrame({"text": ["好"]}))
    assert only_text[0]["sentiment"]["label"] == "positive"


def test_cli_sets_the_environment_make_run_sets(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "MLFLOW_DISABLE_TELEMETRY",
                                                            "PREFECT_SERVER_ANALYTICS_ENABLED", "DVC_NO_ANALYTICS")}
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    code = ("import os, sys; from tasks_mtl import cli; import flows.retrain as r\n"
            "r.run_local = lambda cfg, **kw: print('ENV', os.environ['PREFECT_HOME'], os.environ['MLFLOW_DISABLE_TELEMETRY'],"
            " os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'], os.environ['DVC_NO_ANALYTICS']) or sys.exit(0)\n"
            "sys.argv = ['mtl', 'pipeline']; cli.main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    line = next(x for x in done.stdout.splitlines() if x.startswith("ENV"))
    assert line.split()[1:] == [str(tmp_path.resolve() / ".prefect"), "true", "false", "1"], done.stdout + done.stderr
