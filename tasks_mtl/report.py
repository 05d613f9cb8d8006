"""The run report: reports/report.html, one self-contained page to look at after a run.

It shows what the run's files say in the form a person takes in fastest: per-task losses and loss
weights across the stages (the trainer's `<n>-<stage>.log.csv`), test metrics beside the champion's
(from the no-regression gates) and the classical peers' (peers.json), F1 per entity type, a confusion
matrix per classification task (confusion.json, written by evaluation), the gates and the prepared data counts. Charts are matplotlib SVG
inside the page, so it has no external references (attach it, mail it, open it offline). A missing
input becomes a short note, never an exception: the report is read after a failed run too.
Reads files only (no Prefect, MLflow or torch); matplotlib is imported when a chart is drawn.
"""

from __future__ import annotations

import html
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from tasks_mtl.config import SPLITS, Config
from tasks_mtl.gates import finite_number, gate_summary
from tasks_mtl.peers import HEADLINE, NOT_METRICS
from tasks_mtl.runlog import read_logs, stage_log

Points = list[tuple[int, float]]  # (global step, value)
esc = html.escape

_CSS = """body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; } figure { margin: .5em 0; }
table { border-collapse: collapse; margin: .5em 0 1em; } figure svg { max-width: 100%; height: auto; }
th, td { border: 1px solid #ddd; padding: 3px 9px; text-align: right; } th:first-child, td:first-child { text-align: left; }
tr.fail { background: #fde2e2; } tr.pass { background: #eef8ee; } .note { color: #666; font-style: italic; }
.badge { padding: 2px 10px; border-radius: 10px; color: #fff; font-weight: bold; background: #888; }
.better { color: #1a7f37; } .worse { color: #c0392b; } .promote { background: #1a7f37; } .reject { background: #c0392b; }"""


def read_training_logs(cfg: Config) -> tuple[dict[str, dict[str, Points]], list[tuple[str, int]]]:
    """{"loss"|"weight": {task: points}} across all stages, and (stage, last logged step) per logged stage."""
    series: dict[str, dict[str, Points]] = {"loss": {}, "weight": {}}
    last: dict[str, int] = {}
    for step, stage, metric, value in read_logs(cfg):
        last[stage] = max(step, last.get(stage, step))
        kind, _, task = metric.partition("/")
        if kind in series and task:
            series[kind].setdefault(task, []).append((step, value))
    return series, list(last.items())


def _read_json(path: Path, sources: dict[str, str]) -> dict | None:
    """The file's JSON object, or None when it is absent or unreadable; `sources` records which it was."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        sources[path.name] = "absent"
        return None
    except (OSError, ValueError) as err:
        sources[path.name] = f"unreadable ({type(err).__name__})"
        return None
    sources[path.name] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))
    return data


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'  # what stands in for a section whose input is missing


def _table(head: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    """An HTML table; cells are already escaped HTML."""
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for i, row in enumerate(rows):
        cls = f' class="{classes[i]}"' if classes and classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>")
    return "\n".join(out) + "</table>"


def _axes(width: float = 8.0, height: float = 3.4):
    """A figure on the Agg canvas, made without pyplot: no global figure state, safe in a worker thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _svg(fig, name: str) -> str:
    """The figure as inline SVG (text kept as text, so names stay readable and searchable)."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return f'<figure id="chart-{name}">{text[text.index("<svg"):]}</figure>'


def line_chart(name: str, series: dict[str, Points], stages: list[tuple[str, int]], ylabel: str,
               colors: dict[str, str], log: bool = False) -> str:
    """One line per task over the global step, the stages as alternating bands named at the top."""
    fig, ax = _axes()
    start = 0  # a stage's band runs from the previous stage's last logged step to its own
    for i, (stage, last) in enumerate(stages):
        if i % 2:
            ax.axvspan(start, last, color="0.93", lw=0)
        ax.text((start + last) / 2, 1.01, stage, transform=ax.get_xaxis_transform(),
                ha="center", va="bottom", fontsize=8, color="0.35")
        start = last
    for task, points in series.items():
        points = sorted(p for p in points if math.isfinite(p[1]))
        ax.plot([p[0] for p in points], [p[1] for p in points], label=task, color=colors.get(task), lw=1.4)
    if log and all(v > 0 for points in series.values() for _, v in points):
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return _svg(fig, name)


def bar_chart(name: str, groups: list[str], bars: dict[str, list[float | None]], ylabel: str) -> str:
    """Grouped bars (one group per label, one bar per source that has a value), each labelled with its value."""
    bars = {label: values for label, values in bars.items() if any(v is not None for v in values)}
    fig, ax = _axes(width=max(4.5, 1.1 * len(groups) + 2.5), height=3.2)
    width = 0.8 / max(len(bars), 1)
    for j, (label, values) in enumerate(bars.items()):
        shown = [(i + (j - (len(bars) - 1) / 2) * width, v) for i, v in enumerate(values)
                 if v is not None and math.isfinite(v)]
        rects = ax.bar([x for x, _ in shown], [v for _, v in shown], width, label=label, color=f"C{j}")
        ax.bar_label(rects, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), groups, fontsize=8, rotation=20 if len(groups) > 5 else 0)
    ax.set_ylabel(ylabel)
    ax.margins(y=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
    return _svg(fig, name)


def confusion_chart(name: str, matrix: list[list[int]], labels: list[str]) -> str:
    """Counts as a vector heatmap: rows are the gold labels, columns the predicted ones."""
    fig, ax = _axes(width=1.2 * len(labels) + 2.0, height=1.0 * len(labels) + 1.4)
    ax.pcolormesh(matrix, cmap="Blues")
    top = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j + 0.5, i + 0.5, str(count), ha="center", va="center",
                    color="white" if count > top / 2 else "black")
    ax.set_xticks([k + 0.5 for k in range(len(labels))], labels)
    ax.set_yticks([k + 0.5 for k in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set(xlabel="predicted", ylabel="gold")
    return _svg(fig, name)


def _confusion(entry: Any, labels: list[str]) -> tuple[list[list[int]], list[str]] | None:
    """A confusion.json entry ({"labels": [...], "matrix": [[...]]}, or the bare matrix with the task's
    labels) as (counts, label names); None unless it is a square matrix of numbers."""
    if isinstance(entry, dict):
        entry, labels = entry.get("matrix"), entry.get("labels") or labels
    n = len(entry) if isinstance(entry, list) else 0
    if not n or not all(isinstance(r, list) and len(r) == n and all(finite_number(c) is not None for c in r) for r in entry):
        return None
    names = [str(x) for x in labels] if len(labels) == n else [str(k) for k in range(n)]
    return [[int(c) for c in row] for row in entry], names


def _training_section(cfg: Config, colors: dict[str, str]) -> str:
    series, stages = read_training_logs(cfg)
    if not stages:
        return _note(f"No training logs yet (looked for "
                     f"{', '.join(stage_log(cfg, i).name for i in range(len(cfg.training.stages or [])))} "
                     f"in {cfg.training.output_dir}).")
    return "\n".join([
        "<h3>Loss per task</h3>", line_chart("loss", series["loss"], stages, "loss (log scale)", colors, True),
        "<h3>Loss weights per task</h3>", line_chart("weights", series["weight"], stages, "weight", colors)
        if series["weight"] else _note("The logs hold no loss weights.")])


def _metrics_section(cfg: Config, metrics: dict, champion: dict, peers: dict | None) -> str:
    if not metrics:
        return _note("No reports/metrics.json yet: `mtl evaluate` writes it.")
    lower = set(cfg.gates.lower_is_better)
    notes = [] if champion else [_note("No champion to compare with (first registration, or no gates.json).")]
    if peers is None:
        notes.append(_note("No peers.json: `python benchmarks/peers.py` scores the classical peers."))

    def delta(value: float | None, other: float | None, metric: str) -> str:
        if value is None or other is None:
            return "-"
        good = (value < other) if metric in lower else (value > other)
        return f'<span class="{"better" if good else "worse"}">{value - other:+.4f}</span>'

    rows, groups, bars = [], [], {"this run": [], "champion": [], "peer": []}
    for task, values in metrics.items():
        gated = [m for m in cfg.gates.thresholds.get(task, {}) if m not in lower] or list(HEADLINE)
        peer = {k: finite_number(v) for k, v in ((peers or {}).get(task) or {}).items() if k not in NOT_METRICS}
        for metric, raw in values.items():
            value = finite_number(raw)
            if value is None:
                continue  # not a number: nothing to tabulate
            champ, theirs = finite_number(champion.get(task, {}).get(metric)), peer.get(metric)
            rows.append([esc(task), esc(metric), _fmt(value), _fmt(champ), delta(value, champ, metric),
                         _fmt(theirs), delta(value, theirs, metric)])
            if metric in gated:
                groups.append(f"{task}.{metric}")
                for key, v in (("this run", value), ("champion", champ), ("peer", theirs)):
                    bars[key].append(v)
    head = ["task", "metric", "this run", "champion", "vs champion", "peer", "vs peer"]
    chart = bar_chart("metrics", groups, bars, "test split") if groups else ""
    return "\n".join([chart, *notes, _table(head, rows)])


def _per_type_section(metrics: dict, champion: dict, peers: dict | None) -> str:
    parts = []
    for task, values in metrics.items():
        kinds = [m for m in values if m.startswith("f1_") and finite_number(values[m]) is not None]
        if not kinds:
            continue
        bars = {"this run": [finite_number(values[m]) for m in kinds],
                "champion": [finite_number(champion.get(task, {}).get(m)) for m in kinds],
                "peer": [finite_number(((peers or {}).get(task) or {}).get(m)) for m in kinds]}
        parts += [f"<h3>{esc(task)}</h3>", bar_chart(f"per-type-{task}", [m[3:] for m in kinds], bars, "F1")]
    return "\n".join(parts) or _note("No per-type F1 in the metrics (the ner task reports f1_PER, f1_LOC, f1_ORG).")


def _confusion_section(cfg: Config, confusion: dict | None) -> str:
    parts = []
    for task, entry in (confusion or {}).items():
        labels = list(cfg.tasks[task].labels) if task in cfg.tasks else []
        found = _confusion(entry, labels)
        if found:
            parts += [f"<h3>{esc(task)}</h3>", confusion_chart(f"confusion-{task}", *found)]
    return "\n".join(parts) or _note("No confusion matrix yet: `mtl evaluate` writes the classification tasks' "
                                     "counts to reports/confusion.json.")


def _gates_section(gates: dict | None) -> str:
    if not gates or not gates.get("gates"):
        return _note("No reports/gates.json yet: the pipeline writes it after evaluation.")
    rows, classes = [], []
    for g in gates["gates"]:
        value, bound, champ = (finite_number(g.get(k)) for k in ("value", "threshold", "champion"))
        rows.append([esc(str(g.get("name"))), esc(str(g.get("kind", ""))),
                     _fmt(value), _fmt(bound), _fmt(champ), "yes" if g.get("passed") else "<b>NO</b>"])
        classes.append("pass" if g.get("passed") else "fail")
    return _table(["gate", "kind", "value", "bound", "champion", "passed"], rows, classes)


def _data_section(summary: dict | None) -> str:
    if not summary:
        return _note("No prepared/summary.json yet: `mtl prepare` writes it.")
    splits = sorted({s for task in summary.values() for s in task},  # train, validation, test, not by name
                    key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))
    counters = list(dict.fromkeys(k for task in summary.values() for split in task.values() for k in split
                                  if k != "rows"))
    rows = [[esc(task)] + [f"{by_split.get(s, {}).get('rows', 0):,}" for s in splits]
            + [f"{sum(int(by_split[s].get(k, 0)) for s in by_split):,}" for k in counters]
            for task, by_split in summary.items()]
    head = ["task"] + [f"{s} rows" for s in splits] + [k.replace("_", " ") for k in counters]
    return _table(head, rows) + _note("Counters are summed over the splits.")


def render_report(cfg: Config) -> str:
    """The whole page as one HTML string."""
    reports, sources = cfg.path(cfg.reports_dir), {}
    metrics = {t: v for t, v in (_read_json(reports / "metrics.json", sources) or {}).items() if isinstance(v, dict)}
    gates = _read_json(reports / "gates.json", sources)
    peers = _read_json(reports / "peers.json", sources)
    summary = _read_json(cfg.path(cfg.data.prepared_dir) / "summary.json", sources)
    champion: dict[str, dict[str, float]] = {}
    for g in (gates or {}).get("gates", []):
        if g.get("kind") == "no_regression" and g.get("task") and finite_number(g.get("champion")) is not None:
            champion.setdefault(g["task"], {})[g.get("metric")] = g["champion"]
    colors = {task: f"C{i % 10}" for i, task in enumerate(dict.fromkeys([*cfg.tasks, *metrics]))}
    decision = (gates or {}).get("decision", "unknown")
    headline = gate_summary(gates) if gates else "no gate decision yet"
    sections = [
        ("Training", _training_section(cfg, colors)),
        ("Test metrics: this run, the champion, the classical peers",
         _metrics_section(cfg, metrics, champion, peers)),
        ("F1 per entity type", _per_type_section(metrics, champion, peers)),
        ("Confusion matrix", _confusion_section(cfg, _read_json(reports / "confusion.json", sources))),
        ("Gates", _gates_section(gates)),
        ("Prepared data", _data_section(summary)),
    ]
    body = [f'<h1>mtl-zh run report <span class="badge {esc(decision)}">{esc(decision)}</span></h1>',
            f"<p>{esc(headline)}. Tasks: {esc(', '.join(cfg.tasks))}; stages: "
            f"{esc(' -> '.join(s.name for s in cfg.training.stages or []))}. "
            f"Written {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"]
    body += [f"<h2>{esc(title)}</h2>\n{content}" for title, content in sections]
    body.append("<h2>Sources</h2>" + _table(["file", "modified"], [[esc(k), esc(v)] for k, v in sources.items()]))
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>mtl-zh run report</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def write_report(cfg: Config) -> Path:
    """Write <reports_dir>/report.html (replaced whole, never half-written) and return its path."""
    out = cfg.path(cfg.reports_dir) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_report(cfg), encoding="utf-8")
    tmp.replace(out)
    return out
