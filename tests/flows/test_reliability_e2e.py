"""Slow: the real quick pipeline, twice at once on one checkout, then against a champion that a
default-profile run made. What it must show (README, "What the registry promises"): one run waits for the
other, which then finds nothing changed; the registry holds one smoke version and no champion; and a forced
quick run leaves the default champion in place, its own version saying "quick"."""

import json
import subprocess
import time

import pytest
from e2e_helpers import BIN, env_for, make_root, run

from tasks_mtl import registry, tracking
from tasks_mtl.config import load_config
from tasks_mtl.gates import evaluate_gates
from tasks_mtl.runlog import stage_dir

pytestmark = pytest.mark.slow


def test_two_quick_runs_at_once_then_a_quick_run_against_a_default_champion(tmp_path_factory, monkeypatch):
    root = make_root(tmp_path_factory.mktemp("race"))
    env = env_for(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    quick = load_config(root / "params.yaml", profile="quick")
    pipeline = [str(BIN / "mtl"), "pipeline", "--profile", "quick"]  # its gates are open already (all at 0)

    start = time.perf_counter()
    procs = [subprocess.Popen(pipeline, cwd=root, env=env | {"COLUMNS": "200"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=1800)[0] for proc in procs]
    both_seconds = time.perf_counter() - start
    assert [proc.returncode for proc in procs] == [0, 0], "\n\n".join(out[-3000:] for out in outputs)
    waited = [out for out in outputs if "waiting for" in out and ".mtl-run.lock" in out]
    assert len(waited) == 1, outputs  # one ran, the other waited its turn ...
    assert "nothing changed since version 1" in " ".join(waited[0].split())  # ... and then had nothing to do
    rows = registry.list_versions(quick)
    assert [(r["version"], r["aliases"], r["profile"]) for r in rows] == [(1, ["smoke"], "quick")]
    assert registry.champion_version(quick) is None  # a smoke run never crowns, even a first model

    # A champion made by the default profile, cheaply: the quick checkpoint registered under the default
    # configuration (so its tags say "default"), and promoted by hand.
    default = load_config(root / "params.yaml", profile="default")
    checkpoint = stage_dir(quick, len(quick.training.stages) - 1)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    champion = registry.log_and_register(default, checkpoint, metrics, evaluate_gates(default, metrics, None))
    registry.promote(default, champion, reason="stands in for a default-profile run")
    assert champion == 2

    start = time.perf_counter()
    run([*pipeline, "--force"], root, env)  # the same quick configuration: without --force nothing would register
    forced_seconds = time.perf_counter() - start
    gates = json.loads((root / "reports" / "gates.json").read_text())
    assert gates["champion_version"] == 2
    assert [g["kind"] for g in gates["gates"] if not g["passed"]] == ["production"], gates
    assert registry.champion_version(quick) == 2  # left in place
    tags = tracking.client(quick).get_model_version(quick.registry.model_name, "3").tags
    assert tags["profile"] == "quick" and tags["production"] == "false"
    assert tags["config_hash"] == quick.config_hash() != default.config_hash()
    assert {r["version"]: r["aliases"] for r in registry.list_versions(quick)} == {
        1: [], 2: ["challenger", "champion"], 3: ["smoke"]}
    listing = run([str(BIN / "mtl"), "models"], root, env | {"COLUMNS": "200"}).stdout
    assert "default" in listing and "quick" in listing
    print(f"\ntwo quick pipelines at once: {both_seconds:.0f} s; forced quick rerun: {forced_seconds:.0f} s")
