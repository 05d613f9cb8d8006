"""Gate logic: thresholds, no-regression against the champion, tolerances, missing metrics."""

import json

import pytest

from tasks_mtl.config import Config
from tasks_mtl.gates import evaluate_gates, gate_summary, write_gates


@pytest.fixture
def cfg(tmp_path) -> Config:
    tasks = Config().tasks
    return Config(
        root=tmp_path,
        tasks={"sentiment": tasks["sentiment"], "mlm": tasks["mlm"]},
        gates={
            "thresholds": {"sentiment": {"accuracy": 0.6}, "mlm": {"perplexity": 500.0}},
            "tolerance": {"default": 0.01, "perplexity": 5.0},
            "lower_is_better": ["perplexity"],
        },
    )


GOOD = {"sentiment": {"accuracy": 0.80, "macro_f1": 0.79}, "mlm": {"accuracy": 0.2, "perplexity": 120.0}}


def _by_name(result):
    return {g["name"]: g for g in result["gates"]}


def test_first_model_passes_on_thresholds_alone(cfg):
    result = evaluate_gates(cfg, GOOD, champion=None)
    assert result["decision"] == "promote" and result["passed"]
    assert {g["kind"] for g in result["gates"]} == {"threshold"}
    gate = _by_name(result)["sentiment.accuracy >= 0.6"]
    assert gate["value"] == 0.80 and gate["threshold"] == 0.6 and gate["passed"]


def test_threshold_failure_rejects(cfg):
    metrics = {**GOOD, "sentiment": {"accuracy": 0.55}}
    result = evaluate_gates(cfg, metrics, None)
    assert result["decision"] == "reject" and not result["passed"]
    assert not _by_name(result)["sentiment.accuracy >= 0.6"]["passed"]


def test_lower_is_better_threshold_is_a_ceiling(cfg):
    result = evaluate_gates(cfg, {**GOOD, "mlm": {"perplexity": 900.0}}, None)
    gate = _by_name(result)["mlm.perplexity <= 500"]
    assert not gate["passed"] and result["decision"] == "reject"


def test_missing_thresholded_metric_fails(cfg):
    result = evaluate_gates(cfg, {"mlm": GOOD["mlm"]}, None)
    gate = _by_name(result)["sentiment.accuracy >= 0.6"]
    assert gate["value"] is None and not gate["passed"]
    assert result["decision"] == "reject"


def test_nan_never_passes(cfg):
    result = evaluate_gates(cfg, {**GOOD, "sentiment": {"accuracy": float("nan")}}, None)
    assert not _by_name(result)["sentiment.accuracy >= 0.6"]["passed"]


def test_regression_within_tolerance_passes_beyond_it_fails(cfg):
    champion = {"sentiment": {"accuracy": 0.805, "macro_f1": 0.85}}
    result = evaluate_gates(cfg, GOOD, champion)
    gates = _by_name(result)
    assert gates["sentiment.accuracy >= champion - 0.01"]["passed"]  # 0.80 vs 0.805 - 0.01
    f1 = gates["sentiment.macro_f1 >= champion - 0.01"]
    assert not f1["passed"] and f1["champion"] == 0.85 and f1["tolerance"] == 0.01
    assert result["decision"] == "reject"


def test_lower_is_better_regression_uses_its_own_tolerance(cfg):
    ok = evaluate_gates(cfg, GOOD, {"mlm": {"perplexity": 116.0}})  # 120 <= 116 + 5
    assert _by_name(ok)["mlm.perplexity <= champion + 5"]["passed"]
    bad = evaluate_gates(cfg, GOOD, {"mlm": {"perplexity": 110.0}})
    assert not _by_name(bad)["mlm.perplexity <= champion + 5"]["passed"]


def test_only_metrics_both_report_are_compared(cfg):
    champion = {"sentiment": {"accuracy": 0.5, "old_metric": 1.0}, "gone_task": {"f1": 0.9}}
    result = evaluate_gates(cfg, GOOD, champion)
    regressions = [g for g in result["gates"] if g["kind"] == "no_regression"]
    assert [(g["task"], g["metric"]) for g in regressions] == [("sentiment", "accuracy")]
    assert result["passed"]


def test_summary_names_failed_gates(cfg):
    result = evaluate_gates(cfg, {"mlm": GOOD["mlm"]}, None)
    assert gate_summary(result) == "reject: 1/2 gates passed; failed: sentiment.accuracy >= 0.6"


def test_write_gates_writes_report(cfg):
    result = evaluate_gates(cfg, GOOD, None)
    path = write_gates(cfg, result)
    assert path == cfg.path("reports/gates.json")
    assert json.loads(path.read_text(encoding="utf-8")) == result


def test_a_task_without_thresholds_is_still_gated_and_counted(cfg):
    """A task a user adds without writing thresholds for it must report finite metrics; it counts in the
    summary, and a missing or NaN metric rejects."""
    intent = cfg.tasks["sentiment"].model_copy(update={"bundled": None, "files": {"all": "intent.jsonl"}})
    cfg = cfg.model_copy(update={"tasks": {**cfg.tasks, "intent": intent}})
    ok = evaluate_gates(cfg, {**GOOD, "intent": {"accuracy": 0.7, "macro_f1": 0.6}}, None)
    assert ok["passed"] and gate_summary(ok).startswith("promote: 3/3 gates passed")
    assert _by_name(ok)["intent reports finite metrics (no thresholds set)"]["kind"] == "reported"
    assert not evaluate_gates(cfg, GOOD, None)["passed"]  # intent reported nothing
    nan = evaluate_gates(cfg, {**GOOD, "intent": {"accuracy": float("nan")}}, None)
    assert gate_summary(nan).endswith("failed: intent reports finite metrics (no thresholds set)")
