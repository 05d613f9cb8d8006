"""How fast and how plainly the CLI refuses a user's mistake: issue "6 of 9" asks for an actionable one-line error
in under 2 s for each mistake it lists.

Each case runs the installed `mtl` command in a fresh temporary directory (a copy of this repository's
params.yaml in `project/`, the command started from `elsewhere/`, so nothing the command creates goes unseen)
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


def cases(project: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (arguments, words the message must contain)."""
    params = str(project / "params.yaml")
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
        "promote a version that does not exist": (["promote", "99", "--params", params], "has no version 99"),
        "rollback with nothing before": (["rollback", "--params", params], "no champion to roll back from"),
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
        project, elsewhere = root / "project", root / "elsewhere"
        project.mkdir()
        elsewhere.mkdir()
        shutil.copy(REPO / "params.yaml", project / "params.yaml")
        results = {name: run_case(args, words, elsewhere) for name, (args, words) in cases(project).items()}
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
