"""Prediction speed options: the shared length batching and the dynamic int8 model for CPU serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tasks_mtl.cli import app
from tasks_mtl.predict import Predictor
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import train_stage

TEXTS = ["张伟在北京学习", "今天天气非常很好", "我们喜欢这个手机质量", "李娜在上海公司", "朋友", "中国北京天气很差",
         "王芳在广州学习非常喜欢", "这个公司很好"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny project's first stage, trained once for the tests of this file."""
    from tiny_project import make_tiny_project

    cfg = make_tiny_project(tmp_path_factory.mktemp("quantize"))
    tokenize(cfg)
    return train_stage(cfg, 0)


def test_batches_by_length_cover_every_row_once_shortest_first():
    predictor = object.__new__(Predictor)  # only the batch size matters here
    predictor.batch_size = 3
    lengths = [5, 1, 5, 3, 9, 1, 2]
    batches = predictor.batches_by_length(lengths)
    assert batches == [[1, 5, 6], [3, 0, 2], [4]]  # sorted by length, ties in input order, 3 rows a batch
    assert all(isinstance(i, int) for batch in batches for i in batch)


def test_quantized_model_keeps_the_contract_and_mostly_agrees(checkpoint):
    exact = Predictor.from_dir(checkpoint, device="cpu")
    quantized = Predictor.from_dir(checkpoint, quantize=True)
    linear = [m for m in quantized.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert linear and not any(type(m) is torch.nn.Linear for m in quantized.model.modules())

    pairs = ["我们喜欢", None] * (len(TEXTS) // 2)
    want, got = exact.predict(TEXTS, pairs), quantized.predict(TEXTS, pairs)
    for record, text in zip(got, TEXTS):
        assert set(record) == set(want[0] if "text_pair" in record else want[1])
        assert "".join(record["cws"]) == text  # words join back to the text
        assert record["sentiment"]["label"] in ("negative", "positive")
        assert all(text[e["start"]:e["end"]] == e["text"] for e in record["ner"])
    # int8 weights move the scores a little; decisions mostly stay
    for task in ("sentiment", "nsp"):
        rows = [i for i, r in enumerate(want) if task in r]
        assert np.allclose([got[i][task]["score"] for i in rows], [want[i][task]["score"] for i in rows], atol=0.05)
    tags = [(a, b) for w, g in zip(exact.token_tags("ner", [list(t) for t in TEXTS]),
                                   quantized.token_tags("ner", [list(t) for t in TEXTS])) for a, b in zip(w, g)]
    assert sum(a == b for a, b in tags) >= 0.8 * len(tags)


def test_mtl_predict_quantize_writes_the_records(checkpoint, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(TEXTS)),
                      encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["predict", "--input", str(source), "--output", str(out), "--model",
                                      str(checkpoint), "--params", str(checkpoint.parent.parent / "params.yaml"), "--quantize"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == list(range(len(TEXTS)))
    assert all({"sentiment", "ner", "cws"} <= set(r) and "".join(r["cws"]) == r["text"] for r in records)
