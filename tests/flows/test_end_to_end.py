"""Slow: the real quick pipeline through Prefect, a scheduled deployment on a process worker,
and the same stages under `dvc repro`."""

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from e2e_helpers import (
    BIN,
    REPO,
    env_for,
    free_port,
    ingest_shrunk,
    make_root,
    relaxed_gates,
    run,
    wait_healthy,
)

from tasks_mtl import registry
from tasks_mtl.config import load_config

pytestmark = pytest.mark.slow
TASKS = {"sentiment", "ner", "cws", "pos", "nsp", "mlm"}


@pytest.fixture(scope="module")
def quick_root(tmp_path_factory) -> Path:
    return make_root(tmp_path_factory.mktemp("quick"))


def _versions(root: Path, monkeypatch) -> dict[int, list[str]]:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(root / "params.yaml", profile="quick")
    return {row["version"]: row["aliases"] for row in registry.list_versions(cfg)}


def test_quick_pipeline_then_a_stricter_rerun(quick_root, monkeypatch):
    root, env = quick_root, env_for(quick_root)
    mtl = str(BIN / "mtl")
    relaxed = relaxed_gates(root / "params.yaml")
    start = time.perf_counter()
    run([mtl, "pipeline", "--profile", "quick", *relaxed], root, env)
    first_seconds = time.perf_counter() - start
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    assert set(metrics) == TASKS
    gates = json.loads((root / "reports" / "gates.json").read_text())
    failed = [g["kind"] for g in gates["gates"] if not g["passed"]]
    assert failed == ["production"], gates  # every quality gate open; a smoke profile never crowns
    assert _versions(root, monkeypatch) == {1: ["smoke"]}
    (root / "in.jsonl").write_text('{"text": "房间很干净，服务也好。"}\n', encoding="utf-8")
    run([mtl, "predict", "--input", "in.jsonl", "--output", "out.jsonl", "--model", "models:/mtl-bert-zh@smoke"],
        root, env)
    record = json.loads((root / "out.jsonl").read_text(encoding="utf-8"))
    assert record["sentiment"]["label"] in {"negative", "positive"} and "".join(record["cws"]) == record["text"]

    start = time.perf_counter()
    run([mtl, "pipeline", "--profile", "quick", *relaxed, "-S", "gates.thresholds.sentiment.accuracy=1.01"], root, env)
    second_seconds = time.perf_counter() - start
    assert json.loads((root / "reports" / "gates.json").read_text())["decision"] == "reject"
    assert _versions(root, monkeypatch) == {1: [], 2: ["smoke"]}
    listing = run([mtl, "models", "--params", "params.yaml"], root, env | {"COLUMNS": "200"}).stdout
    assert "smoke" in listing and "quick" in listing and "failed" in listing
    print(f"\nquick pipeline wall time: first {first_seconds:.0f} s, rerun (stages done) {second_seconds:.0f} s")


def test_deployment_on_a_process_worker_registers_a_version(quick_root, monkeypatch):
    root = quick_root
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = root / ".prefect-server"
    env = env_for(root, PREFECT_HOME=str(home), PREFECT_API_URL=api)
    before = _versions(root, monkeypatch)
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"{api}/health", server, "prefect server")
        run([str(BIN / "python"), "-m", "flows.deploy", "--root", str(REPO), "--params", str(root / "params.yaml"),
             "--profile", "quick", "--name", "weekly-test"], REPO, env)
        deployments = run([str(BIN / "prefect"), "deployment", "ls"], root, env).stdout
        assert "weekly-test" in deployments
        # the quick runs before this one left nothing changed: forced, so that the worker's run registers
        run([str(BIN / "prefect"), "deployment", "run", "retrain/weekly-test", "--param", "force=true"], root, env)
        run([str(BIN / "prefect"), "worker", "start", "--pool", "mtl-process", "--run-once", "--limit", "1"], root, env, timeout=900)
    finally:
        server.terminate()
        server.wait(timeout=60)
    after = _versions(root, monkeypatch)
    new = set(after) - set(before)
    assert len(new) == 1, (before, after)


def _dvc(args: list[str], repo: Path, env: dict[str, str]) -> str:
    return run([str(BIN / "dvc"), *args], repo, env, timeout=1200).stdout


def test_dvc_repro_reruns_only_what_changed(tmp_path):
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split()
    repo = tmp_path / "repo"
    for name in listed:
        if (REPO / name).is_file() and not name.startswith("data/"):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    env = env_for(repo, DVC_NO_ANALYTICS="1")
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    run(["git", "init", "-q"], repo, env)
    if not (repo / ".dvc").is_dir():  # the checkout's own .dvc/ is copied when it exists
        _dvc(["init", "-q"], repo, env)
    ingest_shrunk(repo, env)
    _dvc(["add", "-q", "data"], repo, env)
    params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
    params["profile"] = "quick"
    for section in ("encoder", "data", "tasks", "training"):  # dvc.yaml names these sections
        params[section] = params.get(section) or {}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    run([*git, "add", "-A"], repo, env)
    run([*git, "commit", "-qm", "init"], repo, env)

    _dvc(["repro"], repo, env)
    assert set(json.loads((repo / "reports" / "metrics.json").read_text())) == TASKS
    assert "up to date" in _dvc(["status"], repo, env)
    again = _dvc(["repro"], repo, env)
    assert "Running stage" not in again, again

    # bit for bit: training again from nothing locks the same checkpoints, so evaluate has nothing to redo
    locked = (repo / "dvc.lock").read_text()
    shutil.rmtree(repo / "checkpoints")
    retrained = _dvc(["repro"], repo, env)
    ran = {line.split("'")[1] for line in retrained.splitlines() if line.startswith("Running stage")}
    assert ran == {"train"}, retrained
    assert (repo / "dvc.lock").read_text() == locked
    assert list((repo / "checkpoints").glob("*.timing.json")) and list((repo / "checkpoints").glob("*.log.csv"))

    dag = _dvc(["dag", "--dot"], repo, env)  # one chain: validate checks what ingest described
    for edge in ("ingest", "validate"), ("validate", "prepare"), ("prepare", "tokenize"), ("tokenize", "train"):
        assert f'"{edge[0]}" -> "{edge[1]}"' in dag, dag

    shown = _dvc(["metrics", "show"], repo, env)
    assert "sentiment.accuracy" in shown
    _dvc(["plots", "show", "-o", str(tmp_path / "plots")], repo, env)
    assert (tmp_path / "plots" / "index.html").exists()

    params["training"]["clip_norm"] = 0.5  # a training parameter: only train and evaluate depend on it
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    changed = _dvc(["repro"], repo, env)
    ran = {line.split("'")[1] for line in changed.splitlines() if line.startswith("Running stage")}
    assert ran == {"train", "evaluate"}, changed
