"""The retraining flow: data version -> validate -> prepare -> tokenize -> fingerprint (stop here when a
version made from the same configuration, data and fingerprint is registered) -> train stages ->
evaluate -> gates -> report -> register (challenger, or smoke) -> promote (champion, only if every gate passed).

One run at a time per checkout: the flow holds the checkout's lock file (`.mtl-run.lock` in the run
root) from start to end, and a second run waits for it, saying who holds it. Register and promote run
under the registry's lock too (`registry.registry_lock`), so `mtl promote` or a run from another
checkout never interleaves with them.

Its parameters are plain values (a params file, a profile, dotted overrides) so a deployment
can schedule it; `run_local` runs it in-process on Prefect's ephemeral API for `mtl pipeline`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from flows.steps import (
    champion_metrics_step,
    data_version_step,
    evaluate_step,
    fingerprint_step,
    gates_step,
    ingest_step,
    loss_report_step,
    prepare_step,
    promote_step,
    register_step,
    report_step,
    same_version_step,
    tokenize_step,
    train_stage_step,
    validate_step,
)
from tasks_mtl import registry, tracking
from tasks_mtl.config import Config, load_config
from tasks_mtl.gates import gate_summary


RUN_LOCK = ".mtl-run.lock"  # in the run root: one run at a time writes its prepared/, tokenized/, checkpoints/


@flow(name="retrain")  # no log_prints: library output (datasets, tqdm) would flood the run log
def retrain(params: str = "params.yaml", profile: str | None = None,
            overrides: dict[str, Any] | None = None, config: dict[str, Any] | None = None,
            force: bool = False) -> dict[str, Any]:
    """Retrain on the current data and register the result; promote it only through the gates.

    The configuration comes from `params` + `profile` + dotted `overrides` (what a deployment
    passes), or, when `config` is given, is that fully resolved configuration as it stands.
    Bad data fails the flow at `validate`, before anything is trained or registered. When a
    registered version was made from the same configuration, data and fingerprint, the run says so
    and registers nothing (`unchanged_since` in the result), unless `force`.
    """
    cfg = Config.model_validate(config) if config is not None else load_config(params, profile=profile, overrides=overrides)
    log = get_run_logger()
    with registry.hold_lock(cfg.path(RUN_LOCK), f"mtl pipeline --profile {cfg.profile}", on_wait=log.warning):
        return _retrain(cfg, force, log)


def _retrain(cfg: Config, force: bool, log) -> dict[str, Any]:
    ingest_step(cfg)  # a fresh clone has data.dvc but no data/: the bundled ingest reproduces it
    provenance = data_version_step(cfg)
    validate_step(cfg)

    run = tracking.RunTracker.start(cfg, run_name=flow_run.get_name() or "retrain",
                                    tags={**provenance, "prefect_flow_run_id": str(flow_run.get_id() or "")})
    try:
        prepare_step(cfg)
        # the cache hands back a path; if that directory is gone, rebuild instead of trusting it
        fresh = not (cfg.path(cfg.data.tokenized_dir) / "meta.json").exists()
        tokenize_step.with_options(refresh_cache=fresh)(cfg, provenance["data_hash"])
        provenance = registry.provenance_tags(cfg, fingerprint_step(cfg), data_version=provenance)
        run.set_tags(provenance)
        same = None if force else same_version_step(cfg, provenance)
        if same is not None:
            run.set_tags({"unchanged_since": same["version"]})
            run.finish()
            log.info("nothing changed since version %s (%s; gate %s): same configuration, data and training "
                     "fingerprint, so nothing is registered; force=True (`mtl pipeline --force`) registers it anyway",
                     same["version"], ", ".join(same["aliases"]) or "no alias", same["gate"])
            return {"metrics": same["metrics"], "gates": {}, "version": None, "promoted": False,
                    "unchanged_since": same["version"]}
        checkpoint: Path | None = None
        for index, stage in enumerate(cfg.training.stages):
            checkpoint = train_stage_step.with_options(name=f"train-{stage.name}")(cfg, index, run.run_id, checkpoint)
        loss_report_step(cfg)
        metrics = evaluate_step(cfg, checkpoint, run.run_id)
        gates = gates_step(cfg, metrics, champion_metrics_step(cfg))
        report_step(cfg, run.run_id)  # never raises: a report problem is a warning, not a lost model
        with registry.registry_lock(cfg, on_wait=log.warning):  # register + promote: one change of the registry
            version = register_step(cfg, checkpoint, metrics, gates, run.run_id, provenance)
            promoted = promote_step(cfg, version, gates)
        run.set_tags({"gate": gates["decision"], "gate_summary": gate_summary(gates),
                      "model_version": version, "promoted": promoted})
    except BaseException:
        run.finish("FAILED")
        raise
    run.finish()
    log.info("version %s (alias %s): %s; champion %s", version, registry.candidate_alias(cfg), gate_summary(gates),
             "moved" if promoted else "unchanged")
    return {"metrics": metrics, "gates": gates, "version": version, "promoted": promoted}


def flow_parameters(cfg: Config, params: str | Path | None = None, profile: str | None = None,
                    overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Serialisable flow parameters that rebuild `cfg`.

    With the params file it came from, those are passed as they are (readable in the UI);
    without, the whole resolved configuration is passed as `config`, since dotted overrides
    merge into the defaults and so could not drop a default key (a default gate, say).
    """
    if params is not None:
        return {"params": str(params), "profile": profile, "overrides": overrides or None}
    resolved = cfg.model_dump(mode="json")
    resolved["root"] = str(cfg.root.resolve())
    return {"config": resolved}


def run_local(cfg: Config, params: str | Path | None = None, profile: str | None = None,
              overrides: dict[str, Any] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the flow in this process (ephemeral Prefect API unless PREFECT_API_URL is set); `force`
    registers a version even when nothing changed since one.

    Never raises for a failed run: returns {"metrics": {}, "gates": {}, "version": None,
    "promoted": False, "error": <message>} so the CLI can print what it knows and exit non-zero.

    The checkout's run lock is taken here already, before Prefect's ephemeral server starts on the
    project's database: two runs started at once would otherwise race to create it (the flow takes
    the same lock again, for deployments).
    """
    settings = {}
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        # a fresh PREFECT_HOME migrates its database first; 20 s is not enough on a busy 2-core box
        settings[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = 180

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with registry.hold_lock(cfg.path(RUN_LOCK), f"mtl pipeline --profile {cfg.profile}", on_wait=say), \
            temporary_settings(settings):
        state = retrain(**flow_parameters(cfg, params, profile, overrides), force=force, return_state=True)
    if state.is_completed():
        return state.result()
    error = state.result(raise_on_failure=False)
    message = str(error) if isinstance(error, BaseException) else (state.message or state.name)
    return {"metrics": {}, "gates": {}, "version": None, "promoted": False, "error": message}


if __name__ == "__main__":
    retrain()
