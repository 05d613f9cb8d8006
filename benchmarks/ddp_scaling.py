"""Data-parallel scaling on this CPU: the same stage trained by 1 and by N processes under torchrun.

Each run trains one joint stage (all tasks, temperature sampling, encoder trainable) of the profile for a
fixed number of steps, in a scratch output directory, started exactly as `mtl train --nproc N` starts it
(tasks_mtl.distributed.launch; the 1-process run goes through torchrun too, so both pay the same start-up).
Batch settings are per process, so N processes see N times the tokens per step; the figure compared is
useful (non-pad) tokens per second over all processes, from the stage log (rank 0's clock, loop only).
By default the machine's cores are split evenly: 1 process x all threads against N x (cores / N).
Prints one JSON line: tokens/s of each, speedup and scaling efficiency (speedup / N).

    python benchmarks/ddp_scaling.py --profile quick --steps 80
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

from tasks_mtl.config import load_config
from tasks_mtl.data.prepare import prepare
from tasks_mtl.distributed import launch
from tasks_mtl.runlog import read_stage_log
from tasks_mtl.tokenization import tokenize


def data_dirs(args: argparse.Namespace) -> dict[str, str]:
    """Prepared and tokenized data under --workdir, so the checkout's own are left alone."""
    return {"data.prepared_dir": os.path.join(args.workdir, "prepared"),
            "data.tokenized_dir": os.path.join(args.workdir, "tokenized")}


def run(args: argparse.Namespace, nproc: int, threads: int) -> dict[str, float]:
    """Train the benchmark stage with `nproc` processes of `threads` threads; its throughput and wall time."""
    with tempfile.TemporaryDirectory() as scratch:
        stage = {"name": "bench", "steps": args.steps, "encoder_lr": 1e-4, "head_lr": 1e-3, "warmup": 0.0,
                 "weighting": args.weighting, "sampler": "temperature"}
        cfg = load_config(args.params, profile=args.profile, overrides={
            **data_dirs(args), "training.output_dir": scratch, "training.stages": [stage], "training.log_every": args.steps,
            "training.save_every": 0, "training.threads": threads, "training.device": "cpu"})
        started = time.perf_counter()
        launch(cfg, nproc)
        seconds = time.perf_counter() - started
        metrics = read_stage_log(cfg, 0)[args.steps]
    return {"processes": nproc, "threads_per_process": threads, "tokens_per_s": round(metrics["tokens_per_s"]),
            "wall_seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--weighting", default="equal")
    parser.add_argument("--workdir", default="benchmarks/out/ddp_scaling", help="its prepared and tokenized data")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores to split between processes")
    args = parser.parse_args()
    base = load_config(args.params, profile=args.profile, overrides=data_dirs(args))
    prepare(base)
    tokenize(base)
    load_before = os.getloadavg()[0]
    one = run(args, 1, args.cores)
    many = run(args, args.nproc, max(1, args.cores // args.nproc))
    speedup = many["tokens_per_s"] / one["tokens_per_s"]
    print(json.dumps({
        "benchmark": "ddp_scaling", "profile": args.profile, "steps": args.steps, "weighting": args.weighting,
        "backend": "gloo", "cores": args.cores, "load_avg_1min_before": round(load_before, 2),
        "load_avg_1min_after": round(os.getloadavg()[0], 2), "runs": [one, many],
        "tokens_per_s_1": one["tokens_per_s"], f"tokens_per_s_{args.nproc}": many["tokens_per_s"],
        "speedup": round(speedup, 3), "scaling_efficiency": round(speedup / args.nproc, 3),
        "encoder": {"layers": base.encoder.layers, "hidden": base.encoder.hidden},
    }))


if __name__ == "__main__":
    main()
