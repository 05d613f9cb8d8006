"""NER on text from other sources than the training newspaper: hand-written sentences in review, sports,
tech and travel styles (benchmarks/data/ner_other_sources.txt), scored with the same entity F1 as the
test split. Scores a checkpoint directory and, with --peer, the character CRF trained on the bundled
train split.

Prints one JSON line: {"sentences", "model": {...}, "crf": {...}}.

    python benchmarks/ner_transfer.py --model checkpoints/1-joint [--peer]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

DATA = Path(__file__).parent / "data" / "ner_other_sources.txt"
MARKUP = re.compile(r"\[([^|\]]+)\|(PER|LOC|ORG)\]")


def read_marked(path: Path = DATA) -> list[dict]:
    """Rows {"tokens": characters, "tags": BIO} from `[text|TYPE]` markup, one sentence per line."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        tokens: list[str] = []
        tags: list[str] = []
        cursor = 0
        for match in MARKUP.finditer(line):
            plain = line[cursor:match.start()]
            tokens += list(plain)
            tags += ["O"] * len(plain)
            entity, kind = match.group(1), match.group(2)
            tokens += list(entity)
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)
            cursor = match.end()
        tokens += list(line[cursor:])
        tags += ["O"] * (len(line) - cursor)
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="a checkpoint directory")
    parser.add_argument("--peer", action="store_true", help="also train and score the character CRF")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()

    from tasks_mtl.config import load_config
    from tasks_mtl.evaluate import tagging_metrics

    cfg = load_config(args.params)
    rows = read_marked()
    gold = [r["tags"] for r in rows]
    result: dict = {"sentences": len(rows)}
    if args.model:
        from tasks_mtl.predict import Predictor

        predicted = Predictor.from_dir(args.model).token_tags("ner", [r["tokens"] for r in rows])
        result["model"] = tagging_metrics(predicted, gold, cfg.tasks["ner"])
    if args.peer:
        from tasks_mtl.peers import predict_peer, train_peer

        peer = train_peer(cfg, "ner")
        result["crf"] = tagging_metrics(predict_peer(peer, [r["tokens"] for r in rows]), gold, cfg.tasks["ner"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
