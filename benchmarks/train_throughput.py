"""Training throughput of the multi-task loop: useful (non-pad) tokens per second over a fixed number of steps.

Runs one joint stage (all tasks, temperature sampling, encoder trainable) on the profile's
tokenized data, in a scratch output directory. Prints one JSON line.

    python benchmarks/train_throughput.py --profile default --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from tasks_mtl.config import load_config
from tasks_mtl.data.prepare import prepare
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import stage_dir, train_stage


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--weighting", default="equal")
    args = parser.parse_args()
    base = load_config(args.params, profile=args.profile)
    prepare(base)
    tokenize(base)
    with tempfile.TemporaryDirectory() as scratch:
        stage = {"name": "bench", "steps": args.steps, "encoder_lr": 1e-4, "head_lr": 1e-3, "warmup": 0.0,
                 "weighting": args.weighting, "sampler": "temperature"}
        cfg = load_config(args.params, profile=args.profile, overrides={
            "training.output_dir": scratch, "training.stages": [stage], "training.log_every": args.steps,
            "training.save_every": 0})
        started = time.perf_counter()
        train_stage(cfg, 0)
        seconds = time.perf_counter() - started
        log = (stage_dir(cfg, 0).parent / "1-bench.log.csv").read_text().splitlines()
        tokens_per_s = next(float(line.split(",")[3]) for line in log if ",tokens_per_s," in line)
    print(json.dumps({
        "benchmark": "train_throughput", "profile": args.profile, "weighting": args.weighting,
        "steps": args.steps, "batch_size": cfg.training.batch_size, "threads": torch.get_num_threads(),
        "useful_tokens_per_s": round(tokens_per_s), "stage_seconds": round(seconds, 1),
        "encoder": {"layers": cfg.encoder.layers, "hidden": cfg.encoder.hidden},
    }))


if __name__ == "__main__":
    main()
