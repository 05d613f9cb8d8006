"""Per-task metrics and the multi-task gain."""

import pytest

from tasks_mtl.config import TaskConfig
from tasks_mtl.evaluate import classification_metrics, multi_task_gain, tagging_metrics


def test_classification_metrics():
    m = classification_metrics([0, 1, 1, 1], [0, 1, 0, 1], num_labels=2)
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


def test_word_f1_for_segmentation():
    cws = TaskConfig(type="token_classification", bundled="cws", scheme="bmes")
    gold = [["B", "E", "S", "B", "M", "E"]]  # 我们 / 在 / 北京市
    pred = [["B", "E", "S", "B", "E", "S"]]  # 我们 / 在 / 北京 / 市
    m = tagging_metrics(pred, gold, cws)
    assert m["precision"] == pytest.approx(2 / 4) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)


def test_entity_f1_per_type():
    ner = TaskConfig(type="token_classification", bundled="ner", labels=["PER", "LOC"], scheme="bio")
    gold = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]]
    pred = [["B-PER", "I-PER", "O", "B-LOC", "O"]]
    m = tagging_metrics(pred, gold, ner)
    assert m["f1_PER"] == 1.0 and m["f1_LOC"] == 0.0 and m["f1"] == pytest.approx(0.5)


def test_multi_task_gain_signs_lower_is_better_metrics():
    single = {"a": {"accuracy": 0.8}, "m": {"perplexity": 100.0}}
    multi = {"a": {"accuracy": 0.88}, "m": {"perplexity": 80.0}}
    gains = multi_task_gain(multi, single)
    assert gains["a"] == pytest.approx(10.0) and gains["m"] == pytest.approx(20.0)
