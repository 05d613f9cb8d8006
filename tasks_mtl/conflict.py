"""Task conflict: the cosine between per-task gradients on the shared encoder, sampled during training.

Every `training.conflict_every` optimizer steps (0 = off, the default: it costs one forward and one
backward per task), each task's loss on a fixed probe batch is differentiated with respect to the
shared encoder parameters (`model.shared_parameters()`), and the task x task cosine matrix of those
gradients is appended to `<n>-<stage>.conflict.jsonl` beside the stage's log. A negative cosine means
a step that helps one task hurts the other (Yu et al. 2020, "Gradient Surgery"); a task whose row is
negative against all others is being suppressed.

The probe batch of each stream is drawn once per stage from a batch order of its own, and the
measurement runs in eval mode (no dropout) inside `torch.random.fork_rng`: it reads the model and
changes nothing, so a run with the probe trains exactly as a run without it, and the matrices of one
stage differ only because the model moved. The trainer's `log` callback gets the off-diagonal
cosines as `conflict/<a>.<b>` metrics (the tracking module sends them to MLflow; this module knows no
MLflow). `write_conflict_report` draws the matrices over training into reports/conflict.html.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from tasks_mtl.config import Config
from tasks_mtl.runlog import stage_dir, stage_log
from tasks_mtl.sampling import BatchOrder
from tasks_mtl.weighting.base import task_gradients

PROBE_SEED = 7919  # the probe batches' own seed: never the training batch order's


def conflict_log(cfg: Config, index: int) -> Path:
    """Where stage `index` writes its cosine matrices: beside its log."""
    return stage_log(cfg, index).with_name(stage_dir(cfg, index).name + ".conflict.jsonl")


def cosine_matrix(grads: torch.Tensor) -> list[list[float | None]]:
    """grads [T, P] -> the T x T cosines of the rows; None where a row is all zeros (no direction)."""
    work = grads.double()
    gram = work @ work.T  # [T, T]
    norms = gram.diagonal().clamp_min(0).sqrt()  # [T]
    cos = gram / (norms[:, None] * norms[None, :])
    return [[float(c) if math.isfinite(c) else None for c in row.clamp(-1, 1).tolist()] for row in cos]


class ConflictProbe:
    """Measures the task-gradient cosines of one stage on fixed probe batches; appends them to a JSONL file."""

    def __init__(self, path: Path, stage: str, every: int, batches: list[tuple[list[str], dict]]):
        self.path, self.stage, self.every = path, stage, every
        self.batches = batches  # (the stream's tasks, its probe batch on the device)

    @classmethod
    def for_stage(cls, cfg: Config, index: int, data: dict, device: torch.device,
                  resume_step: int = 0) -> ConflictProbe | None:
        """The stage's probe, or None when it is off or the stage trains no shared encoder. `data` maps stream
        names to the trainer's StreamData; rows past `resume_step` (an interrupted run's) are dropped."""
        stage = cfg.training.stages[index]
        path = conflict_log(cfg, index)
        if cfg.training.conflict_every <= 0 or stage.features_only:
            path.unlink(missing_ok=True)  # no stale matrices from an earlier run of this stage
            return None
        batches = []
        for i, stream in enumerate(data.values()):
            order = BatchOrder([len(f["input_ids"]) for f in stream.features], cfg.training.batch_size,
                               PROBE_SEED + i, max_tokens=stream.order.max_tokens)
            rows = [dict(stream.features[j]) for j in order.next()]
            batches.append((stream.tasks, {k: v.to(device) for k, v in stream.collate(rows).items()}))
        _trim(path, resume_step)
        return cls(path, stage.name, cfg.training.conflict_every, batches)

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def measure(self, model: torch.nn.Module) -> tuple[list[str], list[list[float | None]]]:
        """(task names, cosine matrix) of the model as it is; no parameter, gradient or RNG state changes."""
        shared = model.shared_parameters()
        if not shared:
            return [], []
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                losses = {}
                for tasks, batch in self.batches:
                    for task, (loss, _) in model.forward_tasks(tasks, batch).items():
                        losses[task] = loss.float()
                names = list(losses)
                grads = task_gradients([losses[n] for n in names], shared)  # [T, P]
        finally:
            model.train(was_training)
        return names, cosine_matrix(grads)

    def record(self, model: torch.nn.Module, step: int, log: Callable[[dict[str, float], int], None] | None) -> None:
        """Measure, append a row `{step, stage, tasks, cosine}` to the stage's file, and pass the pairs to `log`."""
        names, cosine = self.measure(model)
        if not names:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, "stage": self.stage, "tasks": names, "cosine": cosine}) + "\n")
        if log:
            pairs = {f"conflict/{a}.{b}": cosine[i][j] for i, a in enumerate(names) for j, b in enumerate(names)
                     if i < j and cosine[i][j] is not None}
            if pairs:
                log(pairs, step)


def _trim(path: Path, step: int) -> None:
    """Keep the rows up to `step` (a fresh stage: none)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if _row_step(line) <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a cut last line: dropped


def read_conflicts(cfg: Config) -> list[dict]:
    """Every stage's rows in stage order (an absent file: none)."""
    rows = []
    for index in range(len(cfg.training.stages or [])):
        path = conflict_log(cfg, index)
        if path.exists():
            rows += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
                     if math.isfinite(_row_step(line))]
    return rows


def heat_map(name: str, row: dict) -> str:
    """One matrix as an inline SVG heat map (blue: aligned, red: conflicting), each cell labelled."""
    from tasks_mtl.report import _axes, _svg

    tasks, cosine = row["tasks"], row["cosine"]
    fig, ax = _axes(width=1.1 * len(tasks) + 1.6, height=1.0 * len(tasks) + 0.8)
    values = [[math.nan if c is None else c for c in r] for r in cosine]
    image = ax.imshow(values, cmap="RdBu", vmin=-1, vmax=1)
    for i, r in enumerate(values):
        for j, c in enumerate(r):
            ax.text(j, i, "-" if math.isnan(c) else f"{c:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, fontsize=8, rotation=30)
    ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
    ax.set_title(f"{row['stage']}, step {row['step']}", fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8, label="cosine")
    return _svg(fig, name)


def write_conflict_report(cfg: Config, snapshots: int = 6) -> Path | None:
    """reports/conflict.json (every row) and reports/conflict.html: the matrix at up to `snapshots` steps spread
    over training and each pair's cosine over the steps. None (and nothing written) when nothing was sampled."""
    from tasks_mtl.report import _CSS, line_chart

    rows = read_conflicts(cfg)
    if not rows:
        return None
    out = cfg.path(cfg.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conflict.json").write_text(json.dumps(rows), encoding="utf-8")
    shown = min(snapshots, len(rows))
    picks = sorted({round(i * (len(rows) - 1) / max(shown - 1, 1)) for i in range(shown)})  # first to last
    maps = "".join(heat_map(f"conflict-{i}", rows[i]) for i in picks)
    pairs: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for i, a in enumerate(row["tasks"]):
            for j, b in enumerate(row["tasks"]):
                if i < j and row["cosine"][i][j] is not None:
                    pairs.setdefault(f"{a}-{b}", []).append((row["step"], row["cosine"][i][j]))
    stages: dict[str, int] = {}
    for row in rows:
        stages[row["stage"]] = max(row["step"], stages.get(row["stage"], 0))
    lines = line_chart("conflict-pairs", pairs, list(stages.items()), "gradient cosine", {})
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>Task conflict</title><style>{_CSS}"
            "figure { display: inline-block; }</style></head><body><h1>Task conflict</h1>"
            "<p>Cosine between per-task gradients on the shared encoder (fixed probe batches; "
            f"every {cfg.training.conflict_every} steps). Negative: the tasks pull the encoder apart.</p>"
            f"<h2>Over training</h2>{maps}<h2>Each pair</h2>{lines}</body></html>")
    path = out / "conflict.html"
    path.write_text(page, encoding="utf-8")
    return path
