"""Shared word boundaries between cws and pos at decode time (tasks_mtl.boundaries): the CRF marginals are the
true ones, the evidence goes to the right tags, and a task that weighs it heavily cuts where the other task does."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torchcrf import CRF

from tasks_mtl import boundaries
from tasks_mtl.config import TaskConfig
from tasks_mtl.predict import Predictor


def _crf(tags: int, seed: int) -> CRF:
    torch.manual_seed(seed)
    crf = CRF(tags, batch_first=True)
    for p in crf.parameters():
        torch.nn.init.normal_(p, std=1.0)
    return crf


def test_marginals_equal_the_enumerated_path_probabilities_with_padding():
    crf = _crf(3, 0)
    emissions = torch.randn(2, 4, 3)
    mask = torch.tensor([[True] * 4, [True, True, True, False]])
    got = boundaries.marginals(crf, emissions, mask)
    for row, length in enumerate(mask.sum(1).tolist()):
        expected = torch.zeros(length, 3)
        total = torch.tensor(0.0)
        for path in itertools.product(range(3), repeat=length):
            score = crf.start_transitions[path[0]] + crf.end_transitions[path[-1]]
            score = score + sum(emissions[row, t, y] for t, y in enumerate(path))
            score = score + sum(crf.transitions[a, b] for a, b in itertools.pairwise(path))
            weight = torch.exp(score)
            total = total + weight
            for t, y in enumerate(path):
                expected[t, y] += weight
        assert torch.allclose(got[row, :length], (expected / total).detach(), atol=1e-5)


def test_roles_and_evidence_signs():
    start, end = boundaries.roles(["B", "M", "E", "S"], "bmes")
    assert start.tolist() == [1, -1, -1, 1] and end.tolist() == [-1, -1, 1, 1]
    start, end = boundaries.roles(["O", "B-n", "I-n"], "bio")
    assert start.tolist() == [0, 1, -1] and end is None
    emissions = torch.zeros(1, 3, 4)
    mask = torch.tensor([[True, True, False]])
    odds = torch.tensor([[2.0, -4.0, 0.0]])
    out = boundaries.add_evidence(emissions, mask, odds, 1.0, *boundaries.roles(["B", "M", "E", "S"], "bmes"))
    # position 0: starts +1 (B, S), continues -1; its end evidence is position 1's start odds (-4): E, S -2, B, M +2
    assert out[0, 0].tolist() == [1 + 2, -1 + 2, -1 - 2, 1 - 2]
    # position 1 is the text's last character: a word surely ends there
    assert out[0, 1].tolist() == pytest.approx([-2 - 10, 2 - 10, 2 + 10, -2 + 10])


def _predictor(weight: float) -> Predictor:
    predictor = object.__new__(Predictor)  # only the task configs and the CRFs matter here
    predictor.tasks = {
        "cws": TaskConfig(type="token_classification", bundled="cws", scheme="bmes", output="words", crf=True,
                          boundary_evidence=weight),
        "pos": TaskConfig(type="token_classification", bundled="pos", labels=["n", "v"], scheme="bio",
                          output="tagged_words", crf=True),
        "ner": TaskConfig(type="token_classification", bundled="ner", labels=["PER"], scheme="bio", crf=True),
    }
    predictor.model = SimpleNamespace(heads={"cws": SimpleNamespace(crf=_crf(4, 1)),
                                             "pos": SimpleNamespace(crf=_crf(5, 2)),
                                             "ner": SimpleNamespace(crf=_crf(3, 3))})
    predictor.trained = set(predictor.tasks)
    return predictor


def test_a_task_that_weighs_the_evidence_heavily_cuts_where_the_other_does():
    torch.manual_seed(5)
    packed = {"cws": (torch.randn(3, 9, 4), torch.ones(3, 9, dtype=torch.bool)),
              "pos": (torch.randn(3, 9, 5) * 3, torch.ones(3, 9, dtype=torch.bool))}
    packed["cws"][1][2, 6:] = False
    packed["pos"][1][2, 6:] = False
    predictor = _predictor(1000.0)
    assert predictor.evidence_tasks(["cws"]) == ["pos"]  # word-cutting CRFs only: not ner
    assert predictor.evidence_tasks(["pos"]) == []  # pos reads nothing at weight 0
    emissions, mask = predictor._with_evidence("cws", packed)
    pos_start = boundaries.marginals(predictor.model.heads["pos"].crf, *packed["pos"])[..., [1, 3]].sum(-1) > 0.5
    cws_crf = predictor.model.heads["cws"].crf
    for row, path in enumerate(cws_crf.decode(emissions, mask=mask)):
        starts = [tag in (0, 3) for tag in path]  # B or S
        assert starts == pos_start[row, : len(path)].tolist()
    plain, _ = _predictor(0.0)._with_evidence("cws", packed)
    assert torch.equal(plain, packed["cws"][0])
    alone = [tag in (0, 3) for tag in cws_crf.decode(packed["cws"][0], mask=mask)[0]]
    assert alone != pos_start[0].tolist()  # the evidence changed a decision the cws CRF made alone


def test_untrained_heads_give_no_evidence():
    """A run whose stages never train pos leaves its head as initialised: cws must not read its boundaries."""
    predictor = _predictor(1.0)
    predictor.trained = {"cws", "ner"}
    assert predictor.evidence_tasks(["cws"]) == []
    packed = {"cws": (torch.randn(1, 4, 4), torch.ones(1, 4, dtype=torch.bool)),
              "pos": (torch.randn(1, 4, 5), torch.ones(1, 4, dtype=torch.bool))}
    assert torch.equal(predictor._with_evidence("cws", packed)[0], packed["cws"][0])


def test_checkpoints_record_the_tasks_their_stages_trained(tiny_tokenized, tmp_path):
    from tasks_mtl.checkpoint import read_meta
    from tasks_mtl.config import load_config
    from tasks_mtl.train import train_stage

    cfg = tiny_tokenized
    stages = [{"name": "a", "tasks": ["cws"], "steps": 2}, {"name": "b", "tasks": ["ner"], "steps": 2}]
    cfg = load_config(cfg.root / "params.yaml", overrides={"training.stages": stages,
                                                           "training.output_dir": str(tmp_path / "ckpt")})
    first, second = train_stage(cfg, 0), train_stage(cfg, 1)
    assert read_meta(first)["trained_tasks"] == ["cws"]
    assert read_meta(second)["trained_tasks"] == ["cws", "ner"]
    assert Predictor.from_dir(second).trained == {"cws", "ner"}
