"""`mtl ingest` in a fresh directory reproduces the committed data.dvc exactly."""

import os
import subprocess
import sys
from pathlib import Path

from tiny_project import REPO_ROOT

BIN = Path(sys.executable).parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=True)


def test_fresh_ingest_matches_committed_data_dvc(tmp_path):
    import yaml

    _run("git", "init", "-q", cwd=tmp_path)
    _run("dvc", "init", "-q", cwd=tmp_path)
    _run("mtl", "ingest", "--out", "data", cwd=tmp_path)
    _run("dvc", "add", "-q", "data", cwd=tmp_path)
    fresh = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    committed = yaml.safe_load((REPO_ROOT / "data.dvc").read_text())["outs"][0]
    assert {k: fresh[k] for k in ("md5", "size", "nfiles")} == {k: committed[k] for k in ("md5", "size", "nfiles")}
    # with the committed data.dvc in place the workspace is clean; an edited file shows as modified
    (tmp_path / "data.dvc").write_text((REPO_ROOT / "data.dvc").read_text())
    assert "up to date" in _run("dvc", "status", "data.dvc", cwd=tmp_path).stdout
    (tmp_path / "data" / "sentiment" / "pos.txt").write_text("改过的\n", encoding="utf-8")
    assert "modified" in _run("dvc", "status", "data.dvc", cwd=tmp_path).stdout
