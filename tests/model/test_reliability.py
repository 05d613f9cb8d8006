"""Reliability of training and evaluation on the tiny project: broken resume saves are skipped (never
loaded), NaN/inf losses skip their step up to a limit and then stop the stage, and evaluation scores a
checkpoint the same in any process and with any batch size."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_project import make_tiny_project

from tasks_mtl.config import load_config
from tasks_mtl.runlog import stage_dir, stage_log
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import train_stage

STAGE = {"name": "only", "steps": 8, "encoder_lr": 1e-3, "head_lr": 3e-3, "weighting": "uncertainty",
         "sampler": "temperature"}


@pytest.fixture(scope="module")
def projects(tmp_path_factory):
    """A tokenized, untrained one-stage project (`base`, copied by each test) and the same project trained
    straight through (`straight`)."""
    root = tmp_path_factory.mktemp("reliability")
    base = root / "base"
    tokenize(make_tiny_project(base, {"training": {"stages": [STAGE]}}))
    shutil.copytree(base, root / "straight")
    train_stage(load_config(root / "straight" / "params.yaml"), 0)
    return base, root / "straight"


def _copy(base, target, overrides: dict | None = None):
    shutil.copytree(base, target)
    return load_config(target / "params.yaml", overrides=overrides)


def _tensors(checkpoint) -> dict[str, torch.Tensor]:
    encoder = load_file(str(checkpoint / "encoder" / "model.safetensors"))
    return load_file(str(checkpoint / "heads.safetensors")) | encoder


def _assert_same_weights(a, b) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []  # bitwise


# -- resume saves that must not be used --------------------------------------------------------------

def _truncate(resume, name):
    path = resume / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", ["heads.safetensors", "state.safetensors", "state.json", "no manifest",
                                    "other config"])
def test_a_broken_or_stale_resume_save_is_skipped_with_a_warning(projects, tmp_path, caplog, damage):
    base, straight = projects
    cfg = _copy(base, tmp_path / "run")
    resume = train_stage(cfg, 0, stop_after=4)
    assert resume.name.endswith(".resume") and (resume / "manifest.json").exists()
    if damage == "no manifest":  # what a save cut off before its last file leaves
        (resume / "manifest.json").unlink()
    elif damage == "other config":  # a save of this stage under another configuration
        cfg = load_config(tmp_path / "run" / "params.yaml", overrides={"training.stages.0.head_lr": 1e-3})
    else:
        _truncate(resume, damage)
    with caplog.at_level(logging.WARNING):
        done = train_stage(cfg, 0)
    skipped = [r.getMessage() for r in caplog.records if "skipping the resume save" in r.getMessage()]
    assert len(skipped) == 1 and str(resume) in skipped[0], caplog.text
    assert not any("resumes at step" in r.getMessage() for r in caplog.records)  # started over instead
    if damage != "other config":
        _assert_same_weights(done, stage_dir(load_config(straight / "params.yaml"), 0))  # no garbage used
    assert not resume.exists()


def test_a_crash_between_the_two_renames_resumes_from_the_previous_save(projects, tmp_path, caplog):
    base, straight = projects
    cfg = _copy(base, tmp_path / "run")
    resume = train_stage(cfg, 0, stop_after=4)
    resume.rename(resume.with_name(resume.name + ".old"))  # the old save moved aside, the new not in place
    (resume.with_name(resume.name + ".tmp") / "encoder").mkdir(parents=True)  # and a half-written one
    with caplog.at_level(logging.WARNING):
        done = train_stage(cfg, 0)
    assert "stage 'only' resumes at step 4 of 8" in caplog.text and ".resume.old" in caplog.text
    _assert_same_weights(done, stage_dir(load_config(straight / "params.yaml"), 0))
    assert sorted(p.name for p in done.parent.iterdir()) == ["1-only", "1-only.log.csv", "1-only.timing.json"]


# -- NaN / inf losses ----------------------------------------------------------------------------------

def _poison(monkeypatch, task: str, at: dict[int, str]) -> None:
    """Replace the `task`'s n-th loss (counting its losses from 1) by NaN, inf, or a finite loss whose
    gradient is NaN."""
    from tasks_mtl.model import MultiTaskModel

    original = MultiTaskModel.forward_tasks
    seen = [0]

    def forward_tasks(self, tasks, batch, features_only=False):
        out = original(self, tasks, batch, features_only)
        if task in out:
            seen[0] += 1
            loss, logits = out[task]
            kind = at.get(seen[0])
            if kind == "nan":
                loss = loss * float("nan")
            elif kind == "inf":
                loss = loss * float("inf")
            elif kind == "nan-grad":  # value unchanged; d/dloss sqrt(loss - loss) = inf - inf = nan
                loss = loss + torch.sqrt(loss - loss)
            out[task] = (loss, logits)
        return out

    monkeypatch.setattr(MultiTaskModel, "forward_tasks", forward_tasks)


def test_nonfinite_losses_skip_their_step_and_are_counted(projects, tmp_path, monkeypatch, caplog):
    base, _ = projects
    cfg = _copy(base, tmp_path / "run", {"training.stages.0.sampler": "all", "training.stages.0.steps": 6,
                                         "training.log_every": 1})
    _poison(monkeypatch, "sentiment", {2: "nan", 4: "inf", 6: "nan-grad"})  # "all": sentiment every step
    with caplog.at_level(logging.WARNING):
        done = train_stage(cfg, 0)
    assert json.loads((done / "done.json").read_text())["nonfinite_steps"] == 3
    warned = [r.getMessage() for r in caplog.records if "the step is skipped" in r.getMessage()]
    assert len(warned) == 3
    assert "step 2: task 'sentiment' has a loss of nan" in warned[0]
    assert "step 4: task 'sentiment' has a loss of inf" in warned[1]
    assert "step 6: the gradient norm is nan" in warned[2]
    tensors = _tensors(done)
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())  # one NaN step applied spoils them
    rows = [line.split(",") for line in stage_log(cfg, 0).read_text().splitlines()[1:]]
    assert all(math.isfinite(float(value)) for _, _, _, value in rows)
    counts = {int(step): float(value) for step, _, metric, value in rows if metric == "nonfinite_steps"}
    assert counts[2] == 1 and counts[6] == 3


def test_too_many_nonfinite_losses_stop_the_stage_naming_task_and_step(projects, tmp_path, monkeypatch):
    from tasks_mtl.nonfinite import NonFiniteLossError

    base, _ = projects
    limit_one = {"training.stages.0.sampler": "all", "training.max_nonfinite_steps": 1}
    cfg = _copy(base, tmp_path / "run", limit_one)
    _poison(monkeypatch, "ner", {3: "nan", 5: "nan"})
    with pytest.raises(NonFiniteLossError, match=r"stage 'only' stopped at step 5: task 'ner' has a loss of "
                                                 r"nan.*more than training\.max_nonfinite_steps = 1"):
        train_stage(cfg, 0)
    assert not stage_dir(cfg, 0).exists()  # no finished checkpoint for evaluation or the registry to pick up


# -- evaluation determinism -------------------------------------------------------------------------------

SCORE = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from tasks_mtl.config import load_config
from tasks_mtl.evaluate import evaluate
confusion = {}
metrics = evaluate(load_config(sys.argv[1]), sys.argv[2], confusion=confusion)
print(json.dumps({"metrics": metrics, "confusion": confusion}, sort_keys=True))
"""


@pytest.mark.slow
def test_a_checkpoint_scores_the_same_in_two_processes(projects):
    _, straight = projects
    checkpoint = stage_dir(load_config(straight / "params.yaml"), 0)
    results = []
    for threads, hash_seed in ((1, "1"), (2, "2")):  # other thread counts, other str hashing
        env = os.environ | {"PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", SCORE, str(straight / "params.yaml"), str(checkpoint),
                               str(threads)], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert set(results[0]["metrics"]) == {"sentiment", "ner", "cws", "nsp", "mlm"}
    assert results[0] == results[1]  # exactly: every metric and confusion count


def test_mlm_masks_do_not_depend_on_the_batch_size(projects):
    from tasks_mtl.data.prepare import read_split
    from tasks_mtl.evaluate import mlm_metrics
    from tasks_mtl.predict import Predictor

    _, straight = projects
    cfg = load_config(straight / "params.yaml")
    texts = [r["text"] for r in read_split(cfg, "mlm", "test")]
    scores = [mlm_metrics(Predictor.from_dir(stage_dir(cfg, 0), batch_size=size), "mlm", texts, cfg.seed)
              for size in (1, 5, 64)]
    assert [s["accuracy"] for s in scores] == [scores[0]["accuracy"]] * 3
    for s in scores[1:]:  # the same masked tokens: only float sums differ with padding and grouping
        assert s["perplexity"] == pytest.approx(scores[0]["perplexity"], rel=1e-5)
