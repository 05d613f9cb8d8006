"""Multi-task gain (delta-m): the multi-task model against one single-task model per task, same budget.

Each single-task run keeps the stage list (steps, learning rates, freezing) but trains one task, so
its optimizer sees the same number of steps (tasks_mtl/baselines.py, shared with `mtl leaderboard`);
all share the prepared data and tokenizer. Finished
stages are reused (their done.json matches), so a rerun after an interruption only evaluates.
Prints one JSON line: {"profile", "delta_m": {task: %}, "mean_delta_m", "multi_task", "single_task", "seconds"}.

    python benchmarks/mtl_gain.py --profile quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks_mtl.baselines import gain_summary, single_task_config, single_task_metrics
from tasks_mtl.config import load_config
from tasks_mtl.data.prepare import prepare
from tasks_mtl.evaluate import evaluate
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import train_all


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--out", default="benchmarks/out/mtl_gain")
    parser.add_argument("--steps", type=int, default=None, help="steps of every stage (default: the profile's)")
    parser.add_argument("--tasks", default=None, help="comma-separated tasks to run alone (default: all)")
    args = parser.parse_args()
    started = time.perf_counter()
    out = Path(args.out).resolve()
    scale = {f"training.stages.{i}.steps": args.steps
             for i in range(len(load_config(args.params, profile=args.profile).training.stages))} if args.steps else {}
    base = load_config(args.params, profile=args.profile, overrides=scale)
    prepare(base)
    tokenize(base)

    mtl_cfg = load_config(args.params, profile=args.profile, overrides={**scale, "training.output_dir": str(out / "multi")})
    multi = evaluate(mtl_cfg, train_all(mtl_cfg))
    single = {}
    for task in args.tasks.split(",") if args.tasks else base.tasks:
        cfg = single_task_config(args.params, args.profile, scale, base, task, out / f"single-{task}")
        print(f"{task}: single-task run of {sum(s.steps or 0 for s in cfg.training.stages)} steps", file=sys.stderr,
              flush=True)
        single[task] = single_task_metrics(cfg, task, train_all(cfg))
        print(f"{task}: single {json.dumps(single[task])}; multi {json.dumps(multi[task])}", file=sys.stderr, flush=True)
    gains = gain_summary(multi, single, tuple(base.gates.lower_is_better))
    print(json.dumps({
        "profile": args.profile, "steps": [s.steps for s in base.training.stages],
        **gains,
        "multi_task": multi, "single_task": single,
        "seconds": round(time.perf_counter() - started, 1),
    }, ensure_ascii=False))


if __name__ == "__main__":
    main()
