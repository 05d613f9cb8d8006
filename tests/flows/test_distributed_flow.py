"""The flow's training steps with `training.nproc` > 1: each stage goes to torchrun (tasks_mtl.distributed.launch,
faked here), the stage log rank 0 wrote reaches the stage's MLflow run, and the flow registers one version."""

import json

from test_retrain import fakes  # noqa: F401  (the fixture: the library replaced by small fakes)

from flows.retrain import run_local
from tasks_mtl import registry, tracking


def test_with_nproc_the_flow_trains_each_stage_through_torchrun_and_registers_once(mlflow_cfg, fakes, monkeypatch):  # noqa: F811
    import tasks_mtl.distributed as distributed
    from tasks_mtl.runlog import append_log, stage_dir, stage_log

    launched = []

    def launch(cfg, nproc, stage):  # what rank 0 leaves behind: the checkpoint and the stage log
        index = [s.name for s in cfg.training.stages].index(stage)
        launched.append((nproc, stage))
        out = stage_dir(cfg, index)
        out.mkdir(parents=True, exist_ok=True)
        (out / "mtl.json").write_text(json.dumps({"tasks": list(cfg.tasks)}))
        for step in (5, 10):
            append_log(stage_log(cfg, index), 100 * index + step, stage, {"loss/sentiment": 1.0 / step})
        return out

    monkeypatch.setattr(distributed, "launch", launch)
    mlflow_cfg.training.nproc = 2
    result = run_local(mlflow_cfg)

    assert result.get("error") is None and result["version"] is not None
    assert launched == [(2, s.name) for s in mlflow_cfg.training.stages]
    assert fakes["train"] == []  # no stage trained in the flow's own process
    assert len(registry.list_versions(mlflow_cfg)) == 1
    client = tracking.client(mlflow_cfg)
    runs = client.search_runs([tracking.experiment_id(mlflow_cfg)])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(stage_runs) == len(mlflow_cfg.training.stages)
    for run in stage_runs:
        history = client.get_metric_history(run.info.run_id, "loss/sentiment")
        assert sorted(m.value for m in history) == [0.1, 0.2]  # the stage log's two rows, step by step
