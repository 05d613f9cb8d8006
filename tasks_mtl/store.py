"""Where the tracking and registry store is, answered without importing MLflow (1.5 s on this machine), so the
CLI can refuse a registry command at once when the embedded SQLite registry was never created."""

from __future__ import annotations

import os
from pathlib import Path

from tasks_mtl.config import Config


def tracking_uri(cfg: Config) -> str:
    """cfg.registry.tracking_uri, else $MLFLOW_TRACKING_URI, else an absolute SQLite file in the checkout.

    Absolute, because MLflow's default is a path relative to whatever directory the process
    happens to run in (a Prefect worker, `dvc repro`, a notebook), which scatters the registry.
    """
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return "sqlite:///" + str(cfg.path("mlflow.db"))


def sqlite_file(uri: str) -> Path | None:
    """The database file of a SQLite store URI; None for any other store (a tracking server, PostgreSQL)."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def artifact_root(cfg: Config) -> str | None:
    """Where a new experiment stores artifacts: beside a local SQLite store, else the server's choice."""
    uri = tracking_uri(cfg)
    if uri == "sqlite:///" + str(cfg.path("mlflow.db")):
        return cfg.path("mlartifacts").as_uri()
    db = sqlite_file(uri)
    return (db.parent / "mlartifacts").as_uri() if db is not None else None  # a server serves its own


def missing_registry(cfg: Config) -> Path | None:
    """The SQLite file of this configuration's registry when it does not exist yet (nothing was ever registered
    there), else None (it exists, or the store is a server, which is asked)."""
    db = sqlite_file(tracking_uri(cfg))
    return db if db is not None and not db.exists() else None
