"""Promotion gates: may a freshly trained model replace the champion?

Two kinds of gate, both on the test split:
- threshold: an absolute floor (or ceiling, for lower-is-better metrics) per task and metric,
  from `cfg.gates.thresholds`. A metric named there but missing from the run fails: a task that
  silently stopped reporting must not slip through.
- no_regression: for every metric both the candidate and the champion report, the candidate may
  be worse by at most the metric's tolerance (`cfg.gates.tolerance[metric]`, else `["default"]`).
- reported: a task of the run without thresholds (one a user added) must still report its metrics, all
  finite, so that every task of the run is gated and counted.
- production: a run whose profile is not production-capable (`production: false`, the quick smoke run) fails
  this gate, so its model never becomes champion however its metrics look.

The result names the champion version it was judged against (`champion_version`): the registry promotes
only while that version still holds `champion`.

Pure functions: no MLflow, no files except `write_gates`. The registry decides what a decision
means; this module only decides.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tasks_mtl.config import Config

Metrics = dict[str, dict[str, float]]


def finite_number(value: Any) -> float | None:
    """A finite float, or None: NaN or a non-numeric value can never pass a gate."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _tolerance(cfg: Config, metric: str) -> float:
    tolerances = cfg.gates.tolerance
    return float(tolerances.get(metric, tolerances.get("default", 0.0)))


def _fmt(x: float) -> str:
    return f"{x:g}"


def evaluate_gates(cfg: Config, metrics: Metrics, champion: Metrics | None,
                   champion_version: int | None = None) -> dict[str, Any]:
    """Check `metrics` (task -> metric -> value) against thresholds and the champion's metrics.

    Returns {"decision": "promote"|"reject", "passed": bool, "gates": [...], "profile", "champion_version"};
    each gate records its name, kind, task, metric, threshold, value, champion value, tolerance and whether
    it passed. `champion_version` is the version whose metrics `champion` holds (None: no champion).
    """
    lower_better = set(cfg.gates.lower_is_better)
    gates: list[dict[str, Any]] = []

    for task, floors in cfg.gates.thresholds.items():
        for metric, threshold in floors.items():
            value = finite_number(metrics.get(task, {}).get(metric))
            lower = metric in lower_better
            op = "<=" if lower else ">="
            passed = value is not None and (value <= threshold if lower else value >= threshold)
            gates.append({
                "name": f"{task}.{metric} {op} {_fmt(threshold)}",
                "kind": "threshold", "task": task, "metric": metric,
                "threshold": float(threshold), "value": value,
                "champion": None, "tolerance": None, "passed": bool(passed),
            })

    for task in cfg.tasks:
        if task in cfg.gates.thresholds:
            continue
        values = metrics.get(task) or {}
        passed = bool(values) and all(finite_number(v) is not None for v in values.values())
        gates.append({
            "name": f"{task} reports finite metrics (no thresholds set)",
            "kind": "reported", "task": task, "metric": None, "threshold": None,
            "value": None, "champion": None, "tolerance": None, "passed": passed,
        })

    for task, values in (champion or {}).items():
        for metric, champ_raw in values.items():
            champ = finite_number(champ_raw)
            if champ is None or metric not in metrics.get(task, {}):
                continue  # only metrics both report; a new or dropped metric is the thresholds' job
            value = finite_number(metrics[task][metric])
            tol = _tolerance(cfg, metric)
            lower = metric in lower_better
            bound = champ + tol if lower else champ - tol
            op, sign = ("<=", "+") if lower else (">=", "-")
            passed = value is not None and (value <= bound if lower else value >= bound)
            gates.append({
                "name": f"{task}.{metric} {op} champion {sign} {_fmt(tol)}",
                "kind": "no_regression", "task": task, "metric": metric,
                "threshold": bound, "value": value,
                "champion": champ, "tolerance": tol, "passed": bool(passed),
            })

    if not cfg.production:
        gates.append({
            "name": f"profile {cfg.profile!r} may move the champion (it says production: false)",
            "kind": "production", "task": None, "metric": None, "threshold": None,
            "value": None, "champion": None, "tolerance": None, "passed": False,
        })

    passed = all(g["passed"] for g in gates)
    return {"decision": "promote" if passed else "reject", "passed": passed, "gates": gates,
            "profile": cfg.profile, "champion_version": champion_version}


def gate_summary(result: dict[str, Any]) -> str:
    """One line for tags and logs: the decision and, when rejected, which gates failed."""
    gates = result.get("gates", [])
    failed = [g["name"] for g in gates if not g["passed"]]
    head = f"{result.get('decision', '?')}: {len(gates) - len(failed)}/{len(gates)} gates passed"
    return head if not failed else f"{head}; failed: {', '.join(failed)}"


def write_gates(cfg: Config, result: dict[str, Any]) -> Path:
    """Write reports/gates.json (its format: README, "Scheduled retraining you can watch") and return its path."""
    out = cfg.path(cfg.reports_dir) / "gates.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out
