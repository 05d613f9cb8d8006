"""The champion's test scores are cached by (model version, test data, settings, code): a rerun on unchanged
data does not score the champion again, a change of the test data does."""

import json

import pytest
from test_retrain import fakes  # noqa: F401 - the flow with the library replaced by fakes

from flows.retrain import run_local
from tasks_mtl import evaluate as evaluation
from tasks_mtl import registry


def _write_test_split(cfg, text: str) -> None:
    out = cfg.path(cfg.data.prepared_dir) / "sentiment" / "test.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"text": text, "label": "positive"}, ensure_ascii=False) + "\n", encoding="utf-8")


def test_cached_evaluate_scores_once_per_key(tiny_cfg, monkeypatch):
    calls = []

    def evaluate(cfg, checkpoint, split="test"):
        calls.append(checkpoint)
        return {"sentiment": {"accuracy": 0.5 + len(calls) / 10}}

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    model = {"name": "m", "version": 1}
    key = evaluation.scores_key(tiny_cfg, model)
    assert evaluation.cached_evaluate(tiny_cfg, "ckpt", key) == ({"sentiment": {"accuracy": 0.6}}, False)
    assert evaluation.cached_evaluate(tiny_cfg, "ckpt", key) == ({"sentiment": {"accuracy": 0.6}}, True)
    assert calls == ["ckpt"]
    assert evaluation.scores_key(tiny_cfg, {"name": "m", "version": 2}) != key  # another version
    with (tiny_cfg.path(tiny_cfg.data.prepared_dir) / "ner" / "test.jsonl").open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"tokens": ["我"], "tags": ["O"]}) + "\n")
    changed = evaluation.scores_key(tiny_cfg, model)
    assert changed != key  # the test data changed
    assert evaluation.cached_evaluate(tiny_cfg, "ckpt", changed) == ({"sentiment": {"accuracy": 0.7}}, False)
    (tiny_cfg.path(tiny_cfg.reports_dir) / "champion_scores.json").write_text("{not json")
    assert evaluation.cached_evaluate(tiny_cfg, "ckpt", changed)[1] is False  # a broken file: scored again
    assert len(calls) == 3


@pytest.mark.slow  # four flow runs on fakes, ~40 s on the loaded 2-core box
def test_a_rerun_on_unchanged_data_does_not_rescore_the_champion(mlflow_cfg, fakes, monkeypatch):  # noqa: F811
    import tasks_mtl.data.prepare

    cfg = mlflow_cfg
    data = {"text": "这家店的菜很好吃"}
    monkeypatch.setattr(tasks_mtl.data.prepare, "prepare", lambda cfg: _write_test_split(cfg, data["text"]) or {})
    assert run_local(cfg)["promoted"]  # version 1 becomes champion; nothing to re-score yet
    assert fakes["champion_evaluated"] == []
    champion = registry.resolve_model_dir(cfg, None)

    cfg.gates.thresholds = {"sentiment": {"accuracy": 0.99}}  # a changed configuration: the run goes on
    second = run_local(cfg)
    assert second["version"] == 2 and not second["promoted"]
    assert fakes["champion_evaluated"] == [champion]  # scored once on this test data

    cfg.gates.thresholds = {"sentiment": {"accuracy": 0.98}}
    third = run_local(cfg)
    assert third["version"] == 3 and "error" not in third
    assert fakes["champion_evaluated"] == [champion]  # same champion, same test data: from the cache
    no_regression = [g for g in third["gates"]["gates"] if g["kind"] == "no_regression"]
    assert no_regression and all(g["champion"] is not None for g in no_regression)

    data["text"] = "房间很干净，服务也好。"  # the test split changes
    cfg.gates.thresholds = {"sentiment": {"accuracy": 0.97}}
    assert run_local(cfg)["version"] == 4
    assert fakes["champion_evaluated"] == [champion, champion]  # re-scored on the new test data
