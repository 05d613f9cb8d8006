"""Classical peers: the baselines a user already has, trained on the same prepared splits as the model.

- classification tasks: TF-IDF over character 1-3-grams (sublinear tf, min_df 2) + logistic regression (C=4).
- token tasks: a linear-chain CRF (python-crfsuite, L-BFGS, c1=c2=0.05) over per-token features: the token,
  its neighbours at offsets -2..+2, the bigrams (-1,0), (0,1), (-2,-1), (1,2) and BOS/EOS markers.
- pair_classification (nsp) and mlm have no peer: a bag of n-grams over two joined texts says nothing about
  whether the second follows the first, and masked-LM has no classical counterpart. `peer_kind` returns None
  for them and `train_peer` refuses them.

Scores come from the project's own metric functions (`tasks_mtl.evaluate`), so a peer reports exactly the
metric names the model reports for the task. sklearn and pycrfsuite (core dependencies: the features stage
fits with them too) are imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks_mtl.config import Config, TaskConfig

CRF_ITERATIONS = 100
CRF_ITERATIONS_BY_TASK = {"pos": 60}  # 89 BIO-typed POS tags: each L-BFGS iteration costs ~4x NER's
NOT_METRICS = ("train_s", "train_rows")  # bookkeeping keys a peers.json entry holds beside the metrics
HEADLINE = ("accuracy", "f1")  # metrics compared when the gates name none for a task


@dataclass
class Peer:
    task: str
    kind: str  # "tfidf_lr" or "crf"
    model: Any  # a fitted sklearn Pipeline, or a pycrfsuite.Tagger
    labels: list[str]  # classification: class names (index = class id); crf: the tags it learned
    train_rows: int
    # crf: the model file's bytes; the Tagger reads this buffer in place and keeps no reference itself
    model_bytes: bytes | None = field(default=None, repr=False)


def peer_kind(task: TaskConfig) -> str | None:
    """The peer a task type gets, or None (pair classification, mlm)."""
    return {"classification": "tfidf_lr", "token_classification": "crf"}.get(task.type)


def token_features(tokens: list[str]) -> list[list[str]]:
    """CRF attributes per token (characters for the bundled tasks); `<s>`/`</s>` pad beyond the ends."""
    pad = ["<s>", "<s>", *tokens, "</s>", "</s>"]
    out = []
    for i in range(len(tokens)):
        m2, m1, c0, p1, p2 = pad[i:i + 5]
        feats = ["bias", f"c0={c0}", f"c-1={m1}", f"c-2={m2}", f"c+1={p1}", f"c+2={p2}",
                 f"b-1,0={m1}|{c0}", f"b0,1={c0}|{p1}", f"b-2,-1={m2}|{m1}", f"b1,2={p1}|{p2}"]
        if i == 0:
            feats.append("BOS")
        if i == len(tokens) - 1:
            feats.append("EOS")
        out.append(feats)
    return out


def train_peer(cfg: Config, task: str, max_train: int | None = None, max_iterations: int | None = None,
               model_dir: Path | str | None = None) -> Peer:
    """Fit the task's peer on its prepared train split (the first `max_train` rows when given).

    A CRF model file goes to `model_dir/<task>.crfsuite` when given (and stays), else to a temporary
    directory that is removed once the model is loaded into memory.
    """
    from tasks_mtl.data.prepare import read_split

    if task not in cfg.tasks:
        raise KeyError(f"unknown task {task!r}; configured tasks: {sorted(cfg.tasks)}")
    task_cfg = cfg.tasks[task]
    kind = peer_kind(task_cfg)
    if kind is None:
        raise ValueError(f"task {task!r} (type {task_cfg.type}) has no classical peer")
    rows = read_split(cfg, task, "train")
    if max_train is not None:
        rows = rows[:max_train]  # prepared rows are in a fixed pseudo-random order: a prefix is a sample
    if kind == "tfidf_lr":
        return _train_tfidf_lr(task, task_cfg, rows)
    iterations = max_iterations if max_iterations is not None else CRF_ITERATIONS_BY_TASK.get(
        task_cfg.bundled or task, CRF_ITERATIONS)
    return _train_crf(task, rows, iterations, model_dir)


def _train_tfidf_lr(task: str, task_cfg: TaskConfig, rows: list[dict]) -> Peer:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    labels = list(task_cfg.labels)
    gold = [labels.index(r["label"]) for r in rows]
    model = make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True, min_df=2),
        LogisticRegression(C=4, max_iter=1000),
    )
    model.fit([r["text"] for r in rows], gold)
    return Peer(task, "tfidf_lr", model, labels, len(rows))


def _train_crf(task: str, rows: list[dict], iterations: int, model_dir: Path | str | None) -> Peer:
    import pycrfsuite

    trainer = pycrfsuite.Trainer(algorithm="lbfgs", verbose=False)
    for row in rows:
        if row["tokens"]:
            trainer.append(token_features(row["tokens"]), row["tags"])
    trainer.set_params({"c1": 0.05, "c2": 0.05, "max_iterations": iterations})
    scratch = None if model_dir is not None else tempfile.mkdtemp(prefix="mtl-crf-")
    path = Path(model_dir or scratch) / f"{task}.crfsuite"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        trainer.train(os.fspath(path))
        model_bytes = path.read_bytes()
        tagger = pycrfsuite.Tagger()
        tagger.open_inmemory(model_bytes)  # reads the buffer in place: Peer.model_bytes keeps it alive
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return Peer(task, "crf", tagger, list(tagger.labels()), len(rows), model_bytes)


def predict_peer(peer: Peer, inputs: list) -> list:
    """Token lists -> tag lists (crf), or texts -> class names (tfidf_lr)."""
    if peer.kind == "crf":
        return [peer.model.tag(token_features(list(tokens))) if len(tokens) else [] for tokens in inputs]
    if not inputs:
        return []
    return [peer.labels[i] for i in peer.model.predict(list(inputs))]


def score_peer(cfg: Config, task: str, peer: Peer, split: str = "test") -> dict[str, float]:
    """The peer's metrics on a prepared split, by the functions that score the model."""
    from tasks_mtl.data.prepare import read_split
    from tasks_mtl.evaluate import classification_metrics, tagging_metrics

    task_cfg = cfg.tasks[task]
    rows = read_split(cfg, task, split)
    if peer.kind == "crf":
        pred = predict_peer(peer, [r["tokens"] for r in rows])
        return tagging_metrics(pred, [r["tags"] for r in rows], task_cfg)
    pred = [peer.labels.index(label) for label in predict_peer(peer, [r["text"] for r in rows])]
    gold = [task_cfg.labels.index(r["label"]) for r in rows]
    return classification_metrics(pred, gold, len(task_cfg.labels))


def compare_rows(model_metrics: dict[str, dict[str, float]], peer_metrics: dict[str, dict[str, float]],
                 gate_metrics: dict[str, dict[str, float]] | None = None,
                 ) -> list[tuple[str, str, float | None, float, float | None]]:
    """(task, metric, model, peer, model - peer) for every task with a peer entry.

    The metrics compared per task are the ones its gates name (`cfg.gates.thresholds`), else accuracy
    and f1; a missing model value gives model and delta None.
    """
    rows = []
    for task, peer in peer_metrics.items():
        scores = {k: v for k, v in peer.items() if k not in NOT_METRICS}
        names = [m for m in (gate_metrics or {}).get(task, {}) if m in scores]
        names = names or [m for m in HEADLINE if m in scores]
        for metric in names:
            model = (model_metrics.get(task) or {}).get(metric)
            model = None if model is None else float(model)
            rows.append((task, metric, model, float(scores[metric]),
                         None if model is None else model - float(scores[metric])))
    return rows
