"""Per-task evaluation on a prepared split, through the same code path as prediction.

Metrics: classification and pairs -> accuracy, macro_f1; token tasks -> accuracy (per token) and
span precision/recall/F1 by seqeval (entity F1 for NER, word F1 for segmentation, joint word+tag
F1 for POS; F1 per type when a task has at most 10 types); MLM -> masked-token accuracy and
perplexity. `multi_task_gain` compares against single-task runs (delta-m).

Determinism: rows are scored in a fixed order (sorted by length, stably) and fixed batches of
`training.eval_batch_size`, and each MLM text gets masks seeded by the run's seed and the text itself,
so the same checkpoint and data score the same in any process (tests/model/test_reliability.py).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from tasks_mtl.config import SPLITS, Config, TaskConfig
from tasks_mtl.fingerprint import files_hash, fingerprint
from tasks_mtl.predict import Predictor
from tasks_mtl.spans import lenient_spans

PER_TYPE_LIMIT = 10  # report F1 per type only for tasks with few types (NER, not the 44 POS tags)
SCORE_CACHE_ENTRIES = 16  # keys kept in reports/champion_scores.json: a few models x data versions


def classification_metrics(pred: list[int], gold: list[int], num_labels: int) -> dict[str, float]:
    from sklearn.metrics import f1_score

    return {
        "accuracy": float(np.mean(np.asarray(pred) == np.asarray(gold))) if gold else 0.0,
        "macro_f1": float(f1_score(gold, pred, labels=list(range(num_labels)), average="macro", zero_division=0)),
    }


def _iob2(tags: list[str], scheme: str) -> list[str]:
    """Any scheme -> IOB2 strings for seqeval; untyped spans (segmentation) get the type W."""
    from tasks_mtl.data.tagging import spans_to_tags

    spans = [(start, end, kind or "W") for start, end, kind in lenient_spans(tags, scheme)]
    return spans_to_tags(spans, len(tags), "bio", typed=True)


def tagging_metrics(pred: list[list[str]], gold: list[list[str]], cfg: TaskConfig) -> dict[str, float]:
    from seqeval.metrics import classification_report

    flat_pred = [t for seq in pred for t in seq]
    flat_gold = [t for seq in gold for t in seq]
    ref = [_iob2(g, cfg.scheme) for g in gold]
    hyp = [_iob2(p, cfg.scheme) for p in pred]
    report = classification_report(ref, hyp, output_dict=True, zero_division=0)
    micro = report["micro avg"]
    metrics = {
        "accuracy": float(np.mean(np.asarray(flat_pred) == np.asarray(flat_gold))) if flat_gold else 0.0,
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
    }
    if 0 < len(cfg.labels) <= PER_TYPE_LIMIT:
        for kind in cfg.labels:
            metrics[f"f1_{kind}"] = float(report.get(kind, {}).get("f1-score", 0.0))
    return metrics


def text_seed(seed: int, text: str) -> int:
    """The masking seed of one text: from the run's seed and the text only, not from the batch it lands in."""
    return seed * 1_000_003 + int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:12], 16)


@torch.inference_mode()
def mlm_metrics(predictor: Predictor, task: str, texts: list[str], seed: int) -> dict[str, float]:
    """Masked-token accuracy and perplexity. Each text is masked on its own (`text_seed`): the same masks for
    every model with this tokenizer, whatever the batch size, the order or the other texts."""
    from torch.nn.utils.rnn import pad_sequence

    model, tokenizer = predictor.model, predictor.tokenizer
    padding = {"input_ids": tokenizer.pad_token_id, "labels": -100}  # other columns pad with 0
    total_loss, correct, count = 0.0, 0, 0
    for rows in predictor.batches_by_length([len(t) for t in texts]):  # little padding; the metrics are order-free
        chunk = [texts[i] for i in rows]
        enc = tokenizer(chunk, truncation=True, max_length=predictor.window, return_special_tokens_mask=True)
        collators = [model.task_types[task].collator(tokenizer, seed=text_seed(seed, text)) for text in chunk]
        masked = [collate([{k: enc[k][i] for k in enc}]) for i, collate in enumerate(collators)]  # (1, L_i)
        batch = {k: pad_sequence([m[k][0] for m in masked], batch_first=True, padding_value=padding.get(k, 0))
                 .to(predictor.device) for k in masked[0]}
        if not (batch["labels"] != -100).any():
            continue
        logits, labels = model.task_types[task].masked_logits(model.heads[task], predictor.hidden([task], batch)[task], batch)
        logits = logits.float()  # (M, V)
        total_loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(-1) == labels).sum())
        count += int(labels.numel())
    if count == 0:
        return {"accuracy": 0.0, "perplexity": float("inf")}
    return {"accuracy": correct / count, "perplexity": math.exp(min(total_loss / count, 50.0))}


def evaluate(cfg: Config, checkpoint_dir: Path, split: str = "test", predictor: Predictor | None = None,
             confusion: dict[str, dict] | None = None) -> dict[str, dict[str, float]]:
    """task -> metric -> value for every task of the checkpoint that the run configures. A `confusion` dict
    receives, per classification task, {"labels": [...], "matrix": counts[gold][predicted]}."""
    from tasks_mtl.data.prepare import read_split

    predictor = predictor or Predictor.from_dir(checkpoint_dir, batch_size=cfg.training.eval_batch_size)
    results: dict[str, dict[str, float]] = {}
    for name, task in predictor.tasks.items():
        if name not in cfg.tasks:
            continue
        rows = read_split(cfg, name, split)
        if task.type in ("classification", "pair_classification"):
            texts = [r["text"] for r in rows]
            pairs = [r["text_pair"] for r in rows] if task.type == "pair_classification" else None
            pred = predictor.class_probs(name, texts, pairs).argmax(-1).tolist()
            gold = [task.labels.index(r["label"]) for r in rows]
            results[name] = classification_metrics(pred, gold, len(task.labels))
            if confusion is not None:
                counts = np.zeros((len(task.labels), len(task.labels)), dtype=int)
                np.add.at(counts, (gold, pred), 1)
                confusion[name] = {"labels": list(task.labels), "matrix": counts.tolist()}
        elif task.type == "token_classification":
            pred_tags = predictor.token_tags(name, [r["tokens"] for r in rows])
            results[name] = tagging_metrics(pred_tags, [r["tags"] for r in rows], task)
        elif task.type == "mlm":
            results[name] = mlm_metrics(predictor, name, [r["text"] for r in rows], cfg.seed)
    return results


def final_checkpoint(cfg: Config) -> Path:
    from tasks_mtl.runlog import stage_dir

    return stage_dir(cfg, len(cfg.training.stages) - 1)


def report_path(cfg: Config, split: str) -> Path:
    """reports/metrics.json for the test split (the DVC metric the gates read), metrics_<split>.json else."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return cfg.path(cfg.reports_dir) / ("metrics.json" if split == "test" else f"metrics_{split}.json")


def confusion_path(cfg: Config, split: str) -> Path:
    """reports/confusion.json (test split) or confusion_<split>.json: the classification tasks' counts."""
    metrics = report_path(cfg, split)
    return metrics.with_name(metrics.name.replace("metrics", "confusion", 1))


def evaluate_to_report(cfg: Config, checkpoint: Path | None = None, split: str = "test") -> dict:
    """Evaluate and write the split's report ({task: {metric: value}}, see `report_path`) and the
    classification tasks' confusion matrices beside it (`confusion_path`)."""
    out = report_path(cfg, split)
    confusion: dict[str, dict] = {}
    metrics = evaluate(cfg, checkpoint or final_checkpoint(cfg), split, confusion=confusion)
    out.parent.mkdir(parents=True, exist_ok=True)
    confusion_path(cfg, split).write_text(json.dumps(confusion, indent=1, ensure_ascii=False) + "\n")
    rounded = {t: {k: round(v, 6) for k, v in m.items()} for t, m in metrics.items()}
    out.write_text(json.dumps(rounded, indent=2, sort_keys=True) + "\n")
    return rounded


def scores_key(cfg: Config, model: dict, split: str = "test") -> str:
    """What a model's scores on a split depend on, as the project's one fingerprint: the model's identity
    (e.g. registry, name, version), the prepared split files of the configured tasks, the task settings, the
    seed (MLM masks) and the package source (the scoring code)."""
    prepared = cfg.path(cfg.data.prepared_dir)
    files = [prepared / name / f"{split}.jsonl" for name in sorted(cfg.tasks)]
    return fingerprint(files_hash(files, prepared), model=model, split=split, seed=cfg.seed, tasks=dict(cfg.tasks))


def cached_evaluate(cfg: Config, checkpoint_dir: Path, key: str, split: str = "test",
                    cache: Path | None = None) -> tuple[dict[str, dict[str, float]], bool]:
    """`evaluate`, remembered under `key` (`scores_key`) in reports/champion_scores.json: (metrics, True) when the
    key is there, else the checkpoint is scored and stored, (metrics, False). The file keeps the newest
    SCORE_CACHE_ENTRIES keys; an unreadable file counts as empty."""
    cache = cache or cfg.path(cfg.reports_dir) / "champion_scores.json"
    try:
        entries = json.loads(cache.read_text(encoding="utf-8")) if cache.exists() else {}
    except (OSError, ValueError):
        entries = {}
    if isinstance(entries.get(key), dict) and "metrics" in entries[key]:
        return entries[key]["metrics"], True
    metrics = evaluate(cfg, checkpoint_dir, split)
    entries[key] = {"checkpoint": str(checkpoint_dir), "split": split, "metrics": metrics}
    entries = dict(list(entries.items())[-SCORE_CACHE_ENTRIES:])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(cache.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(cache)  # whole or absent: a killed run leaves the previous file
    return metrics, False


def multi_task_gain(mtl: dict[str, dict[str, float]], single: dict[str, dict[str, float]],
                    lower_is_better: tuple[str, ...] = ("perplexity", "loss")) -> dict[str, float]:
    """Delta-m per task: mean relative change (in %) of each metric vs. a single-task run of the same budget,
    signed so that positive means the multi-task model is better (Maninis et al. 2019; Vandenhende et al. 2021)."""
    gains = {}
    for task, base in single.items():
        changes = []
        for metric, b in base.items():
            if metric not in mtl.get(task, {}) or b == 0:
                continue
            sign = -1.0 if metric in lower_is_better else 1.0
            changes.append(sign * (mtl[task][metric] - b) / abs(b))
        if changes:
            gains[task] = 100.0 * float(np.mean(changes))
    return gains
