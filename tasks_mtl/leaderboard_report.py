"""reports/leaderboard.json and reports/leaderboard.html: the table of `mtl leaderboard` and its curves.

One self-contained page (inline SVG by matplotlib, the run report's helpers): per entry the headline
metric of every task, delta-m per task against the single-task runs and its mean, steps done of planned
(a run cut by the budget says so), training and evaluation seconds; then per task the training loss
and the loss weight of every entry over the steps, and a link to each entry's task-conflict map.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from tasks_mtl.config import Config
from tasks_mtl.report import _CSS, _note, _table, line_chart

esc = html.escape


def _num(value: Any, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else esc(str(value))


def _table_html(board: dict[str, Any]) -> str:
    rows = board["rows"]
    tasks = sorted({t for r in rows for t in r["metrics"]})
    headline = {t: next(iter(next(r["metrics"][t] for r in rows if t in r["metrics"]))) for t in tasks}
    head = (["#", "method"] + [f"{t} {headline[t]}" for t in tasks] + [f"Δm {t} %" for t in tasks]
            + ["mean Δm %", "steps", "train s", "eval s"])
    body = []
    for rank, r in enumerate(rows, 1):
        steps = f"{r['steps_done']}/{r['steps_planned']}" + (" (cut)" if r["cut"] else "")
        body.append([str(rank), esc(r["name"])]
                    + [_num(r["metrics"].get(t, {}).get(headline[t])) for t in tasks]
                    + [_num(r["delta_m"].get(t), 2) for t in tasks]
                    + [_num(r["mean_delta_m"], 2), steps, _num(r["train_seconds"], 1), _num(r["eval_seconds"], 1)])
    single = [[esc(t), _num(m.get(headline.get(t, ""), None) if t in headline else None)]
              for t, m in board["single_task"].items()]
    return (_table(head, body, ["pass" if r["name"] == board["winner"] else "" for r in rows])
            + ("<h3>Single-task runs (equal steps)</h3>" + _table(["task", "metric"], single) if single
               else _note("no single-task runs: no delta-m; ranked by the mean headline metric")))


def _curves_html(board: dict[str, Any]) -> str:
    parts = []
    for kind, label in (("loss", "training loss"), ("weight", "loss weight")):
        tasks = sorted({t for r in board["rows"] for t in r["curves"].get(kind, {})})
        for task in tasks:
            series = {r["name"]: [tuple(p) for p in r["curves"][kind][task]]
                      for r in board["rows"] if task in r["curves"].get(kind, {})}
            parts.append(f"<h3>{esc(task)}: {label}</h3>"
                         + line_chart(f"{kind}-{task}", series, [], label, {}, log=kind == "loss"))
    return "".join(parts) or _note("no training logs")


def render_board(board: dict[str, Any]) -> str:
    machine = board["machine"]
    setup = (f"profile <b>{esc(str(board['profile']))}</b>, seed {board['seed']}, steps per stage "
             f"{board['steps'] or 'as the profile'}, budget {board['budget_minutes'] or 'none'} min per run; "
             f"{machine['cpus']} CPUs, {esc(machine['platform'])}")
    links = "".join(f'<li><a href="{esc(Path(r["output_dir"], "reports", "conflict.html").as_uri())}">'
                    f"{esc(r['name'])}</a></li>" for r in board["rows"]
                    if Path(r["output_dir"], "reports", "conflict.html").exists())
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Leaderboard</title><style>{_CSS}</style>"
            f"</head><body><h1>Loss weighting leaderboard</h1><p>{setup}. Winner: <b>{esc(str(board['winner']))}"
            f"</b> (highest mean Δm).</p><h2>Table</h2>{_table_html(board)}<h2>Curves</h2>{_curves_html(board)}"
            + (f"<h2>Task conflict maps</h2><ul>{links}</ul>" if links else "") + "</body></html>")


def write_board(cfg: Config, board: dict[str, Any]) -> tuple[Path, Path]:
    """Write the board's JSON and HTML into cfg.reports_dir; return both paths."""
    out = cfg.path(cfg.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    data, page = out / "leaderboard.json", out / "leaderboard.html"
    data.write_text(json.dumps(board, indent=1, ensure_ascii=False), encoding="utf-8")
    page.write_text(render_board(board), encoding="utf-8")
    return data, page
