"""The L-BFGS fit of a window CRF (tasks_mtl.crf_fit): the head then decodes exactly as the fitted CRF does,
and the features stage fits such tasks before its SGD loop and leaves them out of it."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_project import make_tiny_project

FIT_TASKS = {"ner": {"window_weights": True, "crf": True, "lbfgs_iterations": 30},
             "cws": {"window_weights": True, "crf": True, "lbfgs_iterations": 30}}
STAGES = [
    {"name": "features", "features_only": True, "steps": 4, "head_lr": 5e-3},
    {"name": "joint", "steps": 3, "encoder_lr": 1e-3, "head_lr": 1e-3},
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The tiny project with ner and cws fitted by L-BFGS in its features stage (sentiment's n-gram bag by SGD)."""
    from tasks_mtl.tokenization import tokenize
    from tasks_mtl.train import train_stage

    cfg = make_tiny_project(tmp_path_factory.mktemp("crf"), {
        "tasks": {**FIT_TASKS, "sentiment": {"ngram_bag": 8}},
        "training": {"stages": STAGES},
    })
    tokenize(cfg)
    return cfg, train_stage(cfg, 0)


def _tagger_and_rows(cfg, model, task):
    """A crfsuite tagger fitted on the same attributes as the stage's fit, and the tokenized train rows."""
    import pycrfsuite

    from tasks_mtl.crf_fit import PENALTY, window_attributes
    from tasks_mtl.train import load_features

    trainer = pycrfsuite.Trainer(algorithm="lbfgs", verbose=False)
    for x, y in zip(*window_attributes(model, load_features(cfg, task), task)):
        trainer.append(x, y)
    trainer.set_params({**PENALTY, "max_iterations": cfg.tasks[task].lbfgs_iterations})
    path = str(cfg.path("crfsuite-" + task))
    trainer.train(path)
    tagger = pycrfsuite.Tagger()
    tagger.open(path)
    return tagger, load_features(cfg, task)


@pytest.mark.parametrize("task", ["ner", "cws"])
def test_the_head_decodes_as_the_fitted_crf(fitted, task):
    from tasks_mtl.checkpoint import load_checkpoint
    from tasks_mtl.crf_fit import window_attributes
    from tasks_mtl.tasks.token_classification import IGNORE, pack_first_pieces

    cfg, checkpoint = fitted
    model, _, _ = load_checkpoint(checkpoint, cfg.tasks)
    model.eval()
    tagger, rows = _tagger_and_rows(cfg, model, task)
    xs, _ = window_attributes(model, rows, task)
    expected = [tagger.tag(x) for x in xs]
    labels = model.task_types[task].labels
    got = []
    for row in rows:
        batch = {"input_ids": torch.tensor([row["input_ids"]]), "attention_mask": torch.tensor([row["attention_mask"]]),
                 "labels": torch.tensor([row["labels"]])}
        with torch.no_grad():
            _, emissions = model.forward_tasks([task], batch, features_only=True)[task]
        packed, mask = pack_first_pieces(emissions, batch["labels"])
        if (batch["labels"] != IGNORE).any():
            got.append([labels[i] for i in model.heads[task].crf.decode(packed, mask=mask)[0]])
    assert len(got) == len(expected) > 10
    assert got == expected
    assert len({tag for tags in expected for tag in tags}) >= 2  # a fit that tags everything alike proves nothing


def test_the_stage_fits_first_and_trains_the_rest_by_sgd(fitted):
    from tasks_mtl.runlog import read_logs

    cfg, checkpoint = fitted
    assert json.loads((checkpoint / "done.json").read_text())["steps"] == STAGES[0]["steps"]
    losses = {metric for _, stage, metric, _ in read_logs(cfg) if metric.startswith("loss/")}
    assert losses == {"loss/sentiment"}  # ner and cws were fitted, not stepped


def test_weights_land_on_the_rows_the_model_reads(fitted):
    """Non-zero window weights sit only on table rows that the training text's windows index."""
    from tasks_mtl.checkpoint import load_checkpoint
    from tasks_mtl.crf_fit import window_attributes
    from tasks_mtl.train import load_features

    cfg, checkpoint = fitted
    model, _, _ = load_checkpoint(checkpoint, cfg.tasks)
    xs, _ = window_attributes(model, load_features(cfg, "ner"), "ner")
    seen = {tuple(map(int, a.split(":"))) for x in xs for position in x for a in position if a != "bias"}
    for slot, table in enumerate(model.heads["ner"].lexical.slots):
        rows = torch.nonzero(table.weight.abs().sum(1)).flatten().tolist()
        assert rows, f"slot {slot} got no weight"
        assert {(slot, r) for r in rows} <= seen


def test_a_fit_needs_its_own_window_crf():
    from pydantic import ValidationError

    from tasks_mtl.config import TaskConfig

    with pytest.raises(ValidationError, match="lbfgs_iterations"):
        TaskConfig(type="token_classification", bundled="ner", crf=True, lbfgs_iterations=10)
    with pytest.raises(ValidationError, match="window_features off"):
        TaskConfig(type="token_classification", bundled="ner", crf=True, window_weights=True,
                   window_features=True, lbfgs_iterations=10)
