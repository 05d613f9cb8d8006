"""The run report (tasks_mtl/report.py): a self-contained page drawn from the run's own files, notes
instead of errors for what is missing, the `mtl report` command and the flow's report step.

The inputs are made by the project's writers where one exists (the trainer's stage log, the evaluation
report, the gates), with the checkpoint evaluation and training replaced by fixed numbers: no model runs.
"""

import html
import json
import logging
import re

import pytest
from typer.testing import CliRunner

from tasks_mtl.cli import app
from tasks_mtl.gates import evaluate_gates, write_gates
from tasks_mtl.report import write_report
from tasks_mtl.runlog import append_log, stage_log

METRICS = {
    "sentiment": {"accuracy": 0.812345, "macro_f1": 0.80111},
    "ner": {"accuracy": 0.97, "precision": 0.91, "recall": 0.9, "f1": 0.905, "f1_PER": 0.9123, "f1_LOC": 0.8877,
            "f1_ORG": 0.6543},
    "mlm": {"accuracy": 0.31, "perplexity": 42.5},
}
CHAMPION = {"sentiment": {"accuracy": 0.83, "macro_f1": 0.82}, "ner": {"f1": 0.9, "f1_PER": 0.95}}
PEERS = {"sentiment": {"accuracy": 0.8617, "macro_f1": 0.86, "train_s": 3.2, "train_rows": 9000},
         "ner": {"accuracy": 0.98, "f1": 0.955, "f1_PER": 0.9611, "f1_LOC": 0.93, "f1_ORG": 0.8,
                 "train_s": 40.0, "train_rows": 17000}}
CONFUSION = {"labels": ["negative", "positive"], "matrix": [[401, 99], [89, 411]]}
SUMMARY = {task: {split: {"rows": rows, "duplicates_removed": 7, "conflicts_dropped": 2, "capped": 0}
                  for split, rows in (("train", 35127), ("validation", 4274), ("test", 4378))}
           for task in ("sentiment", "ner", "mlm")}


def write_logs(cfg, scale: float = 1.0) -> None:
    """Each stage's `<n>-<stage>.log.csv` through the trainer's own writer: losses falling, weights moving."""
    step = 0
    for index, stage_cfg in enumerate(cfg.training.stages):
        stage, path = stage_cfg.name, stage_log(cfg, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        tasks = cfg.training.stages[index].task_names(cfg.tasks)
        for k in range(1, 4):
            step += 2
            metrics = {f"loss/{t}": scale * (3.0 + i) / (step + k) for i, t in enumerate(tasks)}
            metrics |= {f"weight/{t}": 1.0 + 0.1 * i * k for i, t in enumerate(tasks)}
            metrics |= {"lr/encoder": 1e-3, "tokens_per_s": 1500.0 + index, "bf16": 0.0}
            append_log(path, step, stage, metrics)


def write_inputs(cfg, monkeypatch, *, peers=True, champion=True, confusion=False) -> dict:
    """metrics.json (by evaluate_to_report), gates.json (by the gates), peers.json and prepared/summary.json."""
    import tasks_mtl.evaluate

    def fake_evaluate(cfg, checkpoint, split, confusion=None):
        if confusion is not None and with_confusion:
            confusion["sentiment"] = CONFUSION  # what evaluate() fills for a classification task
        return METRICS

    with_confusion = confusion
    monkeypatch.setattr(tasks_mtl.evaluate, "evaluate", fake_evaluate)
    tasks_mtl.evaluate.evaluate_to_report(cfg, cfg.root / "ckpt")  # metrics.json and confusion.json
    reports = cfg.path(cfg.reports_dir)
    gates = evaluate_gates(cfg, METRICS, CHAMPION if champion else None)
    write_gates(cfg, gates)
    if peers:
        (reports / "peers.json").write_text(json.dumps(PEERS))
    summary = cfg.path(cfg.data.prepared_dir) / "summary.json"
    summary.parent.mkdir(parents=True, exist_ok=True)
    summary.write_text(json.dumps(SUMMARY, sort_keys=True))  # as prepare writes it: splits by name
    return gates


def figure(page: str, name: str) -> str:
    """The inline SVG of one chart."""
    found = re.search(rf'<figure id="chart-{name}">(.*?)</figure>', page, re.S)
    assert found, f"no chart {name}"
    return found.group(1)


@pytest.fixture
def cfg(mlflow_cfg):
    mlflow_cfg.gates.thresholds = {"sentiment": {"accuracy": 0.8}, "ner": {"f1": 0.95}, "mlm": {"accuracy": 0.2}}
    return mlflow_cfg


def test_report_shows_every_input(cfg, monkeypatch):
    write_logs(cfg)
    gates = write_inputs(cfg, monkeypatch, confusion=True)
    out = write_report(cfg)
    assert out == cfg.path(cfg.reports_dir) / "report.html"
    page = out.read_text(encoding="utf-8")

    # self-contained: nothing fetched from elsewhere, no scripts; one inline SVG per chart
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:|//)""", page, re.I)
    assert "<script" not in page and "<link" not in page
    charts = ["loss", "weights", "metrics", "per-type-ner", "confusion-sentiment"]
    assert page.count("<svg") == len(charts) and all(figure(page, c).startswith("<svg") for c in charts)

    # the loss and weight charts name the tasks in their legends, the stages along the top
    for name in ("loss", "weights"):
        svg = figure(page, name)
        assert all(f">{t}<" in svg for t in cfg.tasks), name
        assert all(f">{s.name}<" in svg for s in cfg.training.stages)

    # the gate table: full names, values rounded to 4 places, pass/fail per row, the decision on top
    assert gates["decision"] == "reject"  # ner.f1 0.905 < 0.95 and sentiment below the champion
    for gate in gates["gates"]:
        row = re.search(rf"<tr class=\"(pass|fail)\"><td>{re.escape(html.escape(gate['name']))}</td>.*?</tr>", page)
        assert row, gate["name"]
        assert row.group(1) == ("pass" if gate["passed"] else "fail")
        assert f"<td>{gate['value']:.4f}</td>" in row.group(0)
    assert "0.812345" not in page and "0.8123" in page
    assert '<span class="badge reject">reject</span>' in page

    # metrics beside the champion (from the no-regression gates) and the peers, with the differences
    row = re.search(r"<tr><td>sentiment</td><td>accuracy</td>.*?</tr>", page).group(0)
    assert all(f">{x}<" in row for x in ("0.8123", "0.8300", "-0.0177", "0.8617", "-0.0494"))
    assert "train_rows" not in page  # peers.json bookkeeping is not a metric
    assert ">0.862<" in figure(page, "metrics")  # the peer's bar, labelled

    # per-type F1: this run, the champion and the peer per entity type
    per_type = figure(page, "per-type-ner")
    assert all(f">{x}<" in per_type for x in ("PER", "LOC", "ORG", "0.912", "0.888", "0.654", "0.950", "0.961"))

    confusion = figure(page, "confusion-sentiment")
    assert all(f">{x}<" in confusion for x in ("401", "99", "89", "411", "negative", "positive", "gold"))

    # prepared data counts per task and split, counters summed over the splits
    data = page.split("Prepared data")[1]
    assert "<th>task</th><th>train rows</th><th>validation rows</th><th>test rows</th><th>capped</th>" in data
    row = re.search(r"<tr><td>ner</td>.*?</tr>", data).group(0)
    assert row == "<tr><td>ner</td><td>35,127</td><td>4,274</td><td>4,378</td><td>0</td><td>6</td><td>21</td></tr>"


def test_charts_follow_the_logs(cfg, monkeypatch):
    write_logs(cfg)
    first = write_report(cfg).read_text(encoding="utf-8")
    write_logs(cfg, scale=2.5)  # the same run shape with other losses
    second = write_report(cfg).read_text(encoding="utf-8")
    assert figure(first, "loss") != figure(second, "loss")
    assert figure(first, "weights") == figure(second, "weights")  # unchanged data, identical chart


def test_missing_inputs_are_notes(cfg, monkeypatch):
    page = write_report(cfg).read_text(encoding="utf-8")  # an empty project: nothing run yet
    assert "<svg" not in page
    for note in ("No training logs yet", "No reports/metrics.json yet", "No reports/gates.json yet",
                 "No prepared/summary.json yet", "No confusion matrix", "no gate decision yet"):
        assert note in page, note

    write_inputs(cfg, monkeypatch, peers=False, champion=False)  # first registration, no peers scored
    (cfg.path(cfg.reports_dir) / "metrics.json").write_text('{"sentiment": {"accuracy": 0.8')  # cut short
    page = write_report(cfg).read_text(encoding="utf-8")
    assert "No reports/metrics.json yet" in page and "unreadable (JSONDecodeError)" in page

    write_inputs(cfg, monkeypatch, peers=False, champion=False)
    page = write_report(cfg).read_text(encoding="utf-8")
    assert "No champion to compare with" in page and "No peers.json" in page
    row = re.search(r"<tr><td>sentiment</td><td>accuracy</td>.*?</tr>", page).group(0)
    assert row == "<tr><td>sentiment</td><td>accuracy</td><td>0.8123</td><td>-</td><td>-</td><td>-</td><td>-</td></tr>"
    assert page.count("<svg") == 2  # metrics and per-type F1 only: no logs, no confusion matrix


def test_cli_report(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("seed: 5\n")
    result = CliRunner().invoke(app, ["report", "--params", str(params), "-S", "reports_dir=out"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "report.html"
    assert result.output.strip() == str(out) and out.exists()
    result = CliRunner().invoke(app, ["report", "--params", str(params), "-S", "nope=1"])
    assert result.exit_code == 2 and "configuration error" in result.output


def test_flow_step_attaches_the_report_and_never_fails_the_run(cfg, monkeypatch):
    from flows import steps
    from tasks_mtl import report, tracking

    write_logs(cfg)
    write_inputs(cfg, monkeypatch)
    run = tracking.RunTracker.start(cfg, run_name="report-test")
    out = steps.report_step.fn(cfg, run.run_id)
    assert out == cfg.path("reports/report.html")
    attached = {a.path for a in run.client.list_artifacts(run.run_id, "reports")}
    assert attached == {"reports/report.html", "reports/metrics.json", "reports/gates.json"}  # no validation.html

    def broken(cfg):
        raise OSError("disk full")

    warnings = []
    monkeypatch.setattr(report, "write_report", broken)
    monkeypatch.setattr(steps, "get_run_logger", lambda: logging.LoggerAdapter(logging.getLogger("t"), {}))
    monkeypatch.setattr(logging.LoggerAdapter, "warning", lambda self, msg, *a: warnings.append(msg % a))
    assert steps.report_step.fn(cfg, run.run_id) is None
    assert warnings == ["run report not written or not attached: OSError: disk full"]
