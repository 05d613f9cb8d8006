"""The model registry: versions, the `challenger`, `smoke` and `champion` aliases, promotion and rollback.

Every trained model is logged as an MLflow pyfunc (models-from-code: tasks_mtl/pyfunc_model.py) wrapping
its self-contained checkpoint directory and registered as a new version of `cfg.registry.model_name`
with alias `challenger`, or `smoke` when its profile is not production-capable (`production: false`,
the quick profile): such a version can never become champion.
Only `promote` moves `champion`, and only a passed gate (the retrain flow) or a person
(`mtl promote`) calls it. Each promotion records who, why and when on the version, and the
version it replaced, so `rollback` can walk back one champion at a time.

Version tags carry what `mtl models` shows without opening runs: `metric.<task>.<metric>`,
`gate` (passed/failed), `gate_summary`, `promotion` (`champion` or why not, once decided), and what
made the model: `profile`, `production`, `config_hash`, `data_hash`, `fingerprint` (the final training
stage's key), `git_commit`.

Consistency: a version is created with all its tags in one registry write; register, promote and
rollback run under one lock file per registry (`registry_lock`); a promotion or rollback that fails
midway takes back the tags it wrote unless the alias did move, so `champion` and the
`previous_champion` chain always agree.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
from tasks_mtl.store import sqlite_file

CHAMPION = "champion"
CHALLENGER = "challenger"  # the latest version of a production-capable profile
SMOKE = "smoke"  # the latest version of a profile that is not production-capable (quick): never champion
# Tags that, all equal between a new run and a registered version, mean nothing changed: the same resolved
# configuration, the same data, and the same fingerprint of the final training stage (train.stage_key: what
# the trainer itself reuses a finished stage on).
IDENTITY = ("config_hash", "data_hash", "fingerprint")
CHECKPOINT_ARTIFACT = "checkpoint"  # the same name as tasks_mtl/pyfunc_model.py's
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
INPUT_EXAMPLE = pd.DataFrame({"text": ["这家酒店的服务很好，房间也很干净。"], "text_pair": ["下次还会再来。"]})
# `text_pair` is optional: only NSP reads it, and most requests are single texts.
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "text"), ColSpec("string", "text_pair", required=False)]))
_log = logging.getLogger(__name__)


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


def _aliases_of(mlflow_client: mlflow.MlflowClient, name: str) -> dict[str, list[str]]:
    """version -> its aliases (search results do not carry aliases on every store; the registered model's map does)."""
    aliases_of: dict[str, list[str]] = {}
    for alias, version in (mlflow_client.get_registered_model(name).aliases or {}).items():
        aliases_of.setdefault(str(version), []).append(alias)
    return aliases_of


# --- locking ---------------------------------------------------------------------------------


@contextlib.contextmanager
def hold_lock(path: Path, holder: str, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the lock file `path` for the block; another process that wants it waits its turn.

    An OS lock (flock, through `filelock`), so a killed holder never leaves it stuck. Reentrant within a
    process, across threads (Prefect runs steps in worker threads). A waiter is told, through `on_wait`,
    who holds it: the holder writes `holder`, its pid and the time into the file.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, thread_local=False, is_singleton=True)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            held_by = path.read_text(encoding="utf-8").strip() or "another process"
        except OSError:
            held_by = "another process"
        (on_wait or _log.warning)(f"waiting for {path} (held by {held_by})")
        lock.acquire()
    try:
        if lock.lock_counter == 1:
            path.write_text(f"{holder}, pid {os.getpid()}, since {_now()}\n", encoding="utf-8")
        yield
    finally:
        lock.release()


def registry_lock(cfg: Config, on_wait: Callable[[str], None] | None = None) -> contextlib.AbstractContextManager:
    """The lock around changes of this registry: beside a SQLite store, else in the run root (a tracking
    server's registry is then guarded only against runs on this machine)."""
    db = sqlite_file(tracking.tracking_uri(cfg))
    path = db.with_name(db.name + ".lock") if db is not None else cfg.path(".mtl-registry.lock")
    return hold_lock(path, f"registry changes for {cfg.registry.model_name}", on_wait)


# --- registering -----------------------------------------------------------------------------


def candidate_alias(cfg: Config) -> str:
    """The alias a new version of this configuration gets: `challenger`, or `smoke` when not production-capable."""
    return CHALLENGER if cfg.production else SMOKE


def provenance_tags(cfg: Config, fingerprint: str = "", data_version: dict[str, str] | None = None) -> dict[str, str]:
    """What makes a model, as version tags: the profile and whether it may become champion, the configuration's
    hash, the data version and git commit (`tracking.data_version`), and the final training stage's fingerprint."""
    return {
        **(data_version or tracking.data_version(cfg)),
        "profile": cfg.profile,
        "production": "true" if cfg.production else "false",
        "config_hash": cfg.config_hash(),
        "fingerprint": fingerprint,
    }


def same_version(cfg: Config, provenance: dict[str, str]) -> dict[str, Any] | None:
    """The newest registered version whose IDENTITY tags all equal `provenance`'s (nothing changed since it was
    made) and whose promotion was decided, as {"version", "aliases", "gate", "metrics"}; None when there is none
    or an identity tag is unknown. A version whose run ended before the decision (a crash or registry fault
    between register and promote) does not count, so rerunning finishes the job."""
    wanted = {key: provenance.get(key, "") for key in IDENTITY}
    if not all(wanted.values()):
        return None
    name = cfg.registry.model_name
    mlflow_client = _client(cfg)
    try:
        versions = mlflow_client.search_model_versions(f"name = '{name}'")
        aliases_of = _aliases_of(mlflow_client, name) if versions else {}
    except MlflowException:
        return None
    same = [mv for mv in versions
            if "promotion" in (mv.tags or {}) and all((mv.tags or {}).get(k) == v for k, v in wanted.items())]
    if not same:
        return None
    mv = max(same, key=lambda v: int(v.version))
    return {"version": int(mv.version), "aliases": sorted(aliases_of.get(str(mv.version), [])),
            "gate": (mv.tags or {}).get("gate", "-"), "metrics": _metrics_from_tags(mv.tags or {})}


def log_and_register(
    cfg: Config,
    checkpoint_dir: Path,
    metrics: dict[str, dict[str, float]],
    gates: dict[str, Any],
    run_id: str | None = None,
    provenance: dict[str, str] | None = None,
) -> int:
    """Log the checkpoint as a pyfunc model (into `run_id`, else a new run) and register it.

    The version is created together with its tags (metrics, gate result, `provenance`: what made it) in one
    registry write, so no version exists without them; then it gets alias `challenger` (`smoke` for a profile
    that is not production-capable). `champion` is not touched here.
    """
    uri = tracking.tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    provenance = provenance or provenance_tags(cfg)
    run_kwargs = {"run_id": run_id} if run_id else {"experiment_id": tracking.experiment_id(cfg), "run_name": "register"}
    with mlflow.start_run(**run_kwargs) as run:
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),  # models-from-code: the file is stored with the model, nothing pickled
            artifacts={CHECKPOINT_ARTIFACT: str(Path(checkpoint_dir).resolve())},
            signature=SIGNATURE,
            input_example=INPUT_EXAMPLE,
            pip_requirements=_requirements(),
        )
        active_run_id = run.info.run_id
    tags = {
        **_metric_tags(metrics),
        "gate": "passed" if gates.get("passed") else "failed",
        "gate_summary": gate_summary(gates)[:5000],
        "run_id": active_run_id,
        **provenance,
    }
    with registry_lock(cfg):
        version = int(mlflow.register_model(info.model_uri, cfg.registry.model_name, tags=tags).version)
        _client(cfg).set_registered_model_alias(cfg.registry.model_name, candidate_alias(cfg), str(version))
    return version


def champion_version(cfg: Config) -> int | None:
    """The version that holds `champion` now, or None."""
    champion = _version_by_alias(cfg, CHAMPION)
    return int(champion.version) if champion is not None else None


def version_uri(cfg: Config, version: int) -> str:
    return f"models:/{cfg.registry.model_name}/{version}"


def version_metrics(cfg: Config, version: int) -> dict[str, dict[str, float]] | None:
    """Test metrics recorded for `version` (its tags, else its run's `test.*` metrics), or None."""
    try:
        mv = _client(cfg).get_model_version(cfg.registry.model_name, str(version))
    except MlflowException:
        return None
    metrics = _metrics_from_tags(mv.tags or {})
    if metrics or not mv.run_id:
        return metrics or None
    run_metrics = _client(cfg).get_run(mv.run_id).data.metrics
    for key, value in run_metrics.items():
        if key.startswith("test."):
            task, _, metric = key.removeprefix("test.").partition(".")
            metrics.setdefault(task, {})[metric] = float(value)
    return metrics or None


def champion_metrics(cfg: Config) -> dict[str, dict[str, float]] | None:
    """Test metrics of the current champion (from its version tags, else its run), or None."""
    version = champion_version(cfg)
    return version_metrics(cfg, version) if version is not None else None


def _move_champion(cfg: Config, target: int, tagged: int, tags: dict[str, str]) -> None:
    """Write `tags` (who, why, and the version before) on version `tagged`, then point `champion` at `target`.

    If anything fails midway, the tags go back to what they were, unless `champion` did move (the registry
    may have applied the call and lost only its answer): the tags then describe what happened. Either way
    `champion` and the tags that explain it agree, and the exception is raised.
    """
    mlflow_client = _client(cfg)
    name = cfg.registry.model_name
    before = dict(mlflow_client.get_model_version(name, str(tagged)).tags or {})
    try:
        for key, value in tags.items():
            mlflow_client.set_model_version_tag(name, str(tagged), key, value)
        mlflow_client.set_registered_model_alias(name, CHAMPION, str(target))
    except BaseException:
        try:
            moved = champion_version(cfg) == int(target)
        except Exception:  # noqa: BLE001 - the registry is still failing: assume the alias did not move
            moved = False
        if not moved:
            for key in tags:
                with contextlib.suppress(Exception):  # best effort: the registry may still be failing
                    if key in before:
                        mlflow_client.set_model_version_tag(name, str(tagged), key, before[key])
                    else:
                        mlflow_client.delete_model_version_tag(name, str(tagged), key)
        raise


def promote(cfg: Config, version: int, reason: str, who: str | None = None) -> None:
    """Make `version` the champion; record who, why, when, and which version it replaced.

    A version made by a profile that is not production-capable (tag `production: false`) is refused.
    """
    with registry_lock(cfg):
        _promote(cfg, version, reason, who)


def _promote(cfg: Config, version: int, reason: str, who: str | None) -> None:
    mlflow_client = _client(cfg)
    name = cfg.registry.model_name
    try:
        mv = mlflow_client.get_model_version(name, str(version))
    except MlflowException:
        raise LookupError(f"{name} has no version {version}; `mtl models` lists the versions") from None
    made_by = mv.tags or {}
    if made_by.get("production") == "false":
        raise ValueError(f"{name} version {version} was made by profile {made_by.get('profile', '?')!r}, which is not "
                         "production-capable (production: false): it cannot become champion")
    previous = _version_by_alias(cfg, CHAMPION)
    if previous is not None and int(previous.version) == int(version):
        return  # already champion; keep the history it has
    tags = {
        "promotion": "champion",
        "promoted_by": who or os.environ.get("USER") or getpass.getuser(),
        "promoted_reason": reason[:5000],
        "promoted_at": _now(),
        "previous_champion": str(previous.version) if previous is not None else "",
    }
    _move_champion(cfg, version, version, tags)


def promote_if_passed(cfg: Config, version: int, gates: dict[str, Any], who: str = "retrain-flow") -> bool:
    """The automatic path: `champion` moves to `version` only when every gate passed, and only while the
    champion is still the version the gates compared with (`gates["champion_version"]`, None: no champion).
    A champion that changed in between (a person's `mtl promote`, a run elsewhere) was never compared with,
    so nothing moves.

    The decision is recorded on the version (tag `promotion`: `champion`, or `not promoted: <why>`); a
    version without it is one whose run ended before the decision (a crash, a registry fault).
    """
    with registry_lock(cfg):
        current = champion_version(cfg)
        judged = gates.get("champion_version")
        if not gates.get("passed"):
            outcome = "not promoted: the gates rejected it"
        elif current != judged:
            outcome = (f"not promoted: the gates compared with champion {judged if judged is not None else '(none)'}, "
                       f"but version {current} became champion meanwhile")
        else:
            _promote(cfg, version, reason=gate_summary(gates), who=who)
            return True
        _client(cfg).set_model_version_tag(cfg.registry.model_name, str(version), "promotion", outcome)
    return False


def rollback(cfg: Config, reason: str, who: str | None = None) -> int:
    """Move `champion` back to the version it replaced; returns that version."""
    with registry_lock(cfg):
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
        _move_champion(cfg, int(previous), int(current.version), tags)
    return int(previous)


def list_versions(cfg: Config) -> list[dict[str, Any]]:
    """Every version, oldest first: version, aliases, profile, created (UTC), gate, key metrics."""
    name = cfg.registry.model_name
    mlflow_client = _client(cfg)
    try:
        aliases_of = _aliases_of(mlflow_client, name)
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
            "profile": tags.get("profile", "-"),
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
                    f"becomes champion; a smoke run's version is models:/{name}@{SMOKE}) or `mtl promote VERSION`"
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
