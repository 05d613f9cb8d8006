"""TF-IDF scores of a sentence head (tasks_mtl.tfidf): the layer computes the vectors the regression was fitted
on, its scores equal the regression's decision function, and the features stage fits it instead of stepping it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tiny_project import make_tiny_project

STAGES = [
    {"name": "features", "features_only": True, "steps": 3, "head_lr": 5e-3},
    {"name": "joint", "tasks": ["sentiment", "nsp"], "steps": 4, "sampler": "round_robin", "encoder_lr": 1e-3,
     "head_lr": 1e-3},
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    from tasks_mtl.checkpoint import load_checkpoint
    from tasks_mtl.tokenization import tokenize
    from tasks_mtl.train import train_stage

    cfg = make_tiny_project(tmp_path_factory.mktemp("tfidf"), {
        "tasks": {"sentiment": {"tfidf": True}, "nsp": {"ngram_bag": 8}},
        "training": {"stages": STAGES},
    })
    tokenize(cfg)
    checkpoint = train_stage(cfg, 0)
    model, _, _ = load_checkpoint(checkpoint, cfg.tasks)
    return cfg, checkpoint, model


def test_the_vector_is_sublinear_tf_times_smooth_idf_l2_normalised(fitted):
    """One text by hand: its unigram columns carry (1 + ln tf) * idf, and the vector has unit length."""
    from tasks_mtl.train import load_features

    cfg, _, model = fitted
    scores = model.heads["sentiment"].tfidf
    rows = load_features(cfg, "sentiment")
    ids = torch.tensor([rows[0]["input_ids"]])
    text, column, value = scores.vectors(ids, torch.ones_like(ids))
    assert torch.allclose((value ** 2).sum(), torch.tensor(1.0), atol=1e-5)
    documents = [set(r["input_ids"]) for r in rows]
    raw = {}
    for token in set(rows[0]["input_ids"]):
        df = sum(token in d for d in documents)
        tf = rows[0]["input_ids"].count(token)
        raw[token] = (1 + math.log(tf)) * (math.log((1 + len(rows)) / (1 + df)) + 1)
    unigram = column < scores.vocab
    got = {int(c): float(v) for c, v in zip(column[unigram], value[unigram])}
    first = int(column[unigram][0])
    assert set(got) == set(raw)  # the layer's vector is normalised: compare ratios to the first unigram
    for token, v in got.items():
        assert v / got[first] == pytest.approx(raw[token] / raw[first], rel=1e-4)


def test_the_layer_scores_as_the_fitted_regression(fitted):
    """The default fit (two classes, `tfidf_nb`) is logistic regression on the TF-IDF vectors scaled by their
    naive-Bayes ratios; the layer, fed unscaled vectors, gives the same decision function."""
    from scipy.sparse import diags
    from sklearn.linear_model import LogisticRegression

    from tasks_mtl.tfidf import C, design_matrix, nb_ratio
    from tasks_mtl.train import load_features

    cfg, _, model = fitted
    assert cfg.tasks["sentiment"].tfidf_nb
    scores = model.heads["sentiment"].tfidf
    rows = load_features(cfg, "sentiment")
    x = design_matrix(scores, rows)
    y = np.array([r["labels"] for r in rows])
    x = x @ diags(nb_ratio(x, y))
    regression = LogisticRegression(C=C, max_iter=1000).fit(x, y)
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["input_ids"]) for r in rows], batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r["input_ids"]), dtype=torch.long) for r in rows],
                                           batch_first=True)
    with torch.no_grad():
        out = scores(ids, mask)
    margin = (out[:, 1] - out[:, 0]).numpy()
    assert np.abs(regression.decision_function(x)).max() > 0.5  # the fit says something
    np.testing.assert_allclose(margin, regression.decision_function(x), rtol=1e-4, atol=1e-4)


def test_nb_ratio_is_the_smoothed_log_ratio_of_presence_rates():
    """Column 0 is in both positive texts, column 1 in the one negative text, column 2 in one of each, column 3 in
    none: with add-one counts p = (3, 1, 2) and q = (1, 2, 2) over the seen columns, r = ln(p/6) - ln(q/5)."""
    from scipy.sparse import csr_matrix

    from tasks_mtl.tfidf import nb_ratio

    x = csr_matrix(np.array([[0.5, 0.0, 0.3, 0.0], [0.2, 0.0, 0.0, 0.0], [0.0, 0.9, 0.4, 0.0]]))
    y = np.array([1, 1, 0])
    expected = [math.log(3 / 6) - math.log(1 / 5), math.log(1 / 6) - math.log(2 / 5),
                math.log(2 / 6) - math.log(2 / 5), 1.0]
    np.testing.assert_allclose(nb_ratio(x, y), expected)


def test_without_nb_the_fit_is_the_plain_regression(fitted):
    from sklearn.linear_model import LogisticRegression

    from tasks_mtl.tfidf import C, design_matrix, fit_tfidf
    from tasks_mtl.train import load_features

    cfg, _, model = fitted
    scores = model.heads["sentiment"].tfidf
    rows = load_features(cfg, "sentiment")
    saved = {k: v.clone() for k, v in scores.state_dict().items()}
    try:
        report = fit_tfidf(model, rows, "sentiment", nb=False)
        assert report["nb_ratio"] is False
        x = design_matrix(scores, rows)
        regression = LogisticRegression(C=C, max_iter=1000).fit(x, np.array([r["labels"] for r in rows]))
        np.testing.assert_allclose(scores.weight.weight[:, 1].detach().numpy(), regression.coef_[0], rtol=1e-4, atol=1e-5)
        nb = fit_tfidf(model, rows, "sentiment", nb=True)
        assert nb["nb_ratio"] is True
        assert not np.allclose(scores.weight.weight[:, 1].detach().numpy(), regression.coef_[0], atol=1e-3)
    finally:
        scores.load_state_dict(saved)


def test_the_stage_fits_sentiment_and_steps_the_rest(fitted):
    from tasks_mtl.runlog import read_logs

    cfg, checkpoint, model = fitted
    losses = {metric for _, _, metric, _ in read_logs(cfg) if metric.startswith("loss/")}
    assert "loss/sentiment" not in losses and "loss/nsp" in losses
    assert float(model.heads["sentiment"].tfidf.weight.weight.detach().abs().sum()) > 0
    assert float(model.heads["sentiment"].tfidf.idf.max()) > 1.0  # the fit's idf was saved with the head


def test_tfidf_belongs_to_single_text_classification():
    from pydantic import ValidationError

    from tasks_mtl.config import TaskConfig

    with pytest.raises(ValidationError, match="tfidf"):
        TaskConfig(type="pair_classification", bundled="nsp", labels=["a", "b"], pooling="pair", tfidf=True)


@pytest.mark.parametrize("encoder_loss", [True, False])
def test_the_encoder_learns_from_its_own_logits_beside_the_fitted_scores(fitted, encoder_loss):
    """With a fitted regression the summed logits already fit the train rows; `encoder_loss` adds the cross-entropy
    of the encoder's own logits, so its classifier gets a whole gradient, not the small residual of the sum."""
    from tasks_mtl.tasks import build_task
    from tasks_mtl.train import load_features

    cfg, _, model = fitted
    head = model.heads["sentiment"]
    task = build_task("sentiment", cfg.tasks["sentiment"].model_copy(update={"encoder_loss": encoder_loss}))
    rows = load_features(cfg, "sentiment")[:16]
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["input_ids"]) for r in rows], batch_first=True)
    mask = (ids != 0).long()
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
             "labels": torch.tensor([r["labels"] for r in rows])}
    hidden = torch.randn(ids.shape[0], ids.shape[1], model.bert.config.hidden_size)
    head.eval()
    own, scores = head.parts(hidden, batch)
    loss, logits = task.loss(head, hidden, batch)
    summed = torch.nn.functional.cross_entropy(own + scores, batch["labels"])
    torch.testing.assert_close(logits, own + scores)
    alone = torch.nn.functional.cross_entropy(own, batch["labels"])
    torch.testing.assert_close(loss, summed + alone if encoder_loss else summed)
    loss.backward()
    assert head.classify.weight.grad.norm() > 0


def forward_accuracy(model, rows: list[dict], weight: float) -> float:
    """Accuracy of the head's forward pass (what prediction runs) with `own_weight` set to `weight`."""
    from tasks_mtl.ngrams import padded_ids

    head = model.heads["sentiment"]
    saved = float(head.own_weight)
    head.own_weight.fill_(weight)
    model.eval()
    with torch.no_grad():
        ids, mask = padded_ids(rows)
        logits = model.logits("sentiment", {"input_ids": ids, "attention_mask": mask})
    head.own_weight.fill_(saved)
    return float((logits.argmax(-1) == torch.tensor([r["labels"] for r in rows])).float().mean())


@pytest.fixture
def own_logits_state(fitted):
    """Restores the sentiment head's classifier and own_weight after a test that rewrites them."""
    _, _, model = fitted
    head = model.heads["sentiment"]
    saved = {k: v.clone() for k, v in head.classify.state_dict().items()}, head.own_weight.clone()
    yield model
    head.classify.load_state_dict(saved[0])
    head.own_weight.copy_(saved[1])
    model.train()


def test_choose_own_weight_drops_own_logits_that_mislead(fitted, own_logits_state):
    """Texts labelled with the TF-IDF scores' own answers, and own logits that always push the other class than
    the first text's: the sum is right everywhere only without them, so the weight chosen is 0; each weight's
    accuracy is the head's forward pass at that weight."""
    from tasks_mtl.ngrams import padded_ids
    from tasks_mtl.tfidf import OWN_WEIGHTS, choose_own_weight
    from tasks_mtl.train import load_features

    cfg, _, model = fitted
    head = model.heads["sentiment"]
    rows = load_features(cfg, "sentiment")
    with torch.no_grad():
        tfidf = head.tfidf(*padded_ids(rows))
    rows = [r | {"labels": int(label)} for r, label in zip(rows, tfidf.argmax(-1))]
    pushed = 1 - rows[0]["labels"]
    with torch.no_grad():
        head.classify.weight.zero_()
        head.classify.bias.fill_(0.0)
        head.classify.bias[pushed] = 50.0
    model.train()
    report = choose_own_weight(model, "sentiment", rows, batch_size=7)
    assert model.training  # the model is left in the mode it came in
    assert report["own_weight"] == 0.0 and float(head.own_weight) == 0.0
    assert report["validation_accuracy"][0.0] == 1.0
    assert report["validation_accuracy"][1.0] < 1.0
    for weight in OWN_WEIGHTS:
        assert report["validation_accuracy"][weight] == pytest.approx(forward_accuracy(model, rows, weight), abs=1e-4)


def test_choose_own_weight_keeps_the_trained_sum_on_a_tie(fitted, own_logits_state):
    """Own logits of zero change nothing: every weight ties, and the largest (1, the sum as trained) is kept."""
    from tasks_mtl.tfidf import choose_own_weight
    from tasks_mtl.train import load_features

    cfg, _, model = fitted
    head = model.heads["sentiment"]
    with torch.no_grad():
        head.classify.weight.zero_()
        head.classify.bias.zero_()
        head.own_weight.fill_(0.5)
    report = choose_own_weight(model, "sentiment", load_features(cfg, "sentiment"))
    assert len(set(report["validation_accuracy"].values())) == 1
    assert report["own_weight"] == 1.0 and float(head.own_weight) == 1.0


def test_the_last_stage_chooses_the_weight_on_validation_and_saves_it(fitted):
    """Stage 0 is not the last: its head keeps weight 1. The last stage's done.json holds the choice over the
    validation split, and its checkpoint carries the chosen weight."""
    import json

    from tasks_mtl.checkpoint import load_checkpoint
    from tasks_mtl.tfidf import OWN_WEIGHTS
    from tasks_mtl.train import train_stage

    cfg, first, model = fitted
    assert float(model.heads["sentiment"].own_weight) == 1.0
    assert "own_weight" not in json.loads((first / "done.json").read_text())
    last = train_stage(cfg, 1)
    chosen = json.loads((last / "done.json").read_text())["own_weight"]["sentiment"]
    accuracy = {float(w): a for w, a in chosen["validation_accuracy"].items()}
    assert set(accuracy) == set(OWN_WEIGHTS) and chosen["texts"] == 8  # the tiny project's validation rows
    assert chosen["own_weight"] == max(OWN_WEIGHTS, key=lambda w: (accuracy[w], w))
    trained, _, _ = load_checkpoint(last, cfg.tasks)
    assert float(trained.heads["sentiment"].own_weight) == chosen["own_weight"]
    fitted_scores, tuned_scores = model.heads["sentiment"].tfidf, trained.heads["sentiment"].tfidf
    assert torch.equal(fitted_scores.weight.weight, tuned_scores.weight.weight)  # no tfidf_tune: kept as fitted
    assert torch.equal(fitted_scores.bias, tuned_scores.bias)


def test_tfidf_tune_lets_sgd_move_the_fitted_weights(fitted):
    """`freeze` leaves the TF-IDF weights out of training by default and in with `tfidf_tune`; the rest of the
    head trains either way."""
    cfg, _, model = fitted
    head = model.heads["sentiment"]
    try:
        model.freeze("none")
        assert not any(p.requires_grad for p in head.tfidf.parameters())
        assert all(p.requires_grad for p in head.classify.parameters())
        assert all(id(p) not in {id(q) for q in model.private_parameters()} for p in head.tfidf.parameters())
        model.task_cfgs["sentiment"] = cfg.tasks["sentiment"].model_copy(update={"tfidf_tune": True})
        model.freeze("none")
        assert all(p.requires_grad for p in head.tfidf.parameters())
    finally:
        model.task_cfgs["sentiment"] = cfg.tasks["sentiment"]


def test_a_checkpoint_from_before_own_weight_loads_with_weight_one(fitted, tmp_path):
    """heads.safetensors without the buffer (and no manifest, as older checkpoints): it loads, weight 1."""
    import shutil

    from safetensors.torch import load_file, save_file

    from tasks_mtl.checkpoint import load_checkpoint

    cfg, checkpoint, _ = fitted
    old = tmp_path / "old"
    shutil.copytree(checkpoint, old)
    (old / "manifest.json").unlink()
    heads = load_file(str(old / "heads.safetensors"))
    del heads["heads.sentiment.own_weight"]
    save_file(heads, str(old / "heads.safetensors"))
    model, _, _ = load_checkpoint(old, cfg.tasks)
    assert float(model.heads["sentiment"].own_weight) == 1.0
    heads.pop("heads.sentiment.tfidf.bias")  # any other missing weight still refuses to load
    save_file(heads, str(old / "heads.safetensors"))
    with pytest.raises(ValueError, match="tfidf.bias is not in the checkpoint"):
        load_checkpoint(old, cfg.tasks)


def test_a_run_that_never_trains_sentiment_leaves_its_weight_alone(fitted):
    """A single-task run (the leaderboard's baselines) has every head but trains one task: the validation pass
    that picks `own_weight` runs for trained tasks only."""
    from tasks_mtl.tfidf import choose_own_weights

    cfg, _, model = fitted
    head = model.heads["sentiment"]
    head.own_weight.fill_(0.25)
    only_nsp = cfg.model_copy(update={"training": cfg.training.model_copy(
        update={"stages": [cfg.training.stages[1].model_copy(update={"tasks": ["nsp"]})]})})
    try:
        assert choose_own_weights(only_nsp, model, None) == {}  # nothing read, nothing tokenized
        assert float(head.own_weight) == 0.25
        assert set(choose_own_weights(cfg, model, load_tokenizer_of(cfg))) == {"sentiment"}
    finally:
        head.own_weight.fill_(1.0)


def load_tokenizer_of(cfg):
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

    return load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)


def test_terms_count_each_texts_known_ngrams_once_per_column_and_ignore_padding():
    from collections import Counter

    from tasks_mtl.ngrams import NgramTables
    from tasks_mtl.tfidf import tfidf_terms

    vocab = 10
    tables = NgramTables.build([[1, 2, 3, 1, 2], [2, 3, 4]], vocab=vocab, min_count=1)
    ids = torch.tensor([[1, 2, 3, 1, 2, 9], [2, 3, 4, 0, 0, 0], [5, 6, 0, 0, 0, 0]])  # 9 makes unknown n-grams
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    text, column, tf = tfidf_terms(tables, vocab, ids, mask)
    bigrams, trigrams = tables.keys2.tolist(), tables.keys3.tolist()
    expected = Counter()
    for row, length in enumerate(mask.sum(1).tolist()):
        tokens = ids[row, :length].tolist()
        for t, token in enumerate(tokens):
            expected[row, token] += 1
            if t >= 1 and (key := tokens[t - 1] * vocab + token) in bigrams:
                expected[row, vocab + 1 + bigrams.index(key)] += 1
            if t >= 2 and (key := (tokens[t - 2] * vocab + tokens[t - 1]) * vocab + token) in trigrams:
                expected[row, vocab + tables.size(2) + 1 + trigrams.index(key)] += 1
    got = {(int(r), int(c)): int(n) for r, c, n in zip(text, column, tf)}
    assert got == dict(expected)
    assert (2, 0) not in got and (1, 0) not in got  # padding (id 0) counts nowhere
    assert got[0, 1] == 2 and got[0, vocab + 1 + bigrams.index(12)] == 2  # "1 2" twice in the first text
    order = [(c >= vocab) + (c >= vocab + tables.size(2)) for c in column.tolist()]
    assert order == sorted(order)  # unigrams, then bigrams, then trigrams
