"""One fingerprint (config, data, package source) keys the training stages, the tokenized cache and the
Prefect tokenize cache: editing a weighting method's file changes all three and retrains the stage; an
unchanged tree gives the same key in another process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from tiny_project import REPO_ROOT, make_tiny_project

from tasks_mtl import fingerprint
from tasks_mtl.config import load_config
from tasks_mtl.runlog import stage_dir
from tasks_mtl.tokenization import _inputs_hash, tokenize
from tasks_mtl.train import is_done, stage_key, train_stage

STAGE = {"name": "only", "steps": 2, "encoder_lr": 1e-3, "head_lr": 3e-3, "weighting": "uncertainty"}


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """A copy of the real tasks_mtl source that the fingerprint hashes instead of the checkout (so the test
    can edit it, and edits others make to the checkout meanwhile do not disturb it)."""
    copy = tmp_path / "pkg" / "tasks_mtl"
    shutil.copytree(fingerprint.PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(fingerprint, "PACKAGE_DIR", copy)
    return copy


def test_source_hash_reads_the_files(package_copy):
    before = fingerprint.source_hash(package_copy)
    assert before == fingerprint.source_hash(package_copy)  # cached per process
    (package_copy / "__pycache__").mkdir(exist_ok=True)
    (package_copy / "__pycache__" / "x.cpython-312.pyc").write_bytes(b"bytecode")  # not source
    fingerprint.source_hash.cache_clear()
    assert fingerprint.source_hash(package_copy) == before
    (package_copy / "weighting" / "new_method.py").write_text('"""A new method."""\n')
    fingerprint.source_hash.cache_clear()
    assert fingerprint.source_hash(package_copy) != before


def test_weighting_edit_reruns_the_stage(tmp_path, package_copy):
    from flows.steps import tokenize_cache_key

    cfg = make_tiny_project(tmp_path / "project", {"training": {"stages": [STAGE]}})
    tokenize(cfg)
    train_stage(cfg, 0)
    done = stage_dir(cfg, 0) / "done.json"
    first = json.loads(done.read_text())["key"]
    assert first == stage_key(cfg, 0) and is_done(cfg, 0)
    tokenized = json.loads((cfg.path(cfg.data.tokenized_dir) / "meta.json").read_text())["inputs"]
    assert tokenized == _inputs_hash(cfg)
    prefect_key = tokenize_cache_key(None, {"cfg": cfg, "data_hash": "d0"})

    weighting = package_copy / "weighting" / "uncertainty.py"
    weighting.write_text(weighting.read_text(encoding="utf-8") + "\n# edited: a new weighting rule\n", encoding="utf-8")
    fingerprint.source_hash.cache_clear()  # a new process would hash the edited tree

    assert stage_key(cfg, 0) != first and not is_done(cfg, 0)
    assert _inputs_hash(cfg) != tokenized  # tokenize would run again
    assert tokenize_cache_key(None, {"cfg": cfg, "data_hash": "d0"}) != prefect_key  # so would the Prefect step
    train_stage(cfg, 0)  # trains again instead of returning the old model
    assert json.loads(done.read_text())["key"] == stage_key(cfg, 0) != first


def test_unchanged_tree_gives_the_same_key_in_another_process(tmp_path, package_copy):
    make_tiny_project(tmp_path / "project", {"training": {"stages": [STAGE]}})
    params = tmp_path / "project" / "params.yaml"
    here = stage_key(load_config(params), 0)
    code = (
        "import sys; from pathlib import Path; from tasks_mtl import fingerprint; "
        "from tasks_mtl.config import load_config; from tasks_mtl.train import stage_key; "
        "fingerprint.PACKAGE_DIR = Path(sys.argv[1]); print(stage_key(load_config(sys.argv[2]), 0))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    there = subprocess.run([sys.executable, "-c", code, str(package_copy), str(params)], cwd=REPO_ROOT, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert there == here


def test_dvc_stages_depend_on_the_package_source():
    """`dvc repro` reruns tokenize, train and evaluate after a code edit (their outputs persist, and the
    fingerprint inside decides what is reused); bytecode written on import is not a change."""
    import yaml

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    for name in ("tokenize", "train", "evaluate"):
        assert "tasks_mtl" in stages[name]["deps"], name
    ignored = (REPO_ROOT / ".dvcignore").read_text(encoding="utf-8").split()
    assert "__pycache__/" in ignored
