"""N-gram tables and embeddings, token-budget batches, co-labelled streams and the fixed-share sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks_mtl.ngrams import (OVERLAP_SCALE, BigramEmbedding, NgramBag, NgramTables, WindowFeatures, WindowTagWeights,
                              at_offsets, ngram_keys, pair_overlap, window_index)
from tasks_mtl.sampling import BatchOrder, build_sampler, length_batches
from tasks_mtl.train import co_labelled_collator, co_labelled_groups, merge_features

IGNORE = -100


def test_ngram_keys_end_at_each_position():
    ids = torch.tensor([[1, 2, 3]])
    assert ngram_keys(ids, 2, 10).tolist() == [[-1, 12, 23]]
    assert ngram_keys(ids, 3, 10).tolist() == [[-1, -1, 123]]
    assert ngram_keys(ids, 1, 10).tolist() == [[1, 2, 3]]
    assert ngram_keys(torch.tensor([[4, 5], [6, 0]]), 3, 10).tolist() == [[-1, -1], [-1, -1]]  # shorter than n
    assert ngram_keys(torch.tensor([[4, 5, 0, 9]]), 3, 10).tolist() == [[-1, -1, 450, 509]]  # id 0 is a digit too


def test_tables_keep_ngrams_seen_often_enough_and_look_them_up():
    tables = NgramTables.build([[1, 2, 3], [1, 2, 4], [5, 6, 7]], vocab=10, min_count=2)
    assert tables.keys2.tolist() == [12]  # only (1, 2) occurs twice
    assert tables.keys3.numel() == 0
    found = tables.lookup(torch.tensor([[1, 2, 3], [2, 1, 2]]), 2)
    assert found.tolist() == [[0, 1, 0], [0, 0, 1]]  # index 0 = unknown, 1 = the first known key
    once = NgramTables.build([[1, 2, 3]], vocab=10, min_count=1)
    assert once.lookup(torch.tensor([[1, 2, 3]]), 3).tolist() == [[0, 0, 1]]


def test_tables_round_trip_through_a_file(tmp_path):
    tables = NgramTables.build([[4, 5, 6, 4, 5, 6]], vocab=8, min_count=2)
    tables.save(tmp_path)
    again = NgramTables.load(tmp_path)
    assert again.vocab == 8 and torch.equal(again.keys2, tables.keys2) and torch.equal(again.keys3, tables.keys3)
    assert NgramTables.load(tmp_path / "missing") is None


def test_bigram_embedding_sees_left_and_right_bigram_and_starts_at_zero_on_a_pretrained_encoder():
    tables = NgramTables.build([[1, 2, 3]] * 2, vocab=10, min_count=2)
    zero = BigramEmbedding(tables, dim=4, hidden=8, zero_init=True)
    assert torch.count_nonzero(zero(torch.tensor([[1, 2, 3]]))) == 0
    emb = BigramEmbedding(tables, dim=4, hidden=8, zero_init=False)
    with torch.no_grad():
        out = emb(torch.tensor([[1, 2, 3], [7, 8, 9]]))  # (2, 3, 8)
    unknown = out[1, 0]  # both bigrams unknown: the projection's bias only
    assert not torch.allclose(out[0, 1], unknown) and torch.allclose(out[1, 2], unknown)


def test_ngram_bag_ignores_padding():
    tables = NgramTables.build([[1, 2, 3, 4]] * 2, vocab=10, min_count=2)
    bag = NgramBag(tables, vocab=10, dim=6).eval()
    short = bag(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]]))
    padded = bag(torch.tensor([[1, 2, 3, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]]))
    torch.testing.assert_close(short, padded)


def test_ngram_bag_root_norm_keeps_the_weight_of_each_ngram_in_long_texts():
    tables = NgramTables.build([[1, 2, 3, 4]] * 2, vocab=10, min_count=2)
    torch.manual_seed(0)
    mean = NgramBag(tables, vocab=10, dim=6).eval()
    root = NgramBag(tables, vocab=10, dim=6, norm="sqrt").eval()
    root.load_state_dict(mean.state_dict())
    ids, mask = torch.tensor([[1, 2, 3, 4, 0]]), torch.tensor([[1, 1, 1, 1, 0]])
    count = 4 + 3 + 2  # unigrams, known bigrams (1,2) (2,3) (3,4), known trigrams (1,2,3) (2,3,4)
    torch.testing.assert_close(root(ids, mask), mean(ids, mask) * count ** 0.5)
    doubled = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4]])  # the same text twice: the mean stays, the root grows
    torch.testing.assert_close(mean(doubled, torch.ones_like(doubled)), mean(ids, mask))
    assert root(doubled, torch.ones_like(doubled)).norm() > 1.3 * root(ids, mask).norm()


def test_pair_overlap_counts_shared_ngrams_inside_each_text_only():
    # [CLS] 5 6 7 [SEP] | 6 7 8 [SEP] [PAD]: n-grams across the boundary or into padding count for neither text
    ids = torch.tensor([[1, 5, 6, 7, 2, 6, 7, 8, 2, 0]])
    mask = torch.tensor([[1] * 9 + [0]]).bool()
    second = torch.tensor([[0] * 5 + [1] * 4 + [1]]).bool() & mask
    first = mask & ~second
    got = pair_overlap(ids, first, second, vocab=10) / OVERLAP_SCALE
    expected = [3 / 20 ** 0.5, 1 / 12 ** 0.5, 0.0]  # unigrams 6, 7, [SEP]; bigram (6, 7); no shared trigram
    torch.testing.assert_close(got, torch.tensor([expected]))
    unrelated = torch.tensor([[1, 5, 6, 7, 2, 3, 4, 8, 9, 0]])
    assert pair_overlap(unrelated, first, second, vocab=10)[0, 1:].tolist() == [0.0, 0.0]


def test_at_offsets_read_the_value_k_positions_away():
    values = torch.tensor([[1, 2, 3, 4]])
    shifted = at_offsets(values, (2, -1, 0, 9, -5))
    assert [s.tolist() for s in shifted] == [[[3, 4, 0, 0]], [[0, 1, 2, 3]], [[1, 2, 3, 4]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]]
    rows = torch.arange(12.0).view(1, 4, 3)  # trailing dimensions move along with their position
    assert at_offsets(rows, (1,))[0].tolist() == [[[3, 4, 5], [6, 7, 8], [9, 10, 11], [0, 0, 0]]]


def _window(dim: int = 3) -> WindowFeatures:
    sequences = [[1, 2, 3, 4, 5, 6, 7, 8]] * 2
    torch.manual_seed(0)
    return WindowFeatures(NgramTables.build(sequences, vocab=10, min_count=2), vocab=10, dim=dim)


def test_window_features_read_two_tokens_each_side_and_nothing_further():
    window = _window()
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    base = window(ids, mask)  # (1, 8, 30)
    assert base.shape == (1, 8, WindowFeatures.SLOTS * 3)
    t = 3
    for moved in range(8):
        changed = ids.clone()
        changed[0, moved] = 9  # an unseen token: every n-gram through it becomes unknown
        differs = not torch.equal(window(changed, mask)[0, t], base[0, t])
        assert differs == (abs(moved - t) <= 2), moved
    slots = base[0, t].view(WindowFeatures.SLOTS, 3)
    assert torch.equal(slots[2], window.unigrams.weight[4])  # slot 2: the token itself (id 4)
    assert torch.equal(slots[0], window.unigrams.weight[2])  # slot 0: two to the left (id 2)
    bigram_34 = window.tables[0].lookup(torch.tensor([[3, 4]]), 2)[0, 1]
    assert bigram_34 > 0 and torch.equal(slots[6], window.bigrams.weight[bigram_34])  # (t-1, t)
    trigram_345 = window.tables[0].lookup(torch.tensor([[3, 4, 5]]), 3)[0, 2]
    assert trigram_345 > 0 and torch.equal(slots[9], window.trigrams.weight[trigram_345])


def test_window_features_do_not_depend_on_padding():
    window = _window()
    short = torch.tensor([[1, 2, 3, 4]])
    padded = torch.tensor([[1, 2, 3, 4, 0, 0], [1, 2, 3, 4, 5, 6]])
    alone = window(short, torch.ones_like(short))
    in_batch = window(padded, torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]))
    assert torch.equal(in_batch[0, :4], alone[0])
    assert not torch.equal(in_batch[1, 3], alone[0, 3])  # there the right neighbours are real tokens


def test_window_tag_weights_score_each_feature_and_tag_from_zero():
    """A weight per (window slot, feature, tag): zero at first; a position's score is the sum of its slots'
    rows, so it reads the same window as the shared features and nothing beyond it, padding included."""
    window = _window()
    tables = window.tables[0]
    weights = WindowTagWeights(tables, vocab=10, num_tags=3)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    index = window_index(tables, ids, mask)  # (1, 8, 10)
    assert index.shape == (1, 8, WindowFeatures.SLOTS)
    assert torch.count_nonzero(weights(index)) == 0
    assert index[0, 0, :2].tolist() == [0, 0] and index[0, 0, 2] == 2  # nothing left of the text; token id 1 -> row 2
    assert index[0, 5, 3:5].tolist() == [0, 0]  # right of the last real token: padding, not features
    with torch.no_grad():
        for slot, emb in enumerate(weights.slots):
            emb.weight.normal_()
            emb.weight[0].zero_()
    scores = weights(index)
    expected = sum(weights.slots[s].weight[index[0, 3, s]] for s in range(WindowFeatures.SLOTS))
    torch.testing.assert_close(scores[0, 3], expected)
    alone = weights(window_index(tables, ids[:, :6], mask[:, :6]))
    torch.testing.assert_close(scores[0, :6], alone[0])


def test_token_batches_with_window_features_gain_a_direct_path_per_head(tiny_tokenized, tmp_path):
    from tasks_mtl.model import new_model
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer
    from tasks_mtl.train import StreamData, load_features

    cfg = tiny_tokenized
    tasks = {n: t.model_copy(update={"window_features": True}) if t.type == "token_classification" else t
             for n, t in cfg.tasks.items()}
    tasks["ner"] = tasks["ner"].model_copy(update={"window_weights": True})  # and tag weights of its own
    cfg = cfg.model_copy(update={"tasks": tasks})
    tokenizer = load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)
    model = new_model(cfg, tokenizer, NgramTables.load(cfg.path(cfg.data.tokenized_dir)))
    assert model.window is not None and model.heads["ner"].wide is not None
    assert model.heads["sentiment"].__class__.__name__ == "ClassificationHead"
    data = StreamData(["ner"], load_features(cfg, "ner"), model.task_types["ner"].collator(tokenizer), cfg, seed=0,
                      max_tokens=cfg.training.batch_tokens)
    batch = data.next_batch(torch.device("cpu"))
    loss, _ = model("ner", batch)
    loss.backward()
    assert model.window.unigrams.weight.grad is not None and model.heads["ner"].wide.weight.grad is not None
    assert all(emb.weight.grad is not None and emb.weight.grad.is_sparse for emb in model.heads["ner"].lexical.slots)
    assert getattr(model.heads["cws"], "lexical", None) is None
    window_ids = {id(p) for p in [*model.window.parameters(), *model.heads["ner"].lexical.parameters()]}
    assert window_ids <= {id(p) for p in model.private_parameters()}  # sparse: summed, not surgery rows
    assert not window_ids & {id(p) for p in model.shared_parameters()}

    from tasks_mtl.checkpoint import load_checkpoint, save_checkpoint

    model.eval()
    saved = save_checkpoint(model, tokenizer, tmp_path / "ckpt", max_length=64)
    again, _, meta = load_checkpoint(saved)
    assert meta["window_dim"] == cfg.encoder.window_dim
    with torch.no_grad():
        for emb in model.heads["ner"].lexical.slots:  # non-zero tag weights, so the round trip must carry them
            emb.weight[1:].normal_()
        saved = save_checkpoint(model, tokenizer, tmp_path / "ckpt", max_length=64)
        again, _, meta = load_checkpoint(saved)
        assert torch.equal(again.eval().logits("ner", batch), model.logits("ner", batch))


def test_token_budget_batches_respect_the_budget_and_cover_every_row():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 130, size=500)
    order = np.argsort(-lengths, kind="stable")
    batches = length_batches(order, lengths, batch_size=8, max_tokens=512)
    assert sorted(np.concatenate(batches).tolist()) == list(range(500))
    for batch in batches:
        assert len(batch) * lengths[batch].max() <= 512 or len(batch) == 1
    assert [len(b) for b in length_batches(order, lengths, batch_size=8)][:3] == [8, 8, 8]
    epoch = BatchOrder(lengths.tolist(), batch_size=8, seed=1, max_tokens=512)
    seen = np.concatenate([epoch.next() for _ in range(len(epoch))])
    assert sorted(seen.tolist()) == list(range(500))


def _feature(ids, labels):
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "token_type_ids": [0] * len(ids), "labels": labels}


def test_token_tasks_on_the_same_texts_share_one_stream(tiny_cfg):
    features = {
        "ner": [_feature([2, 5, 6, 3], [IGNORE, 1, 0, IGNORE]), _feature([2, 7, 3], [IGNORE, 0, IGNORE])],
        "cws": [_feature([2, 5, 6, 3], [IGNORE, 0, 2, IGNORE]), _feature([2, 7, 3], [IGNORE, 3, IGNORE])],
        "sentiment": [{"input_ids": [2, 5, 3], "attention_mask": [1, 1, 1], "labels": 1}],
    }
    assert co_labelled_groups(tiny_cfg, ["sentiment", "ner", "cws"], features) == [["sentiment"], ["ner", "cws"]]
    off = tiny_cfg.model_copy(update={"training": tiny_cfg.training.model_copy(update={"co_label": False})})
    assert co_labelled_groups(off, ["ner", "cws"], features) == [["ner"], ["cws"]]
    features["cws"] = [_feature([2, 9, 9, 3], [IGNORE, 0, 2, IGNORE])]  # other texts: no sharing
    assert co_labelled_groups(tiny_cfg, ["ner", "cws"], features) == [["ner"], ["cws"]]


def test_merged_rows_carry_each_tasks_labels_and_pad_them():
    features = {
        "ner": [_feature([2, 5, 6, 3], [IGNORE, 1, 0, IGNORE]), _feature([2, 7, 3], [IGNORE, 0, IGNORE])],
        "cws": [_feature([2, 5, 6, 3], [IGNORE, 0, 2, IGNORE])],
    }
    rows = merge_features(["ner", "cws"], features)
    assert len(rows) == 2
    assert rows[0]["labels/ner"] == [IGNORE, 1, 0, IGNORE] and rows[0]["labels/cws"] == [IGNORE, 0, 2, IGNORE]
    assert rows[1]["labels/cws"] == [IGNORE] * 3  # cws does not label that text


def test_co_labelled_collator_pads_inputs_and_labels(tiny_tokenized):
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

    tokenizer = load_tokenizer(tiny_tokenized.path(tiny_tokenized.data.tokenized_dir) / TOKENIZER_DIR)
    rows = merge_features(["ner", "cws"], {
        "ner": [_feature([2, 5, 6, 3], [IGNORE, 1, 0, IGNORE]), _feature([2, 7, 3], [IGNORE, 0, IGNORE])],
        "cws": [_feature([2, 5, 6, 3], [IGNORE, 0, 2, IGNORE])],
    })
    batch = co_labelled_collator(tokenizer, ["ner", "cws"])(rows)
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"][1].tolist() == [1, 1, 1, 0]
    assert batch["labels/ner"][1].tolist() == [IGNORE, 0, IGNORE, IGNORE]
    assert batch["labels/cws"][1].tolist() == [IGNORE] * 4


def test_one_encoding_gives_the_same_losses_as_one_pass_per_task(tiny_tokenized):
    from tasks_mtl.model import new_model
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer
    from tasks_mtl.train import load_features

    cfg = tiny_tokenized
    tokenizer = load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)
    torch.manual_seed(0)
    model = new_model(cfg, tokenizer, NgramTables.load(cfg.path(cfg.data.tokenized_dir))).eval()
    ner = load_features(cfg, "ner")[:6]
    cws_labels = [[IGNORE if l == IGNORE else (i % 4) for i, l in enumerate(f["labels"])] for f in ner]
    rows = merge_features(["ner", "cws"], {"ner": ner, "cws": [f | {"labels": c} for f, c in zip(ner, cws_labels)]})
    batch = co_labelled_collator(tokenizer, ["ner", "cws"])(rows)
    together = model.forward_tasks(["ner", "cws"], batch)
    alone_ner, _ = model("ner", batch | {"labels": batch["labels/ner"]})
    alone_cws, _ = model("cws", batch | {"labels": batch["labels/cws"]})
    torch.testing.assert_close(together["ner"][0], alone_ner)
    torch.testing.assert_close(together["cws"][0], alone_cws)
    only_ner = batch | {"labels/cws": torch.full_like(batch["labels/cws"], IGNORE)}
    assert set(model.forward_tasks(["ner", "cws"], only_ner)) == {"ner"}  # no cws label: no cws loss


def test_crf_heads_take_co_labelled_batches_where_some_rows_lack_their_labels(tiny_tokenized):
    from tasks_mtl.model import new_model
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer
    from tasks_mtl.train import load_features

    cfg = tiny_tokenized
    tasks = {n: t.model_copy(update={"crf": True}) if n in ("ner", "cws") else t for n, t in cfg.tasks.items()}
    cfg = cfg.model_copy(update={"tasks": tasks})
    tokenizer = load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)
    torch.manual_seed(0)
    model = new_model(cfg, tokenizer, NgramTables.load(cfg.path(cfg.data.tokenized_dir))).eval()
    ner = load_features(cfg, "ner")[:4]
    cws = [f | {"labels": [IGNORE if l == IGNORE else i % 4 for i, l in enumerate(f["labels"])]} for f in ner[:2]]
    rows = merge_features(["ner", "cws"], {"ner": ner, "cws": cws})  # rows 2-3 carry no cws label
    batch = co_labelled_collator(tokenizer, ["ner", "cws"])(rows)
    assert bool((batch["labels/cws"][2:] == IGNORE).all())
    together = model.forward_tasks(["ner", "cws"], batch)
    alone, _ = model("cws", {k: v[:2] for k, v in batch.items()} | {"labels": batch["labels/cws"][:2]})
    torch.testing.assert_close(together["cws"][0], alone)  # the unlabelled rows add nothing
    assert torch.isfinite(together["ner"][0])


def test_fixed_shares_sum_over_a_streams_tasks():
    sampler = build_sampler("fixed", ["sentiment", "ner+cws"], {"sentiment": 10, "ner+cws": 99}, 100, seed=0,
                            weights={"sentiment": 0.3, "ner": 0.2, "cws": 0.1})
    np.testing.assert_allclose(sampler.probabilities(), [0.5, 0.5])
    draws = [sampler.next()[0] for _ in range(2000)]
    assert 0.45 < draws.count("sentiment") / 2000 < 0.55
    fallback = build_sampler("fixed", ["a", "b"], {"a": 1, "b": 1}, 10, seed=0, weights={"a": 0.6})
    np.testing.assert_allclose(fallback.probabilities(), [0.5, 0.5])  # b gets the mean share
    with pytest.raises(ValueError):
        build_sampler("fixed", ["a"], {"a": 1}, 10, seed=0, weights={"a": -1.0})
