"""A sentence head's TF-IDF scores: the classical peer's linear model inside the network, fitted as the peer is.

`TfidfScores` turns a text's token ids into its char 1-, 2- and 3-gram TF-IDF vector (sublinear tf `1 + ln tf`,
smooth idf `ln((1 + N) / (1 + df)) + 1`, L2-normalised: the peers' TF-IDF) and scores it with one weight per
(n-gram, class) plus a bias per class, added to the head's logits. N-grams are keyed as everywhere else:
unigrams by token id, longer ones by their row in the model's n-gram tables (unknown ones left out).

`fit_tfidf` fits those weights the way the peer is fitted: logistic regression (L2, C = 4, L-BFGS to
convergence) over the tokenized train split, on exactly the vectors the layer computes (a test checks that
the layer's scores equal the regression's decision function). For a two-class task with `tfidf_nb` (the
default) each column is first scaled by its naive-Bayes log-count ratio, `r = ln((p / |p|1) / (q / |q|1))`
with `p`, `q` one plus the number of positive and negative train texts holding the n-gram (the NBSVM features of
Wang and Manning, 2012, with logistic regression on top); a column's ratio then folds into its fitted weights,
so the layer itself is unchanged. On the bundled reviews, same split and C: validation
0.850 and test 0.865, against 0.837 and 0.860 for plain TF-IDF (C from 0.5 to 16 and 1-4-grams were tried;
C = 4 and 1-3-grams are best on validation). The features stage does this before its SGD
loop; later stages keep the fitted weights (`tfidf_tune` lets SGD move them), so the encoder's pooled vector
adds to a head that starts, and stays, where the peer ends: in the full run of 2026-12-01 the joint stage's SGD
had moved them from validation 0.851 / test 0.863 (the fit alone) to 0.848 / 0.860. On the bundled reviews, minibatch training of an n-gram bag stopped at
test accuracy 0.845, below the peer's 0.860 on the same split.

`choose_own_weight` runs when the last stage ends (`tfidf_select`, the default): the head's logits are the TF-IDF
scores plus `own_weight` times its own logits, and that weight is set to the one of `OWN_WEIGHTS` with the best
validation accuracy (the largest among ties, so an undecided choice leaves the trained sum alone). In the default
run of 2026-12-01 the encoder's own logits scored at chance on their own (0.49) and cost the sum 0.004 on validation
and 0.005 on test: 0.850 and 0.858 with them, 0.853 and 0.863 without.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch import nn

from tasks_mtl.ngrams import NgramTables, padded_ids

logger = logging.getLogger(__name__)

C = 4.0  # inverse L2 strength, as the peer (tasks_mtl/peers.py)
CHUNK = 512
OWN_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # what `choose_own_weight` tries for the head's own logits


def tfidf_terms(tables: NgramTables, vocab: int, ids: torch.Tensor, mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask -> (text, column, tf) of every distinct n-gram of each text: columns are the token id
    for unigrams, then `vocab + row` for bigrams and `vocab + bigram rows + row` for trigrams. Grouped by order,
    each sorted by (text, column). The counting runs in numpy on the CPU (one sentence: 100 us against 150 with
    torch's per-call costs); the tensors come back on `ids`' device. On a GPU that copies the (B, T) ids and mask
    to the host and the terms back: counting there instead would wait for the host just the same, since the
    number of terms (boolean indexing, `unique`) must reach the host before their tensors exist."""
    real = mask.bool().cpu().numpy()
    texts, columns, counts = [], [], []
    offset = 0
    for n, size in ((1, vocab), (2, tables.size(2)), (3, tables.size(3))):
        rows = (ids.long() if n == 1 else tables.lookup(ids, n)).cpu().numpy()
        keep = real & (rows > 0) if n > 1 else real  # an unknown n-gram (row 0) has no column
        unique, tf = np.unique(np.nonzero(keep)[0] * size + rows[keep], return_counts=True)
        texts.append(unique // size)
        columns.append(unique % size + offset)
        counts.append(tf)
        offset += size
    return tuple(torch.from_numpy(np.concatenate(parts)).to(ids.device) for parts in (texts, columns, counts))


def tfidf_width(tables: NgramTables, vocab: int) -> int:
    return vocab + tables.size(2) + tables.size(3)


class TfidfScores(nn.Module):
    """(B, T) ids, mask -> (B, C) class scores of the texts' TF-IDF vectors (zero until fitted)."""

    def __init__(self, tables: NgramTables, vocab: int, num_labels: int):
        super().__init__()
        self.tables = [tables]  # a list: the tables belong to the model, not to this head
        self.vocab = vocab
        width = tfidf_width(tables, vocab)
        self.weight = nn.Embedding(width, num_labels, sparse=True)
        self.bias = nn.Parameter(torch.zeros(num_labels))
        self.register_buffer("idf", torch.ones(width))  # saved with the head: the fit's document frequencies
        with torch.no_grad():
            self.weight.weight.zero_()

    def vectors(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(text, column, value) of the L2-normalised TF-IDF vectors."""
        text, column, tf = tfidf_terms(self.tables[0], self.vocab, ids, mask)
        value = (1.0 + torch.log(tf.float())) * self.idf[column]
        norm = torch.zeros(ids.shape[0], device=ids.device).index_add_(0, text, value * value).sqrt()
        return text, column, value / norm.clamp(min=1e-12)[text]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        text, column, value = self.vectors(ids, mask)
        scores = torch.zeros(ids.shape[0], self.bias.numel(), device=ids.device)
        return scores.index_add_(0, text, value[:, None] * self.weight(column)) + self.bias


def design_matrix(scores: TfidfScores, rows: list[dict]):
    """The tokenized rows' TF-IDF vectors as a scipy CSR matrix (what the layer computes for them)."""
    from scipy.sparse import csr_matrix

    text, column, value = [], [], []
    with torch.no_grad():
        for start in range(0, len(rows), CHUNK):
            t, c, v = scores.vectors(*padded_ids(rows[start: start + CHUNK]))
            text.append(t + start)
            column.append(c)
            value.append(v)
    return csr_matrix((torch.cat(value).numpy(), (torch.cat(text).numpy(), torch.cat(column).numpy())),
                      shape=(len(rows), scores.weight.num_embeddings))


def nb_ratio(x, y: np.ndarray) -> np.ndarray:
    """Naive-Bayes log-count ratio of each column of `x` (texts x columns) for labels `y` in {0, 1}: presence
    counts with add-one smoothing, normalised over the columns some text holds; 1 for columns no text holds."""
    present = (x > 0).astype(np.float64).tocsc()
    seen = np.asarray(present.sum(axis=0)).ravel() > 0
    p = 1.0 + np.asarray(present[y == 1].sum(axis=0)).ravel()
    q = 1.0 + np.asarray(present[y == 0].sum(axis=0)).ravel()
    ratio = np.ones(x.shape[1])
    ratio[seen] = np.log(p[seen] / p[seen].sum()) - np.log(q[seen] / q[seen].sum())
    return ratio


@torch.no_grad()
def fit_tfidf(model, features: list[dict], task: str, nb: bool = True) -> dict[str, float]:
    """Set the idf (and, for two classes with `nb`, the naive-Bayes ratios) from the train rows, fit logistic
    regression on their scaled TF-IDF vectors and copy its weights into the head's `TfidfScores`."""
    from scipy.sparse import diags
    from sklearn.linear_model import LogisticRegression

    scores: TfidfScores = model.heads[task].tfidf
    started = time.perf_counter()
    scores.idf.fill_(1.0)
    _, column = design_matrix(scores, features).nonzero()
    df = np.bincount(column, minlength=scores.idf.numel())
    scores.idf.copy_(torch.from_numpy(np.log((1 + len(features)) / (1 + df)) + 1.0).float())
    x = design_matrix(scores, features)
    y = np.array([r["labels"] for r in features])
    nb = nb and scores.bias.numel() == 2  # the ratio contrasts two classes
    ratio = nb_ratio(x, y) if nb else np.ones(x.shape[1])
    x = x @ diags(ratio)
    regression = LogisticRegression(C=C, max_iter=1000).fit(x, y)
    coef = torch.from_numpy(regression.coef_ * ratio).float()  # (1, F) for two classes: the score of class 1;
    #                                          the ratio scales a column's value, so it folds into its weight
    intercept = torch.from_numpy(regression.intercept_).float()
    scores.weight.weight.zero_()
    scores.bias.zero_()
    if coef.shape[0] == 1:
        scores.weight.weight[:, 1] = coef[0]
        scores.bias[1] = intercept[0]
    else:
        scores.weight.weight.copy_(coef.T)
        scores.bias.copy_(intercept)
    return {"seconds": round(time.perf_counter() - started, 1), "texts": len(features),
            "columns": int((df > 0).sum()), "nb_ratio": nb, "train_accuracy": round(float(regression.score(x, y)), 4)}


@torch.no_grad()
def choose_own_weight(model, task: str, rows: list[dict], batch_size: int = 64) -> dict:
    """Set the head's `own_weight` to the one of `OWN_WEIGHTS` whose sum `tfidf + w * own` is most accurate on
    `rows` (tokenized validation rows: input_ids, labels); the largest among ties. Returns each weight's accuracy."""
    from tasks_mtl.sampling import length_batches

    head = model.heads[task]
    device = head.own_weight.device
    was_training = model.training
    model.eval()
    lengths = np.array([len(r["input_ids"]) for r in rows])
    order = np.argsort(lengths, kind="stable")
    owns, scores, labels = [], [], []
    for batch_rows in length_batches(order, lengths, batch_size):
        chunk = [rows[i] for i in batch_rows]
        ids, mask = padded_ids(chunk)
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        own, tfidf = head.parts(model.task_hidden(task, batch), model.with_window([task], batch))
        owns.append(own.float())
        scores.append(tfidf.float())
        labels += [r["labels"] for r in chunk]
    model.train(was_training)
    own, tfidf, gold = torch.cat(owns), torch.cat(scores), torch.tensor(labels, device=device)
    accuracy = {w: round(float(((tfidf + w * own).argmax(-1) == gold).float().mean()), 4) for w in OWN_WEIGHTS}
    best = max(OWN_WEIGHTS, key=lambda w: (accuracy[w], w))
    head.own_weight.fill_(best)
    return {"own_weight": best, "validation_accuracy": accuracy, "texts": len(rows)}


def choose_own_weights(cfg, model, tokenizer) -> dict[str, dict]:
    """`choose_own_weight` for every task of the model with `tfidf` and `tfidf_select` that a stage of the run
    trains (a single-task run leaves the others' heads as they are), on its prepared validation split (tokenized
    here: only train is cached)."""
    from tasks_mtl.data.prepare import read_split
    from tasks_mtl.tasks import build_task

    trained = cfg.trained_tasks()
    report = {}
    for task, task_cfg in model.task_cfgs.items():
        if not (task_cfg.tfidf and task_cfg.tfidf_select) or task not in trained:
            continue
        records = read_split(cfg, task, "validation")
        encoded = build_task(task, task_cfg).encode({"text": [r["text"] for r in records],
                                                     "label": [r["label"] for r in records]},
                                                    tokenizer, cfg.encoder.max_length)
        rows = [{"input_ids": i, "labels": y} for i, y in zip(encoded["input_ids"], encoded["labels"])]
        report[task] = choose_own_weight(model, task, rows)
        logger.warning("task %s: weight of the encoder's own logits beside the TF-IDF scores, chosen on "
                       "validation: %s", task, report[task])
    return report


def fit_tfidf_heads(cfg, model, tasks: list[str], load_features) -> dict[str, dict[str, float]]:
    """The regression fits of a features stage: every task of `tasks` with `tfidf`."""
    report = {}
    for task in tasks:
        if cfg.tasks[task].tfidf:
            report[task] = fit_tfidf(model, load_features(cfg, task), task, nb=cfg.tasks[task].tfidf_nb)
            logger.warning("task %s: TF-IDF scores fitted by logistic regression: %s", task, report[task])
    return report
