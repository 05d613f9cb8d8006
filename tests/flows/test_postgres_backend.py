"""Slow: the production backends for real, once. PostgreSQL (Debian's package: `.ci/run` installs it when
`initdb`/`pg_ctl` are missing) on 127.0.0.1, an MLflow tracking server on it that stores and serves the
artifacts (`--serve-artifacts`), and the quick pipeline pointed at that server by MLFLOW_TRACKING_URI: it
registers a version, its gates pass and the flow crowns it; a second version of the checkpoint is promoted by
`mtl promote` and taken back by `mtl rollback`; the champion is loaded back through the server. Every
registry fact is read from PostgreSQL itself. SQLite stays the embedded default (the last test)."""

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from e2e_helpers import BIN, env_for, free_port, make_root, run, wait_healthy

from tasks_mtl import registry, tracking
from tasks_mtl.config import Config, load_config
from tasks_mtl.runlog import stage_dir

MODEL = "mtl-bert-zh"
DB_USER = DB_NAME = "mlflow"


def postgres_bin() -> Path | None:
    """The directory of PostgreSQL's server programs: on PATH, else Debian's /usr/lib/postgresql/<major>/bin
    (the package does not put initdb on PATH), the newest major first."""
    dirs = [Path(found).resolve().parent] if (found := shutil.which("initdb")) else []
    majors = [d for d in Path("/usr/lib/postgresql").glob("*/bin") if d.parent.name.isdigit()]
    dirs += sorted(majors, key=lambda d: int(d.parent.name), reverse=True)
    return next((d for d in dirs if (d / "initdb").is_file() and (d / "pg_ctl").is_file()), None)


def _as_owner(cmd: list[str], owner: str | None) -> list[str]:
    """PostgreSQL's server refuses to run as root: as root, run it as `owner`."""
    return ["runuser", "-u", owner, "--", *cmd] if owner else cmd


def _sql(dsn: str, query: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        return conn.execute(query, args).fetchall()


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with an empty database `mlflow`; yields its DSN. Stopped and
    removed afterwards, whatever happened."""
    import psycopg

    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin, and "
                    ".ci/run could not install Debian's postgresql package")
    owner = None
    if os.geteuid() == 0:
        owner = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        assert owner, "running as root, and neither a `postgres` nor a `nobody` user to run PostgreSQL as"
    base = Path(tempfile.mkdtemp(prefix="mtl-pg-"))  # not under pytest's tmp: that is private to root
    data, port = base / "data", free_port()
    if owner:
        shutil.chown(base, user=owner)
    started = False
    try:
        subprocess.run(_as_owner([str(bindir / "initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust",
                                  "-E", "UTF8", "--no-locale"], owner), check=True, capture_output=True, text=True)
        # fsync off: a throwaway cluster on a busy CI box; the sockets in `base`, not /var/run/postgresql
        options = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off"
        started = True  # from here on, stop it even if the start timed out
        subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"), "-o",
                                  options, "-w", "-t", "120", "start"], owner), check=True, capture_output=True,
                       text=True)
        with psycopg.connect(host="127.0.0.1", port=port, user=DB_USER, dbname="postgres", autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {DB_NAME}")
        yield f"postgresql://{DB_USER}@127.0.0.1:{port}/{DB_NAME}"
    except subprocess.CalledProcessError as err:
        log = (base / "server.log").read_text(errors="replace")[-3000:] if (base / "server.log").exists() else ""
        raise AssertionError(f"{' '.join(err.cmd)} exited {err.returncode}\n{err.stdout}\n{err.stderr}\n{log}") from err
    finally:
        if started:
            subprocess.run(_as_owner([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], owner),
                           capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`mlflow server` on the PostgreSQL store, proxying artifacts into a directory of its own; yields its URL
    and that directory. The server's process group is ended afterwards, whatever happened."""
    served = tmp_path_factory.mktemp("served-artifacts")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = served.parent / "mlflow-server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # its job runners (seven huey processes) serve no model API
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", postgres, "--artifacts-destination", str(served),
             "--serve-artifacts", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=served.parent, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(f"{url}/health", server, "mlflow server",  # it creates its tables in PostgreSQL first
                     log=lambda: log.read_text(errors="replace"))
        yield url, served
    finally:
        _end_group(server)


def _end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this test started (the server and its workers), SIGKILL after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _version_tags(dsn: str, version: int) -> dict[str, str]:
    return dict(_sql(dsn, "SELECT key, value FROM model_version_tags WHERE name = %s AND version = %s", MODEL, version))


def _aliases(dsn: str) -> dict[str, int]:
    """alias -> version, read from PostgreSQL itself (not through MLflow)."""
    return dict(_sql(dsn, "SELECT alias, version FROM registered_model_aliases WHERE name = %s", MODEL))


@pytest.mark.slow
def test_quick_pipeline_on_a_postgres_backed_mlflow_server(postgres, mlflow_server, tmp_path_factory, monkeypatch):
    url, served = mlflow_server
    root = make_root(tmp_path_factory.mktemp("pg-run"))
    env = env_for(root, MLFLOW_TRACKING_URI=url)
    mtl = str(BIN / "mtl")
    # The quick recipe with fewer steps (orchestration, not quality), allowed to crown: its gates (all floors at
    # 0, no champion yet) then pass, and the flow itself moves `champion`.
    crowning = {"production": True}
    options = ["-S", "production=true", "-S", "training.stages.0.steps=20", "-S", "training.stages.1.steps=8"]

    start = time.perf_counter()
    run([mtl, "pipeline", "--profile", "quick", *options], root, env)
    pipeline_seconds = time.perf_counter() - start
    gates = json.loads((root / "reports" / "gates.json").read_text())
    assert gates["decision"] == "promote" and all(g["passed"] for g in gates["gates"]), gates

    # The version, its gate result, the decision and the alias live in PostgreSQL: nothing fell back to SQLite.
    assert _sql(postgres, "SELECT version FROM model_versions WHERE name = %s", MODEL) == [(1,)]
    tags = _version_tags(postgres, 1)
    assert tags["gate"] == "passed" and tags["gate_summary"].startswith("promote") and tags["profile"] == "quick"
    assert tags["promotion"] == "champion" and tags["promoted_by"] == "retrain-flow"
    assert _aliases(postgres) == {"challenger": 1, "champion": 1}
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()

    # The model's files went up through the server, into its artifact destination.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MTL_MODEL_CACHE", str(root / ".model-cache"))
    cfg = load_config(root / "params.yaml", profile="quick", overrides=crowning)
    assert tracking.tracking_uri(cfg) == url
    client = tracking.client(cfg)
    assert client.get_model_version_download_uri(MODEL, "1").startswith("mlflow-artifacts:/")
    assert client.get_run(tags["run_id"]).info.artifact_uri.startswith("mlflow-artifacts:/")
    uploaded = [p.parent for p in served.rglob("MLmodel")]
    assert len(uploaded) == 1 and list(uploaded[0].rglob("mtl.json")), uploaded  # the checkpoint is in there

    # A second version of that checkpoint; promoted by hand, then rolled back, both through the CLI.
    checkpoint = stage_dir(cfg, len(cfg.training.stages) - 1)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    second = registry.log_and_register(cfg, checkpoint, metrics, gates)
    assert second == 2 and _aliases(postgres) == {"challenger": 2, "champion": 1}
    assert len(list(served.rglob("MLmodel"))) == 2
    run([mtl, "promote", "2", "--reason", "by hand, on the PostgreSQL registry"], root, env)
    assert _aliases(postgres)["champion"] == 2
    tags = _version_tags(postgres, 2)
    assert tags["previous_champion"] == "1" and tags["promoted_reason"] == "by hand, on the PostgreSQL registry"
    run([mtl, "rollback", "--reason", "back again"], root, env)
    assert _aliases(postgres) == {"challenger": 2, "champion": 1}
    assert _version_tags(postgres, 2)["rolled_back_to"] == "1" and registry.champion_version(cfg) == 1

    # The champion comes back down through the server and predicts, as `mlflow models serve` would load it.
    import mlflow

    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    [record] = model.predict(pd.DataFrame({"text": ["房间很干净，服务也好。"]}))
    assert record["sentiment"]["label"] in {"negative", "positive"} and "".join(record["cws"]) == record["text"]
    print(f"\nquick pipeline against the PostgreSQL-backed server: {pipeline_seconds:.0f} s")


def test_sqlite_stays_the_embedded_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = Config(root=tmp_path)
    assert tracking.tracking_uri(cfg) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.artifact_root(cfg) == (tmp_path / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5000"
    assert tracking.artifact_root(cfg) is None  # the server chooses, and serves, the artifact location
