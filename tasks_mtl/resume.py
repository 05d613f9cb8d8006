"""A running stage's resume save `<dir>.resume/`: what it holds, which one is trusted, and the stage log
kept in step with it (the loop itself is tasks_mtl/train.py).

The save is a checkpoint directory (tasks_mtl/checkpoint.py, written atomically with a manifest) whose
state.json / state.safetensors hold the step, the stage key, the optimizers, schedulers, sampler, batch
orders, torch RNG, the weighting's state and the count of skipped non-finite steps. A save that fails its
manifest, lacks its state, or was made for another configuration (another stage key) is skipped with a
warning: the stage goes on from the previous complete save (`<dir>.resume.old/`, left by a crash in the
middle of a swap) or starts over. It is never loaded.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from tasks_mtl.checkpoint import load_state
from tasks_mtl.manifest import verify_manifest
from tasks_mtl.runlog import HEADER

logger = logging.getLogger(__name__)


def training_state(step: int, key: str, optimizers, schedulers, sampler, weighting, data: dict,
                   nonfinite: int, rank_states: list[dict] | None = None) -> dict[str, Any]:
    """Everything besides the weights that a resumed stage needs to continue exactly. Under several processes
    (rank 0 saves) `rank_states` holds each rank's own part (`rank_part`): its batch orders, over its own shard,
    and its torch RNG (each rank draws its own dropout)."""
    state = {
        "step": step, "key": key, "nonfinite": nonfinite,
        "optimizer": [o.state_dict() for o in optimizers], "scheduler": [s.state_dict() for s in schedulers],
        "sampler": sampler.state_dict(), "weighting": weighting.state_dict(),
        "batches": {t: d.order.state_dict() for t, d in data.items()}, "rng": torch.get_rng_state(),
    }
    return state | {"rank_states": rank_states} if rank_states is not None else state


def rank_part(data: dict) -> dict[str, Any]:
    """What differs between the processes of a stage: this rank's batch orders and torch RNG state."""
    return {"batches": {t: d.order.state_dict() for t, d in data.items()}, "rng": torch.get_rng_state()}


def restore(state: dict[str, Any], optimizers, schedulers, sampler, weighting, data: dict, rank: int = 0) -> None:
    """Put a saved training state back (call it last before the loop: it sets the torch RNG); `rank` picks this
    process's batch orders and RNG from a save made by several."""
    for optimizer, saved in zip(optimizers, state["optimizer"]):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, state["scheduler"]):
        scheduler.load_state_dict(saved)
    sampler.load_state_dict(state["sampler"])
    weighting.load_state_dict(state["weighting"])
    own = state["rank_states"][rank] if len(state.get("rank_states") or []) > rank else state
    for stream, order in own["batches"].items():
        data[stream].order.load_state_dict(order)
    torch.set_rng_state(own["rng"])


def find_resume(resume_dir: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """(directory, training state) of the newest complete resume save made for this stage key, or None."""
    for candidate in (resume_dir, resume_dir.with_name(resume_dir.name + ".old")):
        if not candidate.exists():
            continue
        try:
            verify_manifest(candidate, required=True)
            state = load_state(candidate)
        except Exception as err:  # noqa: BLE001 - any unreadable save is skipped, never loaded
            logger.warning("skipping the resume save %s: %s", candidate, err)
            continue
        if state.get("key") != key:
            logger.warning("skipping the resume save %s: it was made for another configuration or data "
                           "(stage key differs)", candidate)
            continue
        return candidate, state
    return None


def discard_resume(resume_dir: Path) -> None:
    """Remove the resume save and whatever a crash left beside it (a half-written .tmp, an .old copy)."""
    for path in (resume_dir, *(resume_dir.with_name(resume_dir.name + s) for s in (".tmp", ".old"))):
        shutil.rmtree(path, ignore_errors=True)


def trim_log(path: Path, last_step: int) -> None:
    """Keep the stage log's rows up to `last_step` (global step) and drop the rest: the steps an interrupted
    run logged after its last save are run again and logged again. Nothing left: the file goes."""
    if not path.exists():
        return
    with path.open(newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.reader(fh)][1:]
    kept = [row for row in rows if len(row) == len(HEADER) and row[0].isdigit() and int(row[0]) <= last_step]
    if not kept:
        path.unlink()
        return
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([HEADER, *kept])
    tmp.replace(path)
