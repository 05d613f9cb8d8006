"""The task-conflict probe inside a real (tiny) training stage: it records, logs and draws, and changes nothing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tasks_mtl.checkpoint import load_checkpoint
from tasks_mtl.conflict import conflict_log
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import stage_dir, train_stage, write_loss_report

STAGE = [{"name": "joint", "tasks": ["sentiment", "ner", "cws", "nsp"], "steps": 6, "encoder_lr": 1e-3,
          "head_lr": 3e-3, "sampler": "round_robin"}]


def _run(tmp_path, every: int, name: str):
    from tiny_project import make_tiny_project

    cfg = make_tiny_project(tmp_path / name, {"training": {"stages": STAGE, "conflict_every": every}})
    tokenize(cfg)
    logged: list[tuple[dict, int]] = []
    train_stage(cfg, 0, log=lambda metrics, step: logged.append((metrics, step)))
    return cfg, logged


@pytest.mark.slow
def test_conflict_probe_records_logs_draws_and_leaves_training_unchanged(tmp_path) -> None:
    cfg, logged = _run(tmp_path, 4, "probe")
    rows = [json.loads(line) for line in conflict_log(cfg, 0).read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 6]  # every 4 steps and the stage's last
    for row in rows:
        assert sorted(row["tasks"]) == ["cws", "ner", "nsp", "sentiment"]
        cos = row["cosine"]
        for i in range(4):
            assert cos[i][i] == pytest.approx(1.0)
            for j in range(4):
                assert cos[i][j] == pytest.approx(cos[j][i]) and -1 <= cos[i][j] <= 1
    assert rows[0]["cosine"] != rows[1]["cosine"]  # the model moved between samples
    pairs = [m for m, _ in logged if any(k.startswith("conflict/") for k in m)]
    assert len(pairs) == 2 and len(pairs[0]) == 6 and all(math.isfinite(v) for v in pairs[0].values())

    write_loss_report(cfg)
    page = (cfg.path(cfg.reports_dir) / "conflict.html").read_text()
    assert page.count("<svg") == 3 and "step 6" in page  # two matrices and the pairs over steps
    assert json.loads((cfg.path(cfg.reports_dir) / "conflict.json").read_text()) == rows

    plain, _ = _run(tmp_path, 0, "plain")
    assert not conflict_log(plain, 0).exists()
    probed = load_checkpoint(stage_dir(cfg, 0), cfg.tasks)[0].state_dict()
    reference = load_checkpoint(stage_dir(plain, 0), plain.tasks)[0].state_dict()
    assert probed.keys() == reference.keys()
    assert all(torch.equal(probed[k], reference[k]) for k in reference)  # the probe changed nothing
