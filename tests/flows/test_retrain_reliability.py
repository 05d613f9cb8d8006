"""The retrain flow's reliability, with the library replaced by test_retrain's fakes, on a real SQLite
MLflow store and Prefect's ephemeral API: an unchanged rerun registers nothing, a smoke profile leaves the
champion alone, a registry fault between register and promote leaves the champion, and a second run on
the same checkout waits for the first."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from test_retrain import fakes  # noqa: F401 - the fixture

from flows.retrain import RUN_LOCK, run_local
from tasks_mtl import registry, tracking


def _aliases(cfg) -> dict[str, int]:
    try:
        model = tracking.client(cfg).get_registered_model(cfg.registry.model_name)
    except MlflowException:
        return {}
    return {alias: int(version) for alias, version in (model.aliases or {}).items()}


def _versions(cfg) -> list[int]:
    return [row["version"] for row in registry.list_versions(cfg)]


def _tags(cfg, version) -> dict:
    return dict(tracking.client(cfg).get_model_version(cfg.registry.model_name, str(version)).tags)


def _ok(result):
    assert "error" not in result, result.get("error")
    return result


def test_an_unchanged_rerun_registers_nothing_unless_forced(mlflow_cfg, fakes, monkeypatch):  # noqa: F811
    cfg = mlflow_cfg
    first = _ok(run_local(cfg))
    assert first["version"] == 1 and first["promoted"]
    trained = list(fakes["train"])

    again = _ok(run_local(cfg))  # same configuration, data and fingerprint
    assert again["unchanged_since"] == 1 and again["version"] is None and not again["promoted"]
    assert again["metrics"] == first["metrics"]  # what version 1 recorded
    assert fakes["train"] == trained and _versions(cfg) == [1]  # nothing trained, nothing registered
    runs = tracking.client(cfg).search_runs([tracking.experiment_id(cfg)], "tags.unchanged_since = '1'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"

    forced = _ok(run_local(cfg, force=True))  # asked for: an identical version, gated like any other
    assert forced["version"] == 2 and forced["promoted"] and _aliases(cfg)["champion"] == 2

    cfg.path("data").mkdir(exist_ok=True)  # each part of the identity counts: the data ...
    (cfg.path("data") / "extra.txt").write_text("新的数据\n", encoding="utf-8")
    assert _ok(run_local(cfg))["version"] == 3
    monkeypatch.setattr("tasks_mtl.train.stage_key", lambda cfg, index: "another-fingerprint")  # ... the training
    assert _ok(run_local(cfg))["version"] == 4
    cfg.training.clip_norm = 0.5  # ... and the configuration
    assert _ok(run_local(cfg))["version"] == 5
    tags = _tags(cfg, 5)
    assert tags["fingerprint"] == "another-fingerprint" and tags["config_hash"] == cfg.config_hash()
    assert _ok(run_local(cfg))["unchanged_since"] == 5


def test_a_quick_run_leaves_the_default_champion(mlflow_cfg, fakes):  # noqa: F811
    cfg = mlflow_cfg
    assert _ok(run_local(cfg))["promoted"]
    quick = cfg.model_copy(deep=True)
    quick.profile, quick.production = "quick", False
    quick.gates.thresholds = {"sentiment": {"accuracy": 0.0}, "ner": {"f1": 0.0}}  # as the quick profile's
    quick.gates.tolerance = {"default": 1.0}
    fakes["metrics"] = {"sentiment": {"accuracy": 0.38}, "ner": {"f1": 0.01},  # a junk model
                        "mlm": {"accuracy": 0.0, "perplexity": 900.0}}

    result = _ok(run_local(quick))
    assert result["version"] == 2 and not result["promoted"]
    failed = [g["kind"] for g in result["gates"]["gates"] if not g["passed"]]
    assert failed == ["production"]  # only the production gate stands in its way, and it holds
    assert _aliases(cfg) == {"champion": 1, "challenger": 1, "smoke": 2}
    assert _tags(cfg, 1)["profile"] == "default" and _tags(cfg, 2)["profile"] == "quick"
    assert registry.champion_metrics(cfg)["sentiment"]["accuracy"] == 0.8


class Fault(MlflowException):
    pass


@pytest.mark.parametrize("alias", ["challenger", "champion"])
def test_a_registry_fault_between_register_and_promote_leaves_the_champion(mlflow_cfg, fakes, monkeypatch, alias):  # noqa: F811
    """`challenger`: the last write of register, so the fault falls between register and promote;
    `champion`: the fault falls during promote."""
    cfg = mlflow_cfg
    assert _ok(run_local(cfg))["promoted"]
    champion_tags = _tags(cfg, 1)
    real = MlflowClient.set_registered_model_alias

    def faulty(self, name, alias_, version):
        if alias_ == alias:
            raise Fault(f"registry unreachable while setting {alias_}")
        return real(self, name, alias_, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", faulty)
    cfg.seed = 7  # something changed, so the run registers
    failed = run_local(cfg)
    assert "registry unreachable" in failed["error"]
    assert _aliases(cfg) == {"champion": 1, "challenger": 2 if alias == "champion" else 1}
    assert _tags(cfg, 1) == champion_tags
    assert not {"promotion", "promoted_by", "previous_champion"} & set(_tags(cfg, 2))
    parent = [r for r in tracking.client(cfg).search_runs([tracking.experiment_id(cfg)])
              if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("model_version") is None]
    assert [r.info.status for r in parent] == ["FAILED"]

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", real)
    rerun = _ok(run_local(cfg))  # version 2's promotion was never decided: the rerun finishes the job
    assert rerun["version"] == 3 and rerun["promoted"]
    assert _tags(cfg, 3)["previous_champion"] == "1"
    assert registry.rollback(cfg, reason="walk back") == 1


HOLDER = r"""
import sys, time
from pathlib import Path
from tasks_mtl import registry

with registry.hold_lock(Path(sys.argv[1]), "a test holding the checkout"):
    Path(sys.argv[2]).touch()
    time.sleep(float(sys.argv[3]))
    Path(sys.argv[2]).write_text(repr(time.time()))
"""


def test_a_second_run_on_the_checkout_waits_for_the_first(mlflow_cfg, fakes, tmp_path, capfd):  # noqa: F811
    cfg = mlflow_cfg
    held = tmp_path / "held"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cfg.path(RUN_LOCK)), str(held), "6"],
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    deadline = time.time() + 120
    while not held.exists():
        assert time.time() < deadline and holder.poll() is None
        time.sleep(0.05)
    result = _ok(run_local(cfg))
    assert holder.wait(timeout=60) == 0
    released = float(held.read_text())
    run = next(r for r in tracking.client(cfg).search_runs([tracking.experiment_id(cfg)])
               if "mlflow.parentRunId" not in r.data.tags)
    assert run.info.start_time / 1000 >= released  # the run's work began only once the holder let go
    waited = [line for line in capfd.readouterr().err.splitlines() if "waiting for" in line]
    assert len(waited) == 1 and "a test holding the checkout, pid" in waited[0], waited  # and it said for whom
    assert result["version"] == 1 and _aliases(cfg)["champion"] == 1
