"""Fixtures for orchestration tests: a private MLflow store and a fake checkpoint/predictor."""

import json
from pathlib import Path

import pytest
from tiny_project import TINY_STAGES

from tasks_mtl.config import Config


class FakePredictor:
    """Stands in for tasks_mtl.predict.Predictor: one record per text, shaped like the real ones."""

    def __init__(self, path: Path):
        self.path = path

    def predict(self, texts, text_pairs=None):
        pairs = text_pairs or [None] * len(texts)
        records = []
        for text, pair in zip(texts, pairs):
            record = {"text": text, "sentiment": {"label": "positive", "score": 0.9}, "cws": list(text)}
            if pair is not None:
                record["nsp"] = {"label": "is_next", "score": 0.7}
            records.append(record)
        return records


@pytest.fixture
def mlflow_cfg(tmp_path, monkeypatch) -> Config:
    """A Config rooted in tmp_path: its SQLite registry and artifacts live there, not in the checkout."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MTL_MODEL_CACHE", str(tmp_path / "model-cache"))
    cfg = Config(root=tmp_path, training={"stages": TINY_STAGES})  # four stages, one of them pretraining
    # the tasks the fake metrics report: every task of a run is gated, so a task without metrics fails its gate
    cfg.tasks = {name: cfg.tasks[name] for name in ("sentiment", "ner", "mlm")}  # mlm: the pretrain stage
    return cfg


@pytest.fixture
def fake_checkpoint(tmp_path, monkeypatch) -> Path:
    """A tiny checkpoint directory, and the registry's predictor loader pointed at FakePredictor."""
    from tasks_mtl import registry

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "mtl.json").write_text(json.dumps({"tasks": ["sentiment"]}), encoding="utf-8")
    monkeypatch.setattr(registry, "_load_predictor", FakePredictor)
    return ckpt


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server for the in-process flow tests, stopped while pytest still owns stdout."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
