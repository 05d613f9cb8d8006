"""Shared pieces of the slow end-to-end tests: a project root in tmp and a subprocess runner."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def relaxed_gates(params: Path, profile: str = "quick") -> list[str]:
    """`-S` options that open every threshold gate: these runs test orchestration, not model quality
    (a quick model is near chance, and which side of a floor it lands on varies)."""
    from tasks_mtl.config import load_config

    cfg = load_config(params, profile=profile)
    options = []
    for task, floors in cfg.gates.thresholds.items():
        for metric in floors:
            bound = 1e12 if metric in cfg.gates.lower_is_better else 0
            options += ["-S", f"gates.thresholds.{task}.{metric}={bound}"]
    return options


def env_for(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update({
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        "PREFECT_HOME": str(root / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "MTL_MODEL_CACHE": str(root / ".model-cache"),
        "PYTHONPATH": str(REPO),
        **extra,
    })
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


SHRUNK_LINES = 1500  # per raw file: enough rows for the quick profile's caps (400 train / 100 test per task)


def ingest_shrunk(root: Path, env: dict[str, str]) -> None:
    """Ingest the bundled corpora, then keep the first lines of each file.

    These tests exercise orchestration; validating and preparing the full corpora would cost a
    minute per pipeline run without showing anything more (the full data has its own tests).
    """
    run([str(BIN / "mtl"), "ingest", "--out", "data"], root, env)
    for name in ("sentiment/neg.txt", "sentiment/pos.txt", "peoples_daily/199801.txt"):
        path = root / "data" / name
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(lines[:SHRUNK_LINES]), encoding="utf-8")


def make_root(root: Path) -> Path:
    """A run root: params.yaml of the checkout and ingested (shrunk) data/."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    ingest_shrunk(root, env_for(root))
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, what: str, timeout: float = 180,
                 log: Callable[[], str] = lambda: "") -> None:
    """Poll `url` until it answers 200; fail with `what` and the server's `log()` tail if the process exits or
    `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200:
                return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not start:\n{log()[-4000:]}")
        time.sleep(0.3)
