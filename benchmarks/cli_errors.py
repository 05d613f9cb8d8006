"""How fast and how plainly the CLI refuses a user's mistake: issue "6 of 9" asks for an actionable one-line error
in under 2 s for each mistake it lists.

Each case runs the installed `mtl` command in a fresh temporary directory (a copy of this repository's
params.yaml in `project/`, without a registry as on a fresh clone, and in `registered/`, whose empty registry is
made first; the command started from `elsewhere/`, so nothing the command creates goes unseen)
and records its wall time, exit code, how many lines it printed and its first line. A case passes when the
exit code is non-zero, the output holds no traceback, stdout is one line (MLflow may log on stderr) and it
contains the expected words. Prints one JSON line: every case, the slowest time and whether all pass in
under 2 s.

    python benchmarks/cli_errors.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MTL = str(Path(sys.executable).parent / "mtl")
LIMIT_S = 2.0


def cases(project: Path, registered: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (arguments, words the message must contain). `project` has no registry (a fresh clone);
    `registered` has an empty one, so its promote and rollback go through MLflow."""
    params = str(project / "params.yaml")
    with_registry = str(registered / "params.yaml")
    return {
        "validate --params missing": (["validate", "--params", str(project / "typo.yaml")], "typo.yaml not found"),
        "pipeline --params missing": (["pipeline", "--params", "typo.yaml"], "typo.yaml not found"),
        "models --params missing": (["models", "--params", str(project / "typo.yaml")], "typo.yaml not found"),
        "unknown weighting in a stage": (["validate", "--params", params, "-S", "training.stages.1.weighting=pcgrd"],
                                         "unknown weighting 'pcgrd'"),
        "unknown sampler": (["validate", "--params", params, "-S", "training.stages.0.sampler=roundrobin"],
                            "unknown sampler 'roundrobin'"),
        "gate for a task the run lacks": (["validate", "--params", params, "-S", "gates.thresholds.intent.accuracy=0.5"],
                                          "intent"),
        "unknown key": (["validate", "--params", params, "-S", "training.batchsize=8"], "batchsize"),
        "unknown split": (["evaluate", "--params", params, "--split", "dev"], "dev"),
        "promote, no registry yet": (["promote", "99", "--params", params], "no registry at"),
        "rollback, no registry yet": (["rollback", "--params", params], "no registry at"),
        "promote a version that does not exist": (["promote", "99", "--params", with_registry], "has no version 99"),
        "rollback with nothing before": (["rollback", "--params", with_registry], "no champion to roll back from"),
    }


def run_case(args: list[str], words: str, cwd: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([MTL, *args], capture_output=True, text=True, cwd=cwd, timeout=300, check=False,
                          env=os.environ | {"COLUMNS": "200"})
    seconds = time.perf_counter() - started
    text = (done.stdout + done.stderr).strip()
    flat = " ".join(text.split())
    stdout_lines = len(done.stdout.strip().splitlines())
    passed = (done.returncode != 0 and "Traceback" not in text and stdout_lines <= 1 and words in flat)
    return {"seconds": round(seconds, 2), "exit": done.returncode, "stdout_lines": stdout_lines,
            "first_line": text.splitlines()[0][:160] if text else "", "pass": passed}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="mtl-cli-errors-"))
    try:
        project, registered, elsewhere = root / "project", root / "registered", root / "elsewhere"
        for directory in (project, registered, elsewhere):
            directory.mkdir()
        for directory in (project, registered):
            shutil.copy(REPO / "params.yaml", directory / "params.yaml")
        make_registry = ("import sys; from tasks_mtl.config import load_config; "
                         "from tasks_mtl.registry import list_versions; list_versions(load_config(sys.argv[1]))")
        subprocess.run([sys.executable, "-c", make_registry, str(registered / "params.yaml")], check=True,
                       capture_output=True, timeout=300)
        results = {name: run_case(args, words, elsewhere) for name, (args, words) in cases(project, registered).items()}
        slowest = max(r["seconds"] for r in results.values())
        print(json.dumps({
            "cases": results,
            "max_seconds": slowest,
            "limit_seconds": LIMIT_S,
            "all_pass": all(r["pass"] for r in results.values()),
            "all_under_limit": slowest < LIMIT_S,
            "created_elsewhere": sorted(p.name for p in elsewhere.iterdir()),
            "load_average_1min": round(os.getloadavg()[0], 2),
        }, ensure_ascii=False))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
