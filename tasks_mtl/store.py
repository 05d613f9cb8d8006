"""Where the tracking and registry store is, answered without importing MLflow (1.5 s on this machine), so the
CLI can refuse a registry command at once when the embedded SQLite registry was never created, or when it
surely lacks the version or the champion that a command names."""

from __future__ import annotations

import contextlib
import os
import sqlite3
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


def _read_registry(cfg: Config, query: str, args: tuple) -> list[tuple] | None:
    """The rows of a read-only query on this configuration's SQLite registry, or None when the store is not an
    existing SQLite file or the query fails (tables of another MLflow schema): the caller then asks MLflow."""
    db = sqlite_file(tracking_uri(cfg))
    if db is None or not db.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=5)) as con:
            return con.execute(query, args).fetchall()
    except sqlite3.Error:
        return None


def surely_lacks_version(cfg: Config, version: int) -> bool:
    """True when the SQLite registry has no row for `version` of the model in MLflow's `model_versions` table
    (any workspace): a mistyped `mtl promote` is refused before MLflow loads. False when it has one (a deleted
    version keeps its row: MLflow itself answers then) or when this cannot be read."""
    rows = _read_registry(cfg, "SELECT version FROM model_versions WHERE name = ? AND version = ?",
                          (cfg.registry.model_name, int(version)))
    return rows == []


def surely_lacks_alias(cfg: Config, alias: str) -> bool:
    """True when the SQLite registry's `registered_model_aliases` table has no `alias` for the model (any
    workspace); False when it has one or when this cannot be read."""
    rows = _read_registry(cfg, "SELECT version FROM registered_model_aliases WHERE name = ? AND alias = ?",
                          (cfg.registry.model_name, alias))
    return rows == []
