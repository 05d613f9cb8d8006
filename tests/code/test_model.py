"""Task types, sharing schemes, samplers and weighting methods, wired into the real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks_mtl.config import StageConfig
from tasks_mtl.model import MultiTaskModel, new_encoder, new_model
from tasks_mtl.ngrams import NgramTables
from tasks_mtl.sampling import SAMPLERS, BatchOrder, build_sampler
from tasks_mtl.tasks import TASK_TYPES
from tasks_mtl.tasks.token_classification import IGNORE, first_piece_labels
from tasks_mtl.train import StreamData, load_features, make_optimizers, param_groups
from tasks_mtl.weighting import WEIGHTINGS, build_weighting


def _model(cfg, tasks=None) -> tuple[MultiTaskModel, object]:
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

    tokenizer = load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)
    torch.manual_seed(0)
    if tasks is None:
        return new_model(cfg, tokenizer, NgramTables.load(cfg.path(cfg.data.tokenized_dir))), tokenizer
    model = MultiTaskModel(new_encoder(cfg, len(tokenizer), tokenizer.pad_token_id), tasks)
    return model, tokenizer


def _batch(cfg, model, tokenizer, task: str, size: int = 8) -> dict:
    cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"batch_size": size})})
    data = StreamData([task], load_features(cfg, task), model.task_types[task].collator(tokenizer), cfg, seed=0,
                      max_tokens=cfg.training.batch_tokens)
    return data.next_batch(torch.device("cpu"))


TASK_OF_TYPE = {"classification": "sentiment", "pair_classification": "nsp", "token_classification": "ner", "mlm": "mlm"}


def test_every_task_type_has_a_task_in_the_fixture():
    assert set(TASK_OF_TYPE) == set(TASK_TYPES)


@pytest.mark.parametrize("task_type", sorted(TASK_TYPES))
def test_gradients_reach_encoder_and_head(tiny_tokenized, task_type):
    cfg = tiny_tokenized
    task = TASK_OF_TYPE[task_type]
    model, tokenizer = _model(cfg)
    loss, _ = model(task, _batch(cfg, model, tokenizer, task))
    loss.backward()
    assert torch.isfinite(loss)
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads[task].parameters())
    others = [t for t in cfg.tasks if t != task]
    assert all(p.grad is None for t in others for p in model.heads[t].parameters())


@pytest.mark.parametrize("task_type", sorted(TASK_TYPES))
def test_each_task_type_overfits_a_tiny_batch(tiny_tokenized, task_type):
    cfg = tiny_tokenized
    task = TASK_OF_TYPE[task_type]
    model, tokenizer = _model(cfg)
    model.eval()  # no dropout: the same batch must become memorised
    batch = _batch(cfg, model, tokenizer, task, size=4)  # masking for MLM is drawn once, then fixed
    stage = StageConfig(name="t", steps=1, encoder_lr=3e-3, head_lr=3e-3, ngram_lr=3e-3)
    optimizers = make_optimizers(param_groups(model, stage, weight_decay=0.0))
    first = None
    for _ in range(150):
        loss, _ = model(task, batch)
        first = first if first is not None else loss.item()
        for optimizer in optimizers:
            optimizer.zero_grad()
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
    assert float(loss) < 0.05 < first


def test_crf_head_trains_and_decodes(tiny_tokenized):
    cfg = tiny_tokenized
    tasks = dict(cfg.tasks)
    tasks["ner"] = tasks["ner"].model_copy(update={"crf": True})
    model, tokenizer = _model(cfg, tasks)
    model.eval()
    batch = _batch(cfg, model, tokenizer, "ner", size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(120):
        loss, _ = model("ner", batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss) < 0.1
    assert model.heads["ner"].crf.transitions.grad is not None


@pytest.mark.parametrize("num_tags", [4, 89])
def test_matmul_crf_matches_the_reference_crf(num_tags):
    """The head's CRF computes the log-partition by matrix products and the gold score vectorised: the same
    loss and gradients as torchcrf's loops, on ragged batches and with transitions far from zero."""
    from torchcrf import CRF

    from tasks_mtl.tasks.token_classification import _crf_class

    torch.manual_seed(0)
    reference, fast = CRF(num_tags, batch_first=True), _crf_class()(num_tags, batch_first=True)
    with torch.no_grad():
        for a, b in zip(reference.parameters(), fast.parameters()):
            a.normal_(0, 3)
            b.copy_(a)
    emissions = torch.randn(6, 9, num_tags) * 4
    tags = torch.randint(0, num_tags, (6, 9))
    mask = torch.arange(9)[None, :] < torch.tensor([9, 1, 5, 7, 2, 9])[:, None]
    grads = []
    for crf in (reference, fast):
        e = emissions.clone().requires_grad_(True)
        loss = crf(e, tags, mask=mask, reduction="sum")
        loss.backward()
        grads.append((loss.detach(), e.grad, crf.transitions.grad))
    for ref, got in zip(*grads):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert fast.decode(emissions, mask) == reference.decode(emissions, mask)
    full = torch.ones(6, 9, dtype=torch.bool)  # no padding anywhere: the decode's path without the padding select
    assert fast.decode(emissions, full) == reference.decode(emissions, full)
    assert fast.decode(emissions[:1], full[:1]) == reference.decode(emissions[:1], full[:1])  # one sentence


def test_the_crf_loss_stays_fp32_under_bf16_autocast():
    """A fitted CRF's loss is near zero, below bf16's rounding of the log-partition: the token head computes it
    in fp32 whatever the autocast around it."""
    from tasks_mtl.config import TaskConfig
    from tasks_mtl.tasks.token_classification import TokenClassificationTask

    torch.manual_seed(0)
    task = TokenClassificationTask("ner", TaskConfig(type="token_classification", bundled="ner", crf=True,
                                                     labels=["PER", "LOC", "ORG"]))
    head = task.build_head(16, torch.nn.Embedding(10, 16))
    with torch.no_grad():
        head.crf.transitions.normal_(0, 3)
    scores = torch.randn(8, 60, 7) * 4
    labels = scores.argmax(-1)
    emissions = scores + 12 * torch.nn.functional.one_hot(labels, 7)  # peaked on one tag per token, as after a fit
    head.forward = lambda hidden_states, batch: emissions  # the CRF alone: no bf16 emission layer in between
    hidden = torch.zeros(8, 60, 16)
    batch = {"labels": labels}
    exact, _ = task.loss(head, hidden, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded, _ = task.loss(head, hidden, batch)
    assert float(rounded) == pytest.approx(float(exact), rel=1e-5, abs=1e-6)


def test_batched_viterbi_decodes_each_sentence_as_alone(tiny_tokenized):
    """Prediction decodes a whole length batch with one CRF pass; every sentence gets the path it gets alone,
    whatever its neighbours' lengths (an empty token list included)."""
    from tasks_mtl.predict import Predictor

    cfg = tiny_tokenized
    tasks = dict(cfg.tasks)
    tasks["ner"] = tasks["ner"].model_copy(update={"crf": True})
    model, tokenizer = _model(cfg, tasks)
    with torch.no_grad():  # strong transitions: the best path differs from the per-token argmax
        model.heads["ner"].crf.transitions.normal_(std=3.0)
    sentences = [list("张伟在北京学习"), list("李娜"), [], list("我们今天在上海公司非常喜欢这个手机质量")]
    batched = Predictor(model, tokenizer, {"max_length": 16}, torch.device("cpu"), batch_size=8)
    alone = Predictor(model, tokenizer, {"max_length": 16}, torch.device("cpu"), batch_size=1)
    together = batched.token_tags("ner", sentences)
    assert together == alone.token_tags("ner", sentences)
    assert [len(t) for t in together] == [len(s) for s in sentences]
    model.heads["ner"].crf = None  # the same emissions by argmax: the CRF's transitions changed some tags
    assert batched.token_tags("ner", sentences) != together


def test_labels_sit_on_the_first_word_piece_only():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "张", "伟", "买", "了", "很", "好", "ip", "##hone", "##15"]
    tokenizer = BertTokenizerFast(vocab={piece: i for i, piece in enumerate(vocab)})
    tokens = ["张", "伟", "买", "了", "iphone15", "很", "好"]
    tags = ["B-PER", "I-PER", "O", "O", "B-ORG", "O", "O"]
    label2id = {"O": 0, "B-PER": 1, "I-PER": 2, "B-ORG": 3}
    enc = tokenizer(tokens, is_split_into_words=True)
    word_ids = enc.word_ids()
    labels = first_piece_labels(word_ids, tags, label2id)
    assert word_ids.count(4) > 1  # the Latin word became several pieces
    kept = [(w, lab) for w, lab in zip(word_ids, labels) if lab != IGNORE]
    assert [w for w, _ in kept] == list(range(len(tokens)))  # exactly one label per token, in order
    assert [lab for _, lab in kept] == [label2id[t] for t in tags]


def test_hierarchical_head_reads_a_lower_layer(tiny_tokenized):
    cfg = tiny_tokenized  # cws reads layer 1 of 2
    model, tokenizer = _model(cfg)
    assert model.read_layer("cws") == 1 and model.read_layer("ner") == 2
    loss, _ = model("cws", _batch(cfg, model, tokenizer, "cws"))
    loss.backward()
    assert model.bert.encoder.layer[0].output.dense.weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[1].output.dense.weight.grad is None  # above the head: never ran


def test_soft_sharing_owns_top_layers_tied_by_l2(tiny_tokenized):
    cfg = tiny_tokenized
    tasks = dict(cfg.tasks)
    tasks["sentiment"] = tasks["sentiment"].model_copy(update={"sharing": "soft", "soft_layers": 1, "soft_l2": 1.0})
    model, tokenizer = _model(cfg, tasks)
    assert model.soft_penalty("sentiment") == 0  # private copy starts equal to the shared layer
    with torch.no_grad():
        next(model.private["sentiment"].parameters()).add_(0.1)
    assert model.soft_penalty("sentiment") > 0
    loss, _ = model("sentiment", _batch(cfg, model, tokenizer, "sentiment"))
    loss.backward()
    assert next(model.private["sentiment"].parameters()).grad.abs().sum() > 0
    # the tie pulls the shared top layer too, although the task's activations never pass through it
    assert next(model.bert.encoder.layer[1].parameters()).grad.abs().sum() > 0
    assert model.bert.encoder.layer[1].output.dense.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("name", sorted(WEIGHTINGS))
def test_every_weighting_trains_encoder_and_all_heads(tiny_tokenized, name):
    cfg = tiny_tokenized
    model, tokenizer = _model(cfg)
    tasks = list(cfg.tasks)
    weighting = build_weighting(name, tasks)
    losses = {t: model(t, _batch(cfg, model, tokenizer, t))[0] for t in tasks}
    weights = weighting.backward(losses, model.shared_parameters(),
                                 model.private_parameters() + list(weighting.parameters()))
    assert set(weights) == set(tasks) and all(np.isfinite(list(weights.values())))
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    for t in tasks:
        assert model.heads[t].parameters().__next__().grad.abs().sum() > 0, t


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_samplers_are_seeded_and_resumable(name):
    sizes = {"a": 1000, "b": 100, "c": 10}
    first = build_sampler(name, list(sizes), sizes, total_steps=300, seed=5)
    seq = [tuple(first.next()) for _ in range(150)]
    state = first.state_dict()
    rest = [tuple(first.next()) for _ in range(150)]
    again = build_sampler(name, list(sizes), sizes, total_steps=300, seed=5)
    assert [tuple(again.next()) for _ in range(150)] == seq
    resumed = build_sampler(name, list(sizes), sizes, total_steps=300, seed=99)
    resumed.load_state_dict(state)
    assert [tuple(resumed.next()) for _ in range(150)] == rest
    assert {t for step in seq + rest for t in step} == set(sizes)


def test_temperature_flattens_proportional_sampling():
    sizes = {"a": 900, "b": 100}
    share = {}
    for name, args in (("proportional", {}), ("temperature", {"temperature": 4.0})):
        sampler = build_sampler(name, list(sizes), sizes, total_steps=4000, seed=1, **args)
        draws = [sampler.next()[0] for _ in range(4000)]
        share[name] = draws.count("b") / len(draws)
    assert abs(share["proportional"] - 0.1) < 0.02
    expected = 100 ** 0.25 / (900 ** 0.25 + 100 ** 0.25)  # about 0.37
    assert abs(share["temperature"] - expected) < 0.03


def test_annealed_moves_toward_uniform():
    sizes = {"a": 900, "b": 100}
    sampler = build_sampler("annealed", list(sizes), sizes, total_steps=100, seed=1)
    start = sampler.probabilities()[1]
    for _ in range(100):
        sampler.next()
    assert sampler.probabilities()[1] > start + 0.2


def test_batch_order_groups_lengths_and_resumes():
    lengths = list(np.random.default_rng(0).integers(1, 100, size=500))
    order = BatchOrder(lengths, batch_size=10, seed=3, group=10)
    batches = [order.next() for _ in range(60)]  # crosses an epoch boundary (50 batches per epoch)
    first_epoch = np.concatenate(batches[:50])
    assert sorted(first_epoch.tolist()) == list(range(500))  # every example once per epoch
    spread = np.mean([np.ptp(np.asarray(lengths)[b]) for b in batches[:50]])
    assert spread < 40  # grouped: a random batch of 10 would spread ~80
    state = order.state_dict()
    following = [order.next().tolist() for _ in range(5)]
    fresh = BatchOrder(lengths, batch_size=10, seed=3, group=10)
    fresh.load_state_dict(state)
    assert [fresh.next().tolist() for _ in range(5)] == following


def test_pair_pooling_compares_the_two_segments():
    """`pooling: pair` reads the segments apart: moving the segment boundary changes the output, which a
    mean over the whole pair cannot notice; it is refused on a single-text task."""
    from tasks_mtl.config import TaskConfig
    from tasks_mtl.tasks.classification import ClassificationHead

    torch.manual_seed(0)
    hidden = torch.randn(2, 6, 8)  # (B, T, H)
    batch = {"attention_mask": torch.ones(2, 6, dtype=torch.long), "input_ids": torch.ones(2, 6, dtype=torch.long),
             "token_type_ids": torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)}
    moved = batch | {"token_type_ids": torch.tensor([[0, 0, 0, 0, 1, 1]] * 2)}
    pair, mean = ClassificationHead(8, 2, "pair").eval(), ClassificationHead(8, 2, "mean").eval()
    assert pair.pool.in_features == 32
    assert not torch.allclose(pair(hidden, batch), pair(hidden, moved))
    torch.testing.assert_close(mean(hidden, batch), mean(hidden, moved))
    with pytest.raises(ValueError, match="pair"):
        TaskConfig(type="classification", bundled="sentiment", labels=["a", "b"], pooling="pair")


def test_pair_overlap_reaches_the_classifier():
    """With `pair_overlap`, the classifier reads the two texts' n-gram overlap: on equal hidden states, a pair
    that shares its characters scores apart from one that shares none, and a trained weight on the overlap
    separates them."""
    from tasks_mtl.tasks.classification import ClassificationHead

    torch.manual_seed(0)
    head = ClassificationHead(8, 2, "pair", overlap_vocab=20).eval()
    assert head.classify.in_features == 8 + 3
    types = torch.tensor([[0, 0, 0, 0, 1, 1, 1]])
    shared = {"input_ids": torch.tensor([[1, 5, 6, 2, 5, 6, 2]]), "attention_mask": torch.ones(1, 7, dtype=torch.long),
              "token_type_ids": types}
    apart = shared | {"input_ids": torch.tensor([[1, 5, 6, 2, 7, 8, 2]])}
    hidden = torch.zeros(1, 7, 8)
    with torch.no_grad():
        head.classify.weight.zero_()
        head.classify.weight[1, 8:] = 1.0  # is_next reads the overlap
        assert head(hidden, shared)[0, 1] > head(hidden, apart)[0, 1] + 1.0
