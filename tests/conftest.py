"""Test-wide environment: no telemetry, a private Prefect home, and the repository root."""

import os
import tempfile
from pathlib import Path

_home = Path(tempfile.mkdtemp(prefix="mtl-test-prefect-"))
os.environ["PREFECT_HOME"] = str(_home)  # tests never touch the checkout's .prefect
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["GX_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest
from tiny_project import REPO_ROOT, make_tiny_project  # noqa: F401


@pytest.fixture
def tiny_cfg(tmp_path):
    return make_tiny_project(tmp_path)


@pytest.fixture(scope="session")
def tiny_tokenized(tmp_path_factory):
    """A tiny project, tokenized once per session (tests that only read it share it)."""
    from tasks_mtl.tokenization import tokenize

    cfg = make_tiny_project(tmp_path_factory.mktemp("tiny"))
    tokenize(cfg)
    return cfg
