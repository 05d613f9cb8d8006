"""The model registry: versions, the `challenger` and `champion` aliases, promotion and rollback.

Every trained model is logged as an MLflow pyfunc (models-from-code: tasks_mtl/pyfunc_model.py) wrapping
its self-contained checkpoint directory and registered as a new version of `cfg.registry.model_name`
with alias `challenger`.
Only `promote` moves `champion`, and only a passed gate (the retrain flow) or a person
(`mtl promote`) calls it. Each promotion records who, why and when on the version, and the
version it replaced, so `rollback` can walk back one champion at a time.

Version tags carry what `mtl models` shows without opening runs: `metric.<task>.<metric>`,
`gate` (passed/failed), `gate_summary`, `data_hash`, `git_commit`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, Schema

from tasks_mtl import tracking
from tasks_mtl.config import Config
from tasks_mtl.gates import gate_summary

CHAMPION = "champion"
CHALLENGER = "challenger"
CHECKPOINT_ARTIFACT = "checkpoint"  # the same name as tasks_mtl/pyfunc_model.py's
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = pd.DataFrame({"text": ["这家酒店的服务很好，房间也很干净。"], "text_pair": ["下次还会再来。"]})
# `text_pair` is optional: only NSP reads it, and most requests are single texts.
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "text"), ColSpec("string", "text_pair", required=False)]))


class NoChampionError(FileNotFoundError):
    """No version holds `champion` yet (a FileNotFoundError, so the CLI reports it plainly)."""


def _load_predictor(checkpoint_dir: Path) -> Any:
    from tasks_mtl.predict import Predictor  # torch is heavy; only a loaded model needs it

    return Predictor.from_dir(checkpoint_dir)


# --- helpers ---------------------------------------------------------------------------------


def _client(cfg: Config) -> mlflow.MlflowClient:
    return tracking.client(cfg)


def _version_by_alias(cfg: Config, alias: str):
    try:
        return _client(cfg).get_model_version_by_alias(cfg.registry.model_name, alias)
    except MlflowException:  # no such model, or no such alias
        return None


def _metric_tags(metrics: dict[str, dict[str, float]]) -> dict[str, str]:
    return {f"metric.{k.removeprefix('test.')}": repr(v) for k, v in tracking.metric_items(metrics).items()}


def _metrics_from_tags(tags: dict[str, str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for key, value in tags.items():
        if key.startswith("metric."):
            task, _, metric = key.removeprefix("metric.").partition(".")
            try:
                out.setdefault(task, {})[metric] = float(value)
            except ValueError:
                continue
    return out


def _requirements() -> list[str]:
    """Pinned runtime requirements of the pyfunc, from this environment.

    Given explicitly because MLflow's inference imports the model in a subprocess (seconds per
    registration) and cannot see this package. Serve with `--env-manager local` from the project's
    environment, where `tasks_mtl` is installed.
    """
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for dist in ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "pandas", "pytorch-crf"):
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            continue
    return pins


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- registering -----------------------------------------------------------------------------


def log_and_register(
    cfg: Config,
    checkpoint_dir: Path,
    metrics: dict[str, dict[str, float]],
    gates: dict[str, Any],
    run_id: str | None = None,
    provenance: dict[str, str] | None = None,
) -> int:
    """Log the checkpoint as a pyfunc model (into `run_id`, else a new run) and register it.

    The new version gets alias `challenger` and tags with its metrics, gate result and provenance;
    `champion` is not touched here.
    """
    uri = tracking.tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    provenance = provenance or tracking.data_version(cfg)
    run_kwargs = {"run_id": run_id} if run_id else {"experiment_id": tracking.experiment_id(cfg), "run_name": "register"}
    with mlflow.start_run(**run_kwargs) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),  # models-from-code: the file is stored with the model, nothing pickled
            artifacts={CHECKPOINT_ARTIFACT: str(Path(checkpoint_dir).resolve())},
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,
            registered_model_name=cfg.registry.model_name,
            pip_requirements=_requirements(),
        )
        active_run_id = run.info.run_id
    version = int(info.registered_model_version)
    mlflow_client = _client(cfg)
    tags = {
        **_metric_tags(metrics),
        "gate": "passed" if gates.get("passed") else "failed",
        "gate_summary": gate_summary(gates)[:5000],
        "run_id": active_run_id,
        **provenance,
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(cfg.registry.model_name, str(version), key, value)
    mlflow_client.set_registered_model_alias(cfg.registry.model_name, CHALLENGER, str(version))
    return version


def champion_metrics(cfg: Config) -> dict[str, dict[str, float]] | None:
    """Test metrics of the current champion (from its version tags, else its run), or None."""
    champion = _version_by_alias(cfg, CHAMPION)
    if champion is None:
        return None
    metrics = _metrics_from_tags(champion.tags or {})
    if metrics or not champion.run_id:
        return metrics or None
    run_metrics = _client(cfg).get_run(champion.run_id).data.metrics
    for key, value in run_metrics.items():
        if key.startswith("test."):
            task, _, metric = key.removeprefix("test.").partition(".")
            metrics.setdefault(task, {})[metric] = float(value)
    return metrics or None


def promote(cfg: Config, version: int, reason: str, who: str | None = None) -> None:
    """Make `version` the champion; record who, why, when, and which version it replaced."""
    mlflow_client = _client(cfg)
    name = cfg.registry.model_name
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise LookupError(f"{name} has no version {version}; `mtl models` lists the versions") from None
    previous = _version_by_alias(cfg, CHAMPION)
    if previous is not None and int(previous.version) == int(version):
        return  # already champion; keep the history it has
    tags = {
        "promoted_by": who or os.environ.get("USER") or getpass.getuser(),
        "promoted_reason": reason[:5000],
        "promoted_at": _now(),
        "previous_champion": str(previous.version) if previous is not None else "",
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(version), key, value)
    mlflow_client.set_registered_model_alias(name, CHAMPION, str(version))


def promote_if_passed(cfg: Config, version: int, gates: dict[str, Any], who: str = "retrain-flow") -> bool:
    """The automatic path: `champion` moves to `version` only when every gate passed."""
    if not gates.get("passed"):
        return False
    promote(cfg, version, reason=gate_summary(gates), who=who)
    return True


def rollback(cfg: Config, reason: str, who: str | None = None) -> int:
    """Move `champion` back to the version it replaced; returns that version."""
    mlflow_client = _client(cfg)
    name = cfg.registry.model_name
    current = _version_by_alias(cfg, CHAMPION)
    if current is None:
        raise NoChampionError(f"{name} has no champion to roll back from")
    previous = (current.tags or {}).get("previous_champion", "")
    if not previous:
        raise LookupError(f"{name} version {current.version} replaced no earlier champion; nothing to roll back to")
    tags = {
        "rolled_back_by": who or os.environ.get("USER") or getpass.getuser(),
        "rolled_back_reason": reason[:5000],
        "rolled_back_at": _now(),
        "rolled_back_to": previous,
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, str(current.version), key, value)
    mlflow_client.set_registered_model_alias(name, CHAMPION, previous)
    return int(previous)


def list_versions(cfg: Config) -> list[dict[str, Any]]:
    """Every version, oldest first: version, aliases, created (UTC), gate, key metrics."""
    name = cfg.registry.model_name
    mlflow_client = _client(cfg)
    try:
        aliases_of: dict[str, list[str]] = {}
        for alias, version in (mlflow_client.get_registered_model(name).aliases or {}).items():
            aliases_of.setdefault(str(version), []).append(alias)
        # search results do not carry aliases on every store; the registered model's map does
        versions = mlflow_client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return []
    key_metrics = [(task, next(iter(m))) for task, m in cfg.gates.thresholds.items() if m]
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        tags = mv.tags or {}
        shown = [
            f"{task}.{metric}={float(tags[f'metric.{task}.{metric}']):.3f}"
            for task, metric in key_metrics
            if f"metric.{task}.{metric}" in tags
        ]
        rows.append({
            "version": int(mv.version),
            "aliases": sorted(aliases_of.get(str(mv.version), [])),
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
            "gate": tags.get("gate", "-"),
            "metrics": " ".join(shown),
        })
    return rows


# --- loading ---------------------------------------------------------------------------------


def _cache_root() -> Path:
    base = os.environ.get("MTL_MODEL_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mtl-zh" / "models"
    return Path(base)


def _parse_models_uri(cfg: Config, uri: str):
    """models:/<name>@<alias> or models:/<name>/<version> -> the ModelVersion."""
    mlflow_client = _client(cfg)
    body = uri.removeprefix("models:/").strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        try:
            return mlflow_client.get_model_version_by_alias(name, alias)
        except MlflowException:
            if alias == CHAMPION:
                raise NoChampionError(
                    f"{name} has no champion yet: run `mtl pipeline` (a version that passes the gates "
                    f"becomes champion) or `mtl promote VERSION`"
                ) from None
            raise FileNotFoundError(f"{uri}: no version of {name} has alias {alias!r}") from None
    name, _, version = body.partition("/")
    if not version.isdigit():
        raise ValueError(f"{uri}: expected models:/<name>@<alias> or models:/<name>/<version>")
    try:
        return mlflow_client.get_model_version(name, version)
    except MlflowException:
        raise FileNotFoundError(f"{uri}: no such registered model version") from None


def resolve_model_dir(cfg: Config, uri: str | None) -> Path:
    """A local checkpoint directory for a model reference.

    None -> the champion; an existing directory -> itself; a models:/ URI -> the version's
    `checkpoint` artifact, downloaded once into a cache keyed by registry, name and version.
    """
    if uri is None:
        uri = f"models:/{cfg.registry.model_name}@{CHAMPION}"
    if not uri.startswith("models:/"):
        path = Path(uri).expanduser()
        if path.is_dir():
            return path.resolve()
        raise FileNotFoundError(f"{uri}: neither a checkpoint directory nor a models:/ URI")
    mv = _parse_models_uri(cfg, uri)
    key = hashlib.sha1(f"{tracking.tracking_uri(cfg)}|{mv.name}|{mv.version}|{mv.run_id}".encode()).hexdigest()[:16]
    target = _cache_root() / f"{mv.name}-v{mv.version}-{key}"
    if (target / "MLmodel").exists():
        return _checkpoint_in(target)
    uri_str = tracking.tracking_uri(cfg)
    mlflow.set_tracking_uri(uri_str)
    mlflow.set_registry_uri(uri_str)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, ignore_cleanup_errors=True) as tmp:
        with _no_progress_bars():
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=tmp)
        if not target.exists():  # a concurrent download may have won; either copy is the same
            shutil.move(local, target)
    return _checkpoint_in(target)


@contextlib.contextmanager
def _no_progress_bars():
    """MLflow's tqdm bars off while it downloads (they would land in a `mtl predict` pipe's stderr)."""
    before = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = before


def _checkpoint_in(model_dir: Path) -> Path:
    artifacts = Model.load(str(model_dir)).flavors["python_function"].get("artifacts", {})
    relative = artifacts[CHECKPOINT_ARTIFACT]["path"]
    return (model_dir / relative).resolve()
