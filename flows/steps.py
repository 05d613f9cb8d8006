"""The retrain flow's steps: each a few lines around one library call.

Retries and caching are declared on the decorators. Steps that must run every time (they read
the registry or write reports) say so with `cache_policy=NO_CACHE`; tokenize is cached on the
data version, the settings that shape its output and the code, so an unchanged rerun skips it; training
stages retry once and are idempotent themselves (`train_stage` returns at once when the stage's
`done.json` matches), so a retried flow never repeats a finished stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext

from tasks_mtl import registry, tracking
from tasks_mtl.config import Config
from tasks_mtl.fingerprint import fingerprint
from tasks_mtl.gates import evaluate_gates, gate_summary, write_gates


class DataValidationError(RuntimeError):
    """The data failed validation; the message is the validation summary naming each failure."""


@task(name="ingest", cache_policy=NO_CACHE)
def ingest_step(cfg: Config) -> dict | None:
    from tasks_mtl.data.ingest import ensure_raw_data

    return ensure_raw_data(cfg)


@task(name="data-version", cache_policy=NO_CACHE)
def data_version_step(cfg: Config) -> dict[str, str]:
    return tracking.data_version(cfg)


@task(name="validate", cache_policy=NO_CACHE)
def validate_step(cfg: Config) -> str:
    from tasks_mtl.validation import validate

    result = validate(cfg)
    if not result.success:
        raise DataValidationError(result.summary())
    return result.summary()


@task(name="prepare", cache_policy=NO_CACHE)
def prepare_step(cfg: Config) -> dict:
    from tasks_mtl.data.prepare import prepare

    return prepare(cfg)


def tokenize_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Data version + every setting the tokenized output depends on + where it lives + the package source
    (tasks_mtl/fingerprint.py: the same fingerprint as the stage key and the tokenized cache).

    (The flow refreshes the cache when the output directory has gone missing.)
    """
    cfg: Config = parameters["cfg"]
    return "tokenize-" + fingerprint(parameters["data_hash"], seed=cfg.seed, encoder=cfg.encoder,
                                     tasks=dict(cfg.tasks), data=cfg.data, out=str(cfg.path(cfg.data.tokenized_dir)))


@task(name="tokenize", cache_key_fn=tokenize_cache_key, persist_result=True)
def tokenize_step(cfg: Config, data_hash: str) -> Path:
    from tasks_mtl.tokenization import tokenize

    return tokenize(cfg)


@task(name="fingerprint", cache_policy=NO_CACHE)
def fingerprint_step(cfg: Config) -> str:
    """The final training stage's key (`train.stage_key`): what the trainer reuses a finished stage on, so
    the same key means the same model. Needs the tokenized data."""
    from tasks_mtl.train import stage_key

    return stage_key(cfg, len(cfg.training.stages) - 1)


@task(name="unchanged", cache_policy=NO_CACHE)
def same_version_step(cfg: Config, provenance: dict[str, str]) -> dict[str, Any] | None:
    """The registered version made from the same configuration, data and fingerprint, if there is one."""
    return registry.same_version(cfg, provenance)


@task(name="train-stage", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def train_stage_step(cfg: Config, index: int, run_id: str, init_dir: Path | None = None) -> Path:
    """One training stage in its own nested MLflow run; `init_dir` (the previous stage's result)
    orders the steps in the flow graph, `train_stage` finds it itself. With `training.nproc` > 1 torchrun
    trains it (tasks_mtl/distributed.py: rank 0 writes the checkpoint and the stage log), and the stage log's
    metrics go to MLflow from here afterwards; registering stays with the flow, so it happens once."""
    from tasks_mtl.distributed import launch
    from tasks_mtl.progress import StageProgress
    from tasks_mtl.runlog import read_stage_log
    from tasks_mtl.train import is_done, train_stage

    progress = StageProgress(emit=get_run_logger().info, every_s=60)  # the run's log in the UI: a line a minute
    name = cfg.training.stages[index].name
    with tracking.RunTracker.attach(cfg, run_id).stage(name) as stage_run:
        if cfg.training.nproc > 1 and not is_done(cfg, index):
            out = launch(cfg, cfg.training.nproc, name)
            log = stage_run.logger()
            for step, metrics in read_stage_log(cfg, index).items():
                log(metrics, step)
            return out
        return train_stage(cfg, index, log=stage_run.logger(), progress=progress)


@task(name="loss-report", cache_policy=NO_CACHE)
def loss_report_step(cfg: Config) -> Path:
    from tasks_mtl.train import write_loss_report

    return write_loss_report(cfg)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_step(cfg: Config, checkpoint: Path, run_id: str) -> dict[str, dict[str, float]]:
    from tasks_mtl.evaluate import evaluate_to_report

    metrics = evaluate_to_report(cfg, checkpoint)
    tracking.RunTracker.attach(cfg, run_id).log_task_metrics(metrics)
    create_table_artifact(
        key="test-metrics",
        table=[{"task": t, "metric": m, "value": round(v, 4)} for t, values in metrics.items() for m, v in values.items()],
        description="Per-task metrics on the test split",
    )
    return metrics


@task(name="evaluate-champion", cache_policy=NO_CACHE)
def champion_metrics_step(cfg: Config) -> dict[str, Any] | None:
    """{"version", "metrics"} of the current champion, None without one. The metrics are its scores on this
    run's test split, so the no-regression gates compare like with like after the data changed; the metrics
    recorded at its registration only when the champion cannot be evaluated here (e.g. its task set no
    longer matches the data). The version is what the gates were judged against: promotion checks it.
    Scores are cached in reports/champion_scores.json by (registry, version, test data, settings, code):
    a rerun on unchanged data does not score the champion again."""
    from tasks_mtl.evaluate import cached_evaluate, scores_key

    version = registry.champion_version(cfg)
    if version is None:
        return None
    champion = registry.resolve_model_dir(cfg, registry.version_uri(cfg, version))
    model = {"registry": tracking.tracking_uri(cfg), "name": cfg.registry.model_name, "version": version,
             "checkpoint": str(champion)}  # the download's path names the version's run: a rebuilt registry differs
    try:
        metrics, cached = cached_evaluate(cfg, champion, scores_key(cfg, model))
        get_run_logger().info("champion version %s: test scores %s", version,
                              "from the cache (same model, test data and code)" if cached else "computed and cached")
        return {"version": version, "metrics": metrics}
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as err:
        get_run_logger().warning("champion not re-evaluated (%s); using its recorded metrics", err)
        return {"version": version, "metrics": registry.version_metrics(cfg, version)}


@task(name="gates", cache_policy=NO_CACHE)
def gates_step(cfg: Config, metrics: dict[str, dict[str, float]], champion: dict[str, Any] | None) -> dict[str, Any]:
    result = evaluate_gates(cfg, metrics, champion and champion["metrics"], champion and champion["version"])
    write_gates(cfg, result)
    create_markdown_artifact(key="gate-decisions", markdown=gates_markdown(result), description=gate_summary(result))
    return result


@task(name="report", cache_policy=NO_CACHE)
def report_step(cfg: Config, run_id: str) -> Path | None:
    """Write reports/report.html and attach it to the run with metrics.json, gates.json and validation.html.

    The report is for people, not for the decision: whatever goes wrong here is logged as a warning and
    returns None, so registration and promotion run as they would without it.
    """
    try:
        from tasks_mtl.report import write_report

        out = write_report(cfg)
        reports = cfg.path(cfg.reports_dir)
        tracking.RunTracker.attach(cfg, run_id).log_artifacts(
            [out, reports / "metrics.json", reports / "gates.json", reports / "validation.html"])
    except Exception as err:  # noqa: BLE001 - any failure: see the docstring
        get_run_logger().warning("run report not written or not attached: %s: %s", type(err).__name__, err)
        return None
    return out


@task(name="register", cache_policy=NO_CACHE)
def register_step(cfg: Config, checkpoint: Path, metrics: dict, gates: dict, run_id: str,
                  provenance: dict[str, str]) -> int:
    return registry.log_and_register(cfg, checkpoint, metrics, gates, run_id=run_id, provenance=provenance)


@task(name="promote", cache_policy=NO_CACHE)
def promote_step(cfg: Config, version: int, gates: dict) -> bool:
    return registry.promote_if_passed(cfg, version, gates)


def gates_markdown(result: dict[str, Any]) -> str:
    """The gate table as markdown: what the Prefect UI shows for a run's decision."""
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    lines = [f"## Decision: **{result['decision']}**", "", "| gate | kind | value | bound | champion | passed |",
             "|---|---|---|---|---|---|"]
    for g in result["gates"]:
        lines.append(f"| {g['name']} | {g['kind']} | {num(g['value'])} | {num(g['threshold'])} | "
                     f"{num(g['champion'])} | {'yes' if g['passed'] else '**no**'} |")
    return "\n".join(lines)
