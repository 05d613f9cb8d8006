"""Where a pipeline run's time goes: the flow's own overhead against its steps' compute, and a no-op `dvc repro`.

In a temporary clone of this repository (HEAD; nothing in the checkout is touched): `mtl ingest`, then
`mtl pipeline --profile quick` timed as a command, its flow run and step runs read from what Prefect records
(the task runs' start and end times in the clone's PREFECT_HOME database); then `dvc repro` under the quick
profile twice, the second (nothing to do) timed. `--default-home DIR` also splits the newest completed default
run recorded in DIR/prefect.db (e.g. the checkout's .prefect after `make run`) by step. Prints one JSON line.

    python benchmarks/pipeline_overhead.py [--default-home .prefect] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EPOCH = datetime(1970, 1, 1)


def _when(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "")).replace(tzinfo=None) if value else None


def flow_steps(prefect_home: Path, profile: str) -> dict:
    """The newest completed `retrain` flow run of `profile` in PREFECT_HOME's database: its wall time, each step's
    seconds (task runs by name, summed over retries) and the overhead (wall minus the steps)."""
    db = sqlite3.connect(f"file:{prefect_home / 'prefect.db'}?mode=ro", uri=True)
    runs = db.execute("select fr.id, fr.name, fr.start_time, fr.end_time, fr.parameters from flow_run fr "
                      "join flow f on f.id = fr.flow_id where f.name = 'retrain' and fr.state_type = 'COMPLETED' "
                      "order by fr.start_time desc").fetchall()
    for run_id, name, start, end, parameters in runs:
        params = json.loads(parameters or "{}")
        chosen = params.get("profile") or (params.get("config") or {}).get("profile") or "default"
        if chosen != profile:
            continue
        wall = (_when(end) - _when(start)).total_seconds()
        steps: dict[str, float] = {}
        for step, t0, t1 in db.execute("select name, start_time, end_time from task_run where flow_run_id = ?",
                                       (run_id,)):
            if t0 and t1:
                key = re.sub(r"-[0-9a-f]{3}$", "", step)  # Prefect's run name "validate-93e" -> the step
                steps[key] = steps.get(key, 0.0) + (_when(t1) - _when(t0)).total_seconds()
        compute = sum(steps.values())
        training = sum(v for k, v in steps.items() if k.startswith("train-"))
        return {"flow_run": name, "wall_s": round(wall, 1), "steps_s": round(compute, 1),
                "overhead_s": round(wall - compute, 1), "overhead_share": round((wall - compute) / wall, 3),
                "training_s": round(training, 1), "not_training_share": round((wall - training) / wall, 3),
                "by_step_s": {k: round(v, 1) for k, v in sorted(steps.items(), key=lambda kv: -kv[1])}}
    raise LookupError(f"no completed retrain run of profile {profile!r} in {prefect_home / 'prefect.db'}")


def run(command: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds `command` took; its output is shown only when it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"pipeline_overhead: {' '.join(command)} failed ({done.returncode}):\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--default-home", type=Path, default=None,
                        help="a PREFECT_HOME holding a finished default run (e.g. .prefect) to split by step")
    parser.add_argument("--no-dvc", action="store_true", help="skip the dvc repro part")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and print where it is")
    args = parser.parse_args()

    result: dict = {"benchmark": "pipeline_overhead", "commit": subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()}
    if args.default_home is not None:
        result["default_run"] = flow_steps(args.default_home, "default")
    scratch = Path(tempfile.mkdtemp(prefix="mtl-overhead-"))
    clone = scratch / "repo"
    try:
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
        env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "PREFECT_HOME": str(clone / ".prefect"),
                    "MTL_MODEL_CACHE": str(scratch / "model-cache"), "DVC_NO_ANALYTICS": "1",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PYTHONPATH": str(clone)})
        run([str(BIN / "mtl"), "ingest", "--out", "data"], clone, env)
        command_s = run([str(BIN / "mtl"), "pipeline", "--profile", "quick"], clone, env)
        quick = flow_steps(clone / ".prefect", "quick")
        result["quick_run"] = {**quick, "command_s": round(command_s, 1),
                               "startup_s": round(command_s - quick["wall_s"], 1)}  # process, imports, Prefect's API
        if not args.no_dvc:
            params = clone / "params.yaml"
            params.write_text(params.read_text(encoding="utf-8").replace("profile: default", "profile: quick", 1),
                              encoding="utf-8")
            first = run([str(BIN / "dvc"), "repro", "-q"], clone, env)
            second = run([str(BIN / "dvc"), "repro", "-q"], clone, env)
            result["dvc_repro"] = {"profile": "quick", "first_s": round(first, 1), "noop_s": round(second, 2)}
    finally:
        if args.keep:
            result["scratch"] = str(scratch)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
