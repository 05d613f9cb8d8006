"""Fit a token head's window CRF by L-BFGS, as the classical peer is fitted, then hand the weights to the model.

A token head with `window_weights` is, with the encoder path at zero, a linear-chain CRF over its character
window: one weight per (window feature, tag) (`WindowTagWeights`), a bias per tag and the tag transitions.
That objective is convex, and a quasi-Newton solver over the whole train split fits it in a fraction of the
passes that minibatch Adam needs: on the bundled ner, Adam for 600 steps of 8k tokens left train F1 at 0.956
and test F1 at 0.905, where L-BFGS (crfsuite, 100 iterations, L1 = L2 = 0.05) fits train to 1.0 and reaches
test 0.959 on the very same features.

So the features stage, for a task with `lbfgs_iterations > 0`, fits that CRF with crfsuite's L-BFGS (its C
implementation: ~1 s per pass over 1.6M characters) and copies the result into the head: the attributes
are the row indices that `ngrams.window_index` gives the model (slot `s`, row `r` -> attribute `"s:r"`), so
the fitted weights land on exactly the table rows the model reads, and the head in features-only mode
scores as the fitted CRF does (a test checks it). crfsuite has no start/end transitions: the window's
[CLS]/[SEP] slots carry them, as in the model.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

import torch

from tasks_mtl.ngrams import padded_ids, window_index
from tasks_mtl.tasks.token_classification import IGNORE

logger = logging.getLogger(__name__)

BIAS = "bias"
PENALTY = {"c1": 0.05, "c2": 0.05}  # L1 and L2, the peers' setting (FINDINGS)
CHUNK = 512  # rows per window_index call


def window_attributes(model, features: list[dict], task: str) -> tuple[list[list[list[str]]], list[list[str]]]:
    """Per tokenized row of `task`: the attributes of each tagged position (the first piece of a token) and
    its tag, in the order the head's CRF sees them."""
    labels = model.task_types[task].labels
    xs, ys = [], []
    for start in range(0, len(features), CHUNK):
        rows = features[start: start + CHUNK]
        index = window_index(model.ngrams, *padded_ids(rows)).tolist()  # (B, T, 10)
        for r, slots in zip(rows, index):
            kept = [t for t, label in enumerate(r["labels"]) if label != IGNORE]
            if not kept:
                continue
            xs.append([[BIAS, *(f"{s}:{row}" for s, row in enumerate(slots[t]) if row > 0)] for t in kept])
            ys.append([labels[r["labels"][t]] for t in kept])
    return xs, ys


def fit_window_crf(model, features: list[dict], task: str, iterations: int) -> dict[str, float]:
    """Fit `task`'s window CRF on its tokenized train rows and copy it into the head (window weights, tag
    biases, transitions; start/end transitions zero). Returns timings and the number of non-zero weights."""
    import pycrfsuite

    head = model.heads[task]
    if head.lexical is None or head.crf is None:
        raise ValueError(f"task {task!r}: an L-BFGS fit needs window_weights and crf")
    if head.wide is not None:
        raise ValueError(f"task {task!r}: an L-BFGS fit gives the head its whole window; turn its "
                         "window_features off (the shared window embeddings would add untrained scores)")
    started = time.perf_counter()
    xs, ys = window_attributes(model, features, task)
    trainer = pycrfsuite.Trainer(algorithm="lbfgs", verbose=False)
    for x, y in zip(xs, ys):
        trainer.append(x, y)
    built = time.perf_counter()
    trainer.set_params({**PENALTY, "max_iterations": iterations})
    with tempfile.TemporaryDirectory(prefix="mtl-crf-") as scratch:
        path = os.path.join(scratch, f"{task}.crfsuite")
        trainer.train(path)
        tagger = pycrfsuite.Tagger()
        tagger.open(path)
        info = tagger.info()
        tagger.close()
    fitted = time.perf_counter()
    nonzero = load_crf_weights(head, info, model.task_types[task].labels)
    return {"attributes_s": round(built - started, 1), "lbfgs_s": round(fitted - built, 1),
            "weights": nonzero, "sequences": len(xs)}


@torch.no_grad()
def load_crf_weights(head, info, labels: list[str]) -> int:
    """Copy crfsuite's state features and transitions (`Tagger.info()`) into a token head."""
    tag = {name: i for i, name in enumerate(labels)}
    for table in head.lexical.slots:
        table.weight.zero_()
    head.emit.bias.zero_()
    head.crf.transitions.zero_()
    head.crf.start_transitions.zero_()
    head.crf.end_transitions.zero_()
    for (attribute, label), weight in info.state_features.items():
        if attribute == BIAS:
            head.emit.bias[tag[label]] = weight
        else:
            slot, row = attribute.split(":")
            head.lexical.slots[int(slot)].weight[int(row), tag[label]] = weight
    for (before, after), weight in info.transitions.items():
        head.crf.transitions[tag[before], tag[after]] = weight
    return len(info.state_features) + len(info.transitions)


def fit_window_crfs(cfg, model, tasks: list[str], load_features) -> dict[str, dict[str, float]]:
    """The L-BFGS fits of a features stage: every task of `tasks` with `lbfgs_iterations > 0`."""
    report = {}
    for task in tasks:
        iterations = cfg.tasks[task].lbfgs_iterations
        if iterations <= 0:
            continue
        logger.warning("task %s: fitting its window CRF by L-BFGS (%d iterations)", task, iterations)  # minutes
        report[task] = fit_window_crf(model, load_features(cfg, task), task, iterations)
        logger.warning("task %s: window CRF fitted: %s", task, report[task])
    return report

