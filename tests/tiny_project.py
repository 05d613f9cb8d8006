"""Shared test helpers: the repository root and a tiny multi-task project on synthetic data."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str, monkeypatch):
    """benchmarks/<name>.py as a module, its folder importable as when it runs as a script (benchmarks/host.py)."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

TINY_WORDS = ["我们", "今天", "北京", "天气", "非常", "喜欢", "这个", "手机", "质量", "朋友", "学习", "中国", "上海", "公司"]
TINY_NAMES = ["张伟", "李娜", "王芳"]
TINY_PLACES = ["北京", "上海", "广州"]


# An MLM pretraining stage first: freezing protects pretrained weights only.
TINY_STAGES = [
    {"name": "pretrain", "tasks": ["mlm"], "steps": 3, "encoder_lr": 1e-3, "head_lr": 3e-3},
    {"name": "warmup", "freeze_layers": "all", "steps": 4, "head_lr": 5e-3, "warmup": 0.0},
    {"name": "joint", "freeze_layers": 1, "steps": 6, "encoder_lr": 1e-3, "head_lr": 3e-3,
     "weighting": "uncertainty", "sampler": "temperature"},
    {"name": "full", "steps": 6, "encoder_lr": 1e-3, "head_lr": 3e-3, "sampler": "round_robin"},
]


def _tiny_rows(rng: random.Random, n: int) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {k: [] for k in ("sentiment", "ner", "cws", "nsp", "mlm")}
    for _ in range(n):
        words = rng.sample(TINY_WORDS, 4)
        name, place = rng.choice(TINY_NAMES), rng.choice(TINY_PLACES)
        positive = rng.random() < 0.5
        text = "".join(words) + ("很好" if positive else "很差")
        rows["sentiment"].append({"text": text, "label": "positive" if positive else "negative"})
        ner_words = [name, "在", place, *words[:2]]
        tags = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"] + ["O"] * sum(len(w) for w in words[:2])
        rows["ner"].append({"tokens": list("".join(ner_words)), "tags": tags})
        cws = [t for w in words for t in (["S"] if len(w) == 1 else ["B", *["M"] * (len(w) - 2), "E"])]
        rows["cws"].append({"tokens": list("".join(words)), "tags": cws})
        first, second = "".join(words[:2]), "".join(words[2:])
        is_next = rng.random() < 0.5
        rows["nsp"].append({"text": first, "text_pair": second if is_next else second[::-1] + "吗",
                            "label": "is_next" if is_next else "not_next"})
        rows["mlm"].append({"text": text})
    return rows


def make_tiny_project(root: Path, extra_params: dict | None = None):
    """Write prepared splits and a params.yaml for a 2-layer, 32-wide BERT; return the loaded Config."""
    import yaml

    from tasks_mtl.config import load_config

    rng = random.Random(7)
    for split, n in (("train", 48), ("validation", 8), ("test", 16)):
        for task, rows in _tiny_rows(rng, n).items():
            out = root / "prepared" / task / f"{split}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    params = {
        "seed": 3,
        "tasks_replace": True,
        "tasks": {
            "sentiment": {"type": "classification", "bundled": "sentiment", "labels": ["negative", "positive"]},
            "ner": {"type": "token_classification", "bundled": "ner", "labels": ["PER", "LOC", "ORG"]},
            "cws": {"type": "token_classification", "bundled": "cws", "scheme": "bmes", "layer": 1, "output": "words"},
            "nsp": {"type": "pair_classification", "bundled": "nsp", "labels": ["not_next", "is_next"]},
            "mlm": {"type": "mlm", "bundled": "mlm"},
        },
        "encoder": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 64, "vocab_size": 300,
                    "vocab_min_frequency": 1, "max_length": 32, "max_positions": 64},
        "training": {
            "batch_size": 8, "log_every": 2, "save_every": 0, "device": "cpu",
            "stages": TINY_STAGES,
        },
    }
    if extra_params:
        from tasks_mtl.config import deep_merge

        params = deep_merge(params, extra_params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return load_config(root / "params.yaml")


