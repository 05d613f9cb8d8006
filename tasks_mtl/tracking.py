"""The MLflow tracking adapter: where runs go, and what a training run records.

One parent run per pipeline run (resolved params, per-task test metrics, provenance tags, gate
summary) and one nested run per training stage (the trainer's per-step losses, task weights and
learning rates). Runs are addressed by id through `MlflowClient`, never through MLflow's
thread-local "active run", because orchestrators run steps in worker threads.

Besides this module only `tasks_mtl.registry` imports MLflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks_mtl.config import Config
from tasks_mtl.store import artifact_root, tracking_uri

_BATCH = 100  # MLflow's log_batch limit for params and tags per request


def client(cfg: Config) -> MlflowClient:
    """A client bound to this configuration's tracking and registry store."""
    uri = tracking_uri(cfg)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(cfg: Config) -> str:
    """The experiment's id, creating it with an absolute artifact location on first use."""
    mlflow_client = client(cfg)
    found = mlflow_client.get_experiment_by_name(cfg.registry.experiment)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow_client.create_experiment(cfg.registry.experiment, artifact_location=artifact_root(cfg))
    except MlflowException:  # another process created it between our read and our write
        return mlflow_client.get_experiment_by_name(cfg.registry.experiment).experiment_id


# --- provenance ------------------------------------------------------------------------------


def data_hash(cfg: Config) -> str:
    """The data version: md5 of data.dvc's outs as DVC recorded them, else a hash of data/ itself.

    The fallback (no data.dvc yet) hashes file names and contents, so it still changes exactly
    when the data does.
    """
    dvc_file = cfg.root.resolve() / f"{Path(cfg.data.raw_dir).name}.dvc"
    if dvc_file.exists():
        spec = yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}
        outs = spec.get("outs") or []
        md5s = [str(out.get("md5", "")) for out in outs]
        if any(md5s):
            return ",".join(md5s)
    raw = cfg.path(cfg.data.raw_dir)
    if not raw.exists():
        return "missing"
    digest = hashlib.md5()
    for path in sorted(p for p in raw.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(raw)).encode("utf-8"))
        digest.update(path.read_bytes())
    return "content-" + digest.hexdigest()


def git_commit(root: Path) -> str:
    """HEAD of the checkout, with `-dirty` when tracked files changed; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def data_version(cfg: Config) -> dict[str, str]:
    """What a model was trained from: the data version and the code version."""
    return {"data_hash": data_hash(cfg), "git_commit": git_commit(cfg.root.resolve())}


def flatten(tree: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts/lists -> {"training.stages.0.steps": "300", ...}; the params MLflow can show."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(tree))
    else:
        return {prefix: str(tree)[:6000]}  # MLflow's limit on a param value
    out: dict[str, str] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    if not out and prefix:
        out[prefix] = "{}" if isinstance(tree, dict) else "[]"
    return out


def metric_items(metrics: dict[str, dict[str, float]], prefix: str = "test") -> dict[str, float]:
    """{task: {metric: v}} -> {"test.sentiment.accuracy": v}; non-numbers are skipped."""
    return {
        f"{prefix}.{task}.{name}": float(value)
        for task, values in metrics.items()
        for name, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }


# --- runs ------------------------------------------------------------------------------------


class RunTracker:
    """Records one pipeline run in MLflow: a parent run, nested stage runs, metrics and tags.

    Serialisable by its ids (`RunTracker.attach(cfg, run_id)`), so an orchestrator step in another
    thread or process can keep logging into the same run.
    """

    def __init__(self, cfg: Config, run_id: str):
        self.cfg = cfg
        self.run_id = run_id
        self.client = client(cfg)

    @classmethod
    def start(cls, cfg: Config, run_name: str | None = None, tags: dict[str, str] | None = None) -> RunTracker:
        """Open the parent run and log the resolved configuration as params."""
        mlflow_client = client(cfg)
        all_tags = {"mlflow.runName": run_name or "retrain", **(tags or {})}
        run = mlflow_client.create_run(experiment_id(cfg), tags=all_tags, run_name=run_name)
        tracker = cls(cfg, run.info.run_id)
        tracker.log_params(flatten(cfg.model_dump(mode="json")))
        return tracker

    @classmethod
    def attach(cls, cfg: Config, run_id: str) -> RunTracker:
        return cls(cfg, run_id)

    def log_params(self, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + _BATCH])

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, tags=items[i : i + _BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):  # log_batch takes up to 1000 metrics
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_task_metrics(self, metrics: dict[str, dict[str, float]], prefix: str = "test") -> None:
        """Per-task evaluation metrics as `test.<task>.<metric>`."""
        self.log_metrics(metric_items(metrics, prefix))

    def log_artifacts(self, paths: list[Path], artifact_path: str = "reports") -> list[str]:
        """Attach files to the run under `artifact_path`; a path that does not exist is skipped (a step
        that never ran left no file). Returns the names attached."""
        logged = []
        for path in paths:
            if Path(path).is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)
                logged.append(Path(path).name)
        return logged

    def logger(self) -> Callable[[dict[str, float], int], None]:
        """The trainer's `log` callback: flat metric dicts at a global step."""
        return lambda metrics, step: self.log_metrics(metrics, step)

    def stage(self, name: str, tags: dict[str, str] | None = None) -> contextlib.AbstractContextManager[RunTracker]:
        """A nested run for one training stage; FAILED if the stage raises."""
        return self.child(f"stage-{name}", {"stage": name, **(tags or {})})

    @contextmanager
    def child(self, run_name: str, tags: dict[str, str] | None = None) -> Iterator[RunTracker]:
        """A nested run under this one (a stage, a leaderboard entry); FAILED if the block raises."""
        child = self.client.create_run(
            self.client.get_run(self.run_id).info.experiment_id,
            tags={"mlflow.parentRunId": self.run_id, **(tags or {})},
            run_name=run_name,
        )
        nested = RunTracker(self.cfg, child.info.run_id)
        try:
            yield nested
        except BaseException:
            nested.finish("FAILED")
            raise
        nested.finish("FINISHED")

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
