"""What each part of the default recipe gives: train variants of the default profile for the same number
of steps on the same prepared data and score them on the test split.

Variant sets (`--set`):
- sentiment: [CLS] vs mean pooling, with and without the n-gram bag, with and without bigram embeddings
  (sentiment trained alone);
- token: ner + cws co-labelled, with and without bigram embeddings, with a CRF over both heads, with
  window features (the CRF's features read straight into the tag scores), and with both.

`--steps` sets the joint stage; the features stage of the default recipe keeps its own steps.

Prints one JSON line: {"set", "steps", "variants": {name: {"metrics": {...}, "seconds": s}}}.

    python benchmarks/ablation.py --set sentiment --steps 400
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tasks_mtl.config import load_config
from tasks_mtl.evaluate import evaluate
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import train_all

ALONE = {"sentiment": {"tasks.ner": None, "tasks.cws": None, "tasks.pos": None, "tasks.nsp": None,
                       "tasks.mlm": None},
         "token": {"tasks.sentiment": None, "tasks.pos": None, "tasks.nsp": None, "tasks.mlm": None}}
VARIANTS = {
    "sentiment": {
        "cls": {"tasks.sentiment.pooling": "cls", "tasks.sentiment.ngram_bag": 0},
        "mean": {"tasks.sentiment.pooling": "mean", "tasks.sentiment.ngram_bag": 0},
        "mean+bag": {},
        "mean+bag, no bigrams": {"encoder.bigrams": False},
    },
    "token": {
        "plain heads": {"tasks.ner.window_features": False, "tasks.cws.window_features": False,
                        "tasks.ner.crf": False, "tasks.cws.crf": False},
        "crf": {"tasks.ner.window_features": False, "tasks.cws.window_features": False},
        "window": {"tasks.ner.crf": False, "tasks.cws.crf": False},
        "window+crf": {},  # the default heads, with the features stage before the joint one
        "window+crf, no features stage": {"training.stages": [{"name": "joint", "steps": 1, "encoder_lr": 1e-3,
                                                               "head_lr": 1e-3, "warmup": 0.05}]},
        "no bigrams": {"encoder.bigrams": False},
    },
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", choices=sorted(VARIANTS), default="sentiment")
    parser.add_argument("--variants", default=None, help="comma-separated subset of the set's variants")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", default="benchmarks/out/ablation")
    args = parser.parse_args()
    out = Path(args.out).resolve() / args.set
    chosen = args.variants.split(",") if args.variants else list(VARIANTS[args.set])
    results = {}
    for name in chosen:
        where = out / name.replace(" ", "_").replace(",", "").replace("+", "_")
        variant = {**ALONE[args.set], **VARIANTS[args.set][name]}
        last = len(load_config(args.params, profile="default", overrides=variant).training.stages) - 1  # joint
        overrides = {**variant, f"training.stages.{last}.steps": args.steps,
                     "training.output_dir": str(where / "checkpoints"), "data.tokenized_dir": str(where / "tokenized")}
        cfg = load_config(args.params, profile="default", overrides=overrides)
        started = time.perf_counter()
        tokenize(cfg)
        checkpoint = train_all(cfg)
        trained = time.perf_counter() - started
        results[name] = {"metrics": evaluate(cfg, checkpoint), "train_seconds": round(trained, 1)}
        (where / "result.json").write_text(json.dumps(results[name], ensure_ascii=False))  # survives a later crash
        print(f"{name}: {json.dumps(results[name]['metrics'], ensure_ascii=False)}", file=sys.stderr, flush=True)
    print(json.dumps({"set": args.set, "steps": args.steps, "variants": results}, ensure_ascii=False))


if __name__ == "__main__":
    main()
