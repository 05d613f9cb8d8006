"""Deployments of the retrain flow: a weekly schedule on a local process work pool.

`python -m flows.deploy` creates the work pool if needed and registers the deployment with the
Prefect API in PREFECT_API_URL (a `prefect server start`, or Prefect Cloud). Then
`prefect worker start --pool mtl-process` runs the scheduled flow runs from this checkout.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.utilities.asyncutils import run_coro_as_sync

from flows.retrain import retrain

REPO_ROOT = Path(__file__).resolve().parents[1]
WORK_POOL = "mtl-process"  # a process pool: the worker runs the flow in its own Python environment
# GPU_WORK_POOL = "mtl-gpu"  # a later issue: a docker/kubernetes pool with a GPU node (profile gpu)
DEPLOYMENT = "weekly"
WEEKLY = "0 3 * * 1"  # Mondays 03:00: a week of new data, and the box is idle


async def _ensure_work_pool(name: str, pool_type: str = "process") -> None:
    from prefect.workers.process import ProcessWorker

    async with get_client() as client:
        try:
            await client.read_work_pool(name)
        except ObjectNotFound:
            await client.create_work_pool(WorkPoolCreate(
                name=name, type=pool_type, base_job_template=ProcessWorker.get_default_base_job_template()))


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool unless it exists (deploying to a missing pool is an error)."""
    run_coro_as_sync(_ensure_work_pool(name))


def deploy(root: Path = REPO_ROOT, name: str = DEPLOYMENT, cron: str | None = WEEKLY,
           work_pool: str = WORK_POOL, profile: str | None = None,
           overrides: dict[str, Any] | None = None, params: Path | None = None) -> UUID:
    """Register the retrain deployment; its runs load the flow from `root` and read `params`
    (default root/params.yaml; its directory is the run's root: data, reports, registry)."""
    ensure_work_pool(work_pool)
    parameters: dict[str, Any] = {"params": str(Path(params or Path(root) / "params.yaml").resolve())}
    if profile:
        parameters["profile"] = profile
    if overrides:
        parameters["overrides"] = overrides
    return retrain.from_source(source=str(Path(root).resolve()), entrypoint="flows/retrain.py:retrain").deploy(
        name=name,
        work_pool_name=work_pool,
        cron=cron,
        parameters=parameters,
        tags=["mtl-zh", "retrain"],
        description="Weekly gated retraining: a new registry version; champion only if every gate passes.",
        build=False,
        push=False,
        print_next_steps=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Deploy the weekly retrain flow to a process work pool.")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="checkout the worker runs from")
    parser.add_argument("--name", default=DEPLOYMENT)
    parser.add_argument("--cron", default=WEEKLY, help="schedule (cron); '' for none")
    parser.add_argument("--pool", default=WORK_POOL)
    parser.add_argument("--profile", default=None, help="params.yaml profile the runs use")
    parser.add_argument("--params", type=Path, default=None, help="params file (default: ROOT/params.yaml)")
    args = parser.parse_args(argv)
    deployment_id = deploy(args.root, args.name, args.cron or None, args.pool, args.profile, params=args.params)
    print(f"deployment retrain/{args.name} ({deployment_id}) on pool {args.pool!r}; "
          f"start a worker: prefect worker start --pool {args.pool}")


if __name__ == "__main__":
    main()
