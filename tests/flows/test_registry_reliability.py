"""The registry's promises on a real SQLite MLflow store: every version says what made it, a smoke profile
never becomes champion, a registry fault in the middle of a promotion or rollback leaves `champion` and the
`previous_champion` chain as they were, and concurrent register+promote sections run one at a time."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tasks_mtl import registry, tracking
from tasks_mtl.gates import evaluate_gates

METRICS = {"sentiment": {"accuracy": 0.8, "macro_f1": 0.79}, "ner": {"f1": 0.5},
           "mlm": {"accuracy": 0.05, "perplexity": 900.0}}
PROMOTION_TAGS = ("promotion", "promoted_by", "promoted_reason", "promoted_at", "previous_champion")


@pytest.fixture
def cfg(mlflow_cfg):
    mlflow_cfg.gates.thresholds = {"sentiment": {"accuracy": 0.6}, "ner": {"f1": 0.2}}
    return mlflow_cfg


def _smoke(cfg):
    """The same configuration as the quick profile marks it: not production-capable, gates at zero."""
    quick = cfg.model_copy(deep=True)
    quick.profile, quick.production = "quick", False
    quick.gates.thresholds = {"sentiment": {"accuracy": 0.0}, "ner": {"f1": 0.0}}
    quick.gates.tolerance = {"default": 1.0}
    return quick


def _register(cfg, checkpoint, fingerprint="fp"):
    """Register a version whose gates were judged against the current champion."""
    champion = registry.champion_version(cfg)
    gates = evaluate_gates(cfg, METRICS, registry.champion_metrics(cfg), champion)
    version = registry.log_and_register(cfg, checkpoint, METRICS, gates,
                                        provenance=registry.provenance_tags(cfg, fingerprint))
    return version, gates


def _tags(cfg, version) -> dict:
    return dict(tracking.client(cfg).get_model_version(cfg.registry.model_name, str(version)).tags)


def _aliases(cfg) -> dict[str, int]:
    model = tracking.client(cfg).get_registered_model(cfg.registry.model_name)
    return {alias: int(version) for alias, version in (model.aliases or {}).items()}


def test_versions_carry_what_made_them_and_a_smoke_run_never_becomes_champion(cfg, fake_checkpoint):
    v1, gates1 = _register(cfg, fake_checkpoint)
    assert registry.promote_if_passed(cfg, v1, gates1)
    tags = _tags(cfg, v1)
    assert tags["profile"] == "default" and tags["production"] == "true" and tags["promotion"] == "champion"
    assert tags["config_hash"] == cfg.config_hash() and tags["fingerprint"] == "fp"
    assert tags["data_hash"] == tracking.data_hash(cfg) and tags["git_commit"]

    quick = _smoke(cfg)
    assert quick.config_hash() != cfg.config_hash()
    v2, gates2 = _register(quick, fake_checkpoint)
    # every quality gate opens at zero with tolerance 1.0, yet the production gate rejects the smoke run
    failed = [g for g in gates2["gates"] if not g["passed"]]
    assert [g["kind"] for g in failed] == ["production"] and gates2["decision"] == "reject"
    assert not registry.promote_if_passed(quick, v2, gates2)
    assert _aliases(cfg) == {"champion": 1, "challenger": 1, "smoke": 2}
    tags = _tags(cfg, v2)
    assert tags["profile"] == "quick" and tags["production"] == "false"
    assert tags["promotion"].startswith("not promoted") and "promoted_by" not in tags

    # a person cannot crown it either, and a gate result that claims to pass does not help
    with pytest.raises(ValueError, match="not production-capable"):
        registry.promote(cfg, v2, reason="looks fine")
    with pytest.raises(ValueError, match="not production-capable"):
        registry.promote_if_passed(quick, v2, {**gates2, "passed": True})
    assert registry.champion_version(cfg) == 1
    rows = {row["version"]: row for row in registry.list_versions(cfg)}
    assert rows[1]["profile"] == "default" and rows[2]["profile"] == "quick"
    assert rows[2]["aliases"] == ["smoke"]


def test_gates_judged_against_an_older_champion_promote_nothing(cfg, fake_checkpoint):
    v1, gates1 = _register(cfg, fake_checkpoint)
    registry.promote_if_passed(cfg, v1, gates1)
    v2, gates2 = _register(cfg, fake_checkpoint)  # judged against champion 1
    v3, _ = _register(cfg, fake_checkpoint)
    registry.promote(cfg, v3, reason="a person, while run 2 was between its gates and its promotion")
    assert not registry.promote_if_passed(cfg, v2, gates2)
    assert registry.champion_version(cfg) == 3
    assert "became champion meanwhile" in _tags(cfg, v2)["promotion"]


class Fault(MlflowException):
    pass


def _inject(monkeypatch, method: str, when, apply_first: bool = False):
    """Make MlflowClient.<method> raise when `when(args)` holds; with `apply_first`, after doing its work
    (the registry applied the change and only the answer was lost)."""
    real = getattr(MlflowClient, method)

    def faulty(self, *args, **kwargs):
        if when(args):
            if apply_first:
                real(self, *args, **kwargs)
            raise Fault(f"injected fault in {method}{args}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, method, faulty)
    return lambda: monkeypatch.setattr(MlflowClient, method, real)


@pytest.mark.parametrize("fault", ["champion alias", "a promotion tag"])
def test_a_fault_during_promote_leaves_champion_and_history(cfg, fake_checkpoint, monkeypatch, fault):
    v1, gates1 = _register(cfg, fake_checkpoint)
    registry.promote_if_passed(cfg, v1, gates1)
    v2, gates2 = _register(cfg, fake_checkpoint)
    before = {1: _tags(cfg, 1), 2: _tags(cfg, 2)}
    if fault == "champion alias":
        heal = _inject(monkeypatch, "set_registered_model_alias", lambda a: a[1] == "champion")
    else:  # the fourth tag: three are written when the fault hits
        heal = _inject(monkeypatch, "set_model_version_tag", lambda a: a[2] == "promoted_at")

    with pytest.raises(Fault):
        registry.promote_if_passed(cfg, v2, gates2)
    assert registry.champion_version(cfg) == 1
    assert {1: _tags(cfg, 1), 2: _tags(cfg, 2)} == before  # no tag claims a promotion that did not happen
    with pytest.raises(Fault):
        registry.promote(cfg, v2, reason="by hand")
    assert registry.champion_version(cfg) == 1 and _tags(cfg, 2) == before[2]

    heal()
    assert registry.promote_if_passed(cfg, v2, gates2)  # the registry works again: the same call succeeds
    assert _tags(cfg, 2)["previous_champion"] == "1"
    assert registry.rollback(cfg, reason="walk back") == 1
    assert registry.champion_version(cfg) == 1


def test_a_promotion_applied_but_unanswered_keeps_its_history(cfg, fake_checkpoint, monkeypatch):
    v1, gates1 = _register(cfg, fake_checkpoint)
    registry.promote_if_passed(cfg, v1, gates1)
    v2, gates2 = _register(cfg, fake_checkpoint)
    _inject(monkeypatch, "set_registered_model_alias", lambda a: a[1] == "champion", apply_first=True)
    with pytest.raises(Fault):
        registry.promote_if_passed(cfg, v2, gates2)
    assert registry.champion_version(cfg) == 2  # it did move: the tags that explain it stay
    assert _tags(cfg, 2)["previous_champion"] == "1" and _tags(cfg, 2)["promotion"] == "champion"


def test_a_failed_repromotion_restores_the_earlier_promotion_tags(cfg, fake_checkpoint, monkeypatch):
    v1, gates1 = _register(cfg, fake_checkpoint)
    registry.promote_if_passed(cfg, v1, gates1)
    v2, _ = _register(cfg, fake_checkpoint)
    registry.promote(cfg, v2, reason="first time", who="alice")
    registry.rollback(cfg, reason="back to 1")
    before = _tags(cfg, 2)
    _inject(monkeypatch, "set_registered_model_alias", lambda a: a[1] == "champion")
    with pytest.raises(Fault):
        registry.promote(cfg, v2, reason="second time", who="bob")
    assert registry.champion_version(cfg) == 1
    assert _tags(cfg, 2) == before and before["promoted_by"] == "alice"


def test_a_fault_during_rollback_leaves_champion_and_history(cfg, fake_checkpoint, monkeypatch):
    v1, gates1 = _register(cfg, fake_checkpoint)
    registry.promote_if_passed(cfg, v1, gates1)
    v2, gates2 = _register(cfg, fake_checkpoint)
    registry.promote_if_passed(cfg, v2, gates2)
    before = _tags(cfg, 2)
    heal = _inject(monkeypatch, "set_registered_model_alias", lambda a: a[1] == "champion")
    with pytest.raises(Fault):
        registry.rollback(cfg, reason="bad outputs")
    assert registry.champion_version(cfg) == 2 and _tags(cfg, 2) == before
    assert not any(key.startswith("rolled_back") for key in _tags(cfg, 2))
    heal()
    assert registry.rollback(cfg, reason="bad outputs") == 1


def test_a_fault_while_registering_leaves_no_half_written_version(cfg, fake_checkpoint, monkeypatch):
    v1, gates1 = _register(cfg, fake_checkpoint)
    registry.promote_if_passed(cfg, v1, gates1)
    heal = _inject(monkeypatch, "set_registered_model_alias", lambda a: a[1] == "challenger")
    with pytest.raises(Fault):
        _register(cfg, fake_checkpoint)
    heal()
    assert _aliases(cfg) == {"champion": 1, "challenger": 1}
    versions = tracking.client(cfg).search_model_versions(f"name = '{cfg.registry.model_name}'")
    for mv in versions:  # whatever exists is complete: created together with every tag it carries
        assert {"gate", "gate_summary", "profile", "config_hash", "data_hash", "fingerprint",
                "metric.sentiment.accuracy"} <= set(mv.tags), mv.version
    # the version that lost its alias has no decided promotion, so a rerun does not mistake it for done
    orphan = max(int(mv.version) for mv in versions)
    assert orphan == 2 and "promotion" not in _tags(cfg, orphan)
    assert registry.same_version(cfg, registry.provenance_tags(cfg, "fp"))["version"] == 1


# --- two processes contending for the register+promote section ----------------------------------

CHILD = r"""
import json, os, sys, time
from contextlib import nullcontext
from pathlib import Path
from tasks_mtl import registry
from tasks_mtl.config import Config

cfg = Config.model_validate_json(Path(sys.argv[1]).read_text())
me, out = sys.argv[2], Path(sys.argv[3])

class Fake:  # the registered pyfunc's input example is predicted once; no real model needed
    def __init__(self, path): pass
    def predict(self, texts, text_pairs=None): return [{"text": t} for t in texts]

registry._load_predictor = Fake
real = registry._version_by_alias
waited = []
def slow(cfg, alias):  # widen the window between reading the champion and replacing it
    found = real(cfg, alias)
    if alias == registry.CHAMPION and not waited and sys._getframe(1).f_code.co_name == "_promote":
        waited.append(True)  # _promote's read of the champion it replaces (promote holds the lock around it)
        if os.environ.get("NO_LOCK"):  # the control: both read the champion before either moves it, every time,
            (out / f"read-{me}").touch()  # then a moves it and b after a is done (no two alias writes at once)
            wait_for = [out / f"read-{n}" for n in "ab"] + ([out / "done-a.json"] if me == "b" else [])
            while not all(path.exists() for path in wait_for):
                time.sleep(0.02)
        else:
            time.sleep(2.5)
    return found
registry._version_by_alias = slow
real_lock = registry.registry_lock
if os.environ.get("NO_LOCK"):
    registry.registry_lock = lambda cfg, on_wait=None: nullcontext()

(out / f"ready-{me}").touch()
while not (out / "go").exists():
    time.sleep(0.02)
with registry.registry_lock(cfg):  # the flow's critical section: register, then promote
    entered = time.time()
    with real_lock(cfg):  # registering stays serial in the control too: only the promotion races there
        version = registry.log_and_register(cfg, Path(sys.argv[4]), {"sentiment": {"accuracy": 0.8}},
                                            {"passed": True, "decision": "promote", "gates": []})
    registry.promote(cfg, version, reason=f"run {me}")
    left = time.time()
(out / f"done-{me}.json").write_text(json.dumps({"version": version, "entered": entered, "left": left}))
"""


def _race(cfg, checkpoint: Path, tmp_path: Path, lock: bool) -> list[dict]:
    out = tmp_path / ("locked" if lock else "unlocked")
    out.mkdir()
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(cfg.model_dump_json())
    tracking.experiment_id(cfg)  # the store exists: two processes migrating a new SQLite file race on their own
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    if not lock:
        env["NO_LOCK"] = "1"
    logs = {name: out / f"log-{name}.txt" for name in ("a", "b")}  # files, not pipes: nobody reads while they run
    procs = []
    for name, log in logs.items():
        with log.open("w") as sink:
            procs.append(subprocess.Popen([sys.executable, "-c", CHILD, str(cfg_file), name, str(out), str(checkpoint)],
                                          env=env, stdout=sink, stderr=subprocess.STDOUT))
    deadline = time.time() + 180
    while not all((out / f"ready-{name}").exists() for name in ("a", "b")):
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    else:
        (out / "go").touch()
        deadline = time.time() + 900  # a child that fails ends the race at once: the other may wait for it forever
        while any(p.poll() is None for p in procs) and all(p.poll() in (None, 0) for p in procs):
            if time.time() > deadline:
                break
            time.sleep(0.1)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    for proc, log in zip(procs, logs.values()):
        assert proc.returncode == 0, log.read_text()[-3000:]
    return [json.loads((out / f"done-{name}.json").read_text()) for name in ("a", "b")]


def test_concurrent_register_and_promote_run_one_at_a_time(cfg, fake_checkpoint, tmp_path):
    first, second = sorted(_race(cfg, fake_checkpoint, tmp_path, lock=True), key=lambda d: d["entered"])
    assert first["left"] <= second["entered"]  # the sections did not overlap
    assert sorted(_aliases(cfg).items()) == [("challenger", second["version"]), ("champion", second["version"])]
    assert _tags(cfg, second["version"])["previous_champion"] == str(first["version"])
    assert _tags(cfg, first["version"])["previous_champion"] == ""
    assert registry.rollback(cfg, reason="walk back") == first["version"]


def test_without_the_lock_the_same_race_breaks_the_history(cfg, fake_checkpoint, tmp_path):
    """The control: the race above is real, so the test above would catch a lock that does not hold."""
    runs = _race(cfg, fake_checkpoint, tmp_path, lock=False)
    champion = registry.champion_version(cfg)
    assert {r["version"] for r in runs} == {1, 2} and champion in (1, 2)
    assert _tags(cfg, champion)["previous_champion"] == ""  # it replaced the other, but never saw it
