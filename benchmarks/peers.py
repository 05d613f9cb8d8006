"""Classical peers on the test split: TF-IDF+LR for classification tasks, a character CRF for token tasks
(tasks_mtl/peers.py). Trains each requested task's peer on its prepared train split, scores it with the
model's own metrics, and merges {task: {metric: value, "train_s": seconds, "train_rows": n}} into the
output JSON (other tasks' entries are kept). Tasks without a peer (nsp, mlm) are skipped with a note.

Prepares the data only when a requested task's splits are missing (or with --prepare): re-preparing
rewrites prepared/ under any run that is reading it.

Prints one JSON line: {"peers": {task: {...}}, "seconds": total}.

    python benchmarks/peers.py --tasks sentiment,ner,cws [--max-train N] [--out reports/peers.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks_mtl.config import load_config
from tasks_mtl.peers import peer_kind, score_peer, train_peer


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--profile", default="default")
    parser.add_argument("--tasks", default="sentiment,ner,cws,pos", help="comma-separated tasks")
    parser.add_argument("--max-train", type=int, default=None, help="train on the first N rows only")
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="CRF iterations (default 100, pos 60)")
    parser.add_argument("--out", default=None,
                        help="JSON file to merge into (default: <reports_dir>/peers.json)")
    parser.add_argument("--prepare", action="store_true", help="re-prepare the data even when it exists")
    args = parser.parse_args(argv)

    cfg = load_config(args.params, profile=args.profile)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in cfg.tasks]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; configured: {sorted(cfg.tasks)}")
    for task in [t for t in tasks if peer_kind(cfg.tasks[t]) is None]:
        print(f"skipping {task}: a {cfg.tasks[task].type} task has no classical peer", file=sys.stderr)
    tasks = [t for t in tasks if peer_kind(cfg.tasks[t]) is not None]

    prepared = cfg.path(cfg.data.prepared_dir)
    missing = [t for t in tasks if not all((prepared / t / f"{s}.jsonl").exists() for s in ("train", "test"))]
    if args.prepare or missing:
        from tasks_mtl.data.prepare import prepare

        prepare(cfg)

    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    for task in tasks:
        t0 = time.perf_counter()
        peer = train_peer(cfg, task, max_train=args.max_train, max_iterations=args.max_iterations)
        train_s = time.perf_counter() - t0
        metrics = score_peer(cfg, task, peer, split="test")
        results[task] = {**{k: round(v, 6) for k, v in metrics.items()},
                         "train_s": round(train_s, 1), "train_rows": peer.train_rows}

    out = Path(args.out) if args.out else cfg.path(cfg.reports_dir) / "peers.json"
    merged = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {}
    merged.update(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    line = {"peers": results, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
