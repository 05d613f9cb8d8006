"""The pretrained path: `encoder.pretrained` names a local Hugging Face BERT directory laid out as
bert-base-chinese is (config.json, a character vocab.txt, safetensors or the older pytorch_model.bin).

The BERT here is tiny (2 layers, hidden 32) and made by the test with transformers, so nothing is
downloaded. It goes through the pieces of the quick pipeline: tokenization with its WordPiece vocabulary,
the pretrained stages (config.pretrained_stages, cut to a few steps) with their freezing, evaluation,
gates, registration, promotion and prediction from the registry.
"""

from __future__ import annotations

import json
import math
import pathlib
import pickle
from pathlib import Path

import pytest
import torch
from tiny_project import make_tiny_project

from tasks_mtl.config import load_config, pretrained_stages
from tasks_mtl.spans import lenient_spans

BERT_DIR = "models/tiny-bert"  # relative: resolved against the run root, as params.yaml's paths are
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
STAGE_STEPS = 5  # per stage of pretrained_stages(): enough for every parameter that trains to move


def project_characters(prepared: Path) -> set[str]:
    """Every character of the tiny project's prepared texts (all tasks, all splits)."""
    chars: set[str] = set()
    for file in prepared.rglob("*.jsonl"):
        for line in file.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            chars.update(row.get("text", "") + (row.get("text_pair") or "") + "".join(row.get("tokens", [])))
    return chars


def save_tiny_bert(directory: Path, characters: set[str], weights: str = "safetensors", seed: int = 0):
    """Write a tiny BERT directory with a character vocabulary; return the model it holds.

    Saved as a BertForMaskedLM, as bert-base-chinese is (an MLM head beside the encoder, keys under
    `bert.`). `weights="bin"` writes the older pytorch_model.bin instead, a pickled state dict with the
    LayerNorm.gamma/beta names of the 2019 conversions. LayerNorms are perturbed from their ones/zeros
    init so that a weight the loader dropped would show."""
    from transformers import BertConfig, BertForMaskedLM

    directory.mkdir(parents=True, exist_ok=True)
    vocab = SPECIALS + sorted(characters)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(seed)
    model = BertForMaskedLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    if weights == "safetensors":
        model.save_pretrained(str(directory))
    else:
        config.save_pretrained(str(directory))
        old_names = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
        legacy = {}
        for key, value in model.state_dict().items():
            for new, old in old_names.items():
                key = key.replace(new, old)
            legacy[key] = value
        torch.save(legacy, directory / "pytorch_model.bin")
    return model


def pretrained_params() -> dict:
    """The tiny project on the tiny BERT: the pretrained stages with their freezing, a few steps each; the
    n-gram parts on (bigram embeddings through their zero-initialised projection, NER's window features and
    CRF, sentiment's n-gram bag), as the default tasks have them."""
    stages = [s.model_dump(mode="json") | {"steps": STAGE_STEPS} for s in pretrained_stages()]
    return {
        "encoder": {"pretrained": BERT_DIR, "bigrams": True, "bigram_dim": 8, "window_dim": 4},
        "tasks": {"ner": {"window_features": True, "crf": True}, "sentiment": {"ngram_bag": 8}},
        "training": {"stages": stages},
    }


@pytest.fixture(scope="module")
def bert_project(tmp_path_factory):
    """(config, the BertForMaskedLM saved at encoder.pretrained), tokenized once for the module."""
    from tasks_mtl.tokenization import tokenize

    root = tmp_path_factory.mktemp("pretrained")
    cfg = make_tiny_project(root, pretrained_params())
    reference = save_tiny_bert(cfg.path(BERT_DIR), project_characters(cfg.path(cfg.data.prepared_dir)))
    tokenize(cfg)
    return cfg, reference


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def frozen_by(freeze_layers: int | str, key: str) -> bool:
    """Whether a `bert.` parameter is frozen under a stage's `freeze_layers`."""
    if freeze_layers == "all":
        return True
    if freeze_layers == "none":
        return False
    return key.startswith("bert.embeddings.") or any(key.startswith(f"bert.encoder.layer.{i}.")
                                                     for i in range(freeze_layers))


def test_tokenize_uses_the_directory_vocab_and_token_labels_sit_on_their_characters(bert_project):
    from tasks_mtl.data.prepare import read_split
    from tasks_mtl.tasks import build_task
    from tasks_mtl.tasks.token_classification import IGNORE
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer
    from tasks_mtl.train import load_features

    cfg, _ = bert_project
    tokenizer = load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)
    vocab = cfg.path(BERT_DIR).joinpath("vocab.txt").read_text(encoding="utf-8").splitlines()
    assert tokenizer.get_vocab() == {token: i for i, token in enumerate(vocab)}  # no vocabulary of its own
    for name in ("ner", "cws"):
        task = build_task(name, cfg.tasks[name])
        rows, features = read_split(cfg, name, "train"), load_features(cfg, name)
        assert len(rows) == len(features)  # every row fits one window: features follow the rows
        for row, feature in zip(rows, features):
            kept = [(i, tag) for i, tag in zip(feature["input_ids"], feature["labels"]) if tag != IGNORE]
            assert tokenizer.convert_ids_to_tokens([i for i, _ in kept]) == row["tokens"]
            assert [task.labels[tag] for _, tag in kept] == row["tags"]
    # characters outside the vocabulary become [UNK] and keep their tag; whitespace has no token and no tag
    ner = build_task("ner", cfg.tasks["ner"])
    chars, tags = list("张伟 x😀北京"), ["B-PER", "I-PER", "O", "O", "O", "B-LOC", "I-LOC"]
    enc = ner.encode({"tokens": [chars], "tags": [tags]}, tokenizer, cfg.encoder.max_length)
    kept = [(i, label) for i, label in zip(enc["input_ids"][0], enc["labels"][0]) if label != IGNORE]
    assert tokenizer.convert_ids_to_tokens([i for i, _ in kept]) == ["张", "伟", "[UNK]", "[UNK]", "北", "京"]
    assert [ner.labels[label] for _, label in kept] == ["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"]


def test_ner_spans_predicted_through_the_wordpiece_vocab_land_on_their_characters(bert_project, tmp_path,
                                                                                    monkeypatch):
    """The NER head is replaced by an oracle that tags 张伟 as PER and 北京 as LOC from the token ids alone;
    whatever the tokenizer drops, maps to [UNK] or cuts into windows, every span must come back on the
    characters a per-character reading gives."""
    from tasks_mtl.checkpoint import save_checkpoint
    from tasks_mtl.model import new_model
    from tasks_mtl.ngrams import NgramTables
    from tasks_mtl.predict import Predictor
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

    cfg, _ = bert_project
    tokenized = cfg.path(cfg.data.tokenized_dir)
    tokenizer = load_tokenizer(tokenized / TOKENIZER_DIR)
    model = new_model(cfg, tokenizer, NgramTables.load(tokenized))
    checkpoint = save_checkpoint(model, tokenizer, tmp_path / "untrained", cfg.encoder.max_length)
    predictor = Predictor.from_dir(checkpoint, device="cpu")
    tags = predictor.tasks["ner"].tag_set()
    oracle = {"张": "B-PER", "伟": "I-PER", "北": "B-LOC", "京": "I-LOC"}
    table = torch.zeros(len(tokenizer), len(tags))  # (V, C): emissions by token id
    table[:, tags.index("O")] = 20.0
    for char, tag in oracle.items():
        row = tokenizer.convert_tokens_to_ids(char)
        table[row] = 0.0
        table[row, tags.index(tag)] = 20.0
    real = predictor.model.logits
    monkeypatch.setattr(predictor.model, "logits", lambda task, batch, hidden=None: (
        table[batch["input_ids"]] if task == "ner" else real(task, batch, hidden)))
    texts = [
        "张伟在北京",
        " 张伟\u3000在 北京 hello",  # spaces (ASCII and ideographic) have no token
        "Ｈｉ张伟😀北京ＡＢＣ",  # full-width letters and an emoji: [UNK]
        "\t张 伟北京",  # a space inside the name: two one-character spans
        "é张伟e\u0301北京",  # accents are stripped: the combining mark alone has no token
        "今天张伟去北京 ok。" * 14,  # 140 characters: windows of 32 tokens, stitched
    ]
    records = predictor.predict(texts)
    for text, record in zip(texts, records):
        expected = lenient_spans([oracle.get(ch, "O") for ch in text], "bio")
        assert [(e["start"], e["end"], e["type"]) for e in record["ner"]] == expected, text
        assert all(text[e["start"]:e["end"]] == e["text"] for e in record["ner"])
    assert len(records[-1]["ner"]) == 28  # every name and place of the long text, across window edges


@pytest.mark.slow  # 11-16 s on an idle 2-core box; trains, registers and serves
def test_pretrained_stages_freeze_then_evaluate_register_and_predict(bert_project, tmp_path, monkeypatch):
    from tasks_mtl import registry
    from tasks_mtl.checkpoint import load_checkpoint
    from tasks_mtl.evaluate import evaluate_to_report
    from tasks_mtl.gates import evaluate_gates
    from tasks_mtl.model import new_model
    from tasks_mtl.ngrams import NgramTables
    from tasks_mtl.predict_jsonl import predict_file
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer
    from tasks_mtl.train import train_stage

    cfg, reference = bert_project
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MTL_MODEL_CACHE", str(tmp_path / "model-cache"))
    assert [s.freeze_layers for s in cfg.training.stages] == [s.freeze_layers for s in pretrained_stages()]
    pretrained = {f"bert.{k}": v for k, v in reference.bert.state_dict().items()}

    # stage 0 starts from the directory's weights; the bigram projection starts at zero, so the model
    # computes what the checkpoint computes
    tokenized = cfg.path(cfg.data.tokenized_dir)
    tokenizer = load_tokenizer(tokenized / TOKENIZER_DIR)
    torch.manual_seed(cfg.seed)  # as train_stage seeds stage 0: this is its initial model
    initial = new_model(cfg, tokenizer, NgramTables.load(tokenized)).eval()
    before = _weights(initial)
    assert all(torch.equal(before[k], v) for k, v in pretrained.items())
    assert initial.bigrams is not None and not initial.bigrams.project.weight.any()
    batch = dict(tokenizer(["张伟在北京学习", "今天天气非常很好"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(initial.task_hidden("sentiment", batch),
                                   reference.bert(**batch).last_hidden_state, rtol=1e-5, atol=1e-5)

    for index, stage in enumerate(cfg.training.stages):
        final = train_stage(cfg, index)
        after = _weights(load_checkpoint(final, cfg.tasks)[0])
        frozen = [k for k in pretrained if frozen_by(stage.freeze_layers, k)]
        trained = [k for k in pretrained if k not in frozen]
        assert all(torch.equal(before[k], after[k]) for k in frozen), stage.name
        moved = [k for k in trained if not torch.equal(before[k], after[k])]
        assert len(moved) >= 0.9 * len(trained), (stage.name, sorted(set(trained) - set(moved)))
        heads = [k for k in after if k.startswith("heads.")]
        assert sum(not torch.equal(before[k], after[k]) for k in heads) > 0.5 * len(heads), stage.name
        assert not torch.equal(before["bigrams.project.weight"], after["bigrams.project.weight"])
        before = after
    assert (final / "done.json").exists()

    metrics = evaluate_to_report(cfg, final)
    assert set(metrics) == set(cfg.tasks)
    assert all(math.isfinite(v) for values in metrics.values() for v in values.values())
    assert json.loads((cfg.path(cfg.reports_dir) / "metrics.json").read_text()) == metrics

    # registration and promotion: the thresholds opened (a few steps sit near chance), no champion yet
    opened = cfg.model_copy(deep=True)
    opened.gates.thresholds = {t: dict.fromkeys(floors, 0.0) for t, floors in cfg.gates.thresholds.items()}
    gates = evaluate_gates(opened, metrics, registry.champion_metrics(cfg))
    assert gates["passed"]
    version = registry.log_and_register(cfg, final, metrics, gates)
    assert registry.promote_if_passed(cfg, version, gates)
    served = registry.resolve_model_dir(cfg, None)  # the champion, as `mtl predict` loads it
    assert json.loads((served / "encoder" / "config.json").read_text())["hidden_size"] == 32
    assert load_tokenizer(served / "tokenizer").get_vocab() == tokenizer.get_vocab()  # the directory's

    texts = ["张伟在北京学习", " 李娜 喜欢 上海 hello", "王芳😀在广州", "我们今天在北京喜欢这个手机。" * 12]
    requests = tmp_path / "in.jsonl"
    lines = [{"text": t} for t in texts] + [{"text": "我们喜欢", "text_pair": "这个手机"}]
    requests.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")
    written, bad = predict_file(cfg, requests, tmp_path / "out.jsonl")
    assert (written, bad) == (5, [])
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    for record in records:
        text = record["text"]
        assert record["sentiment"]["label"] in ("negative", "positive")
        assert "".join(record["cws"]) == text
        for entity in record["ner"]:
            assert text[entity["start"]:entity["end"]] == entity["text"]
            assert entity["type"] in ("PER", "LOC", "ORG")
    assert records[-1]["nsp"]["label"] in ("not_next", "is_next") and "nsp" not in records[0]


def test_older_pytorch_model_bin_loads_only_through_weights_only_unpickling(tmp_path):
    """bert-base-chinese also ships pytorch_model.bin (a pickle). transformers reads it with
    torch.load(weights_only=True): tensors come back (legacy gamma/beta names included), code does not run."""
    from tasks_mtl.model import new_encoder

    directory = tmp_path / "bert-bin"
    reference = save_tiny_bert(directory, set("张伟在北京"), weights="bin")
    assert not (directory / "model.safetensors").exists()
    cfg = load_config(None, overrides={"encoder.pretrained": str(directory), "encoder.max_length": 32})
    bert = new_encoder(cfg, reference.config.vocab_size, 0)
    loaded = bert.state_dict()
    assert loaded.keys() == reference.bert.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in reference.bert.state_dict().items())

    marker = tmp_path / "code-ran"

    class RunsCodeOnLoad:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    torch.save({"bert.embeddings.word_embeddings.weight": RunsCodeOnLoad()}, directory / "pytorch_model.bin")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        new_encoder(cfg, reference.config.vocab_size, 0)
    assert not marker.exists()
    torch.load(directory / "pytorch_model.bin", weights_only=False)  # the file is a real payload: unpickled
    assert marker.exists()  # without weights_only, its code runs


@pytest.mark.parametrize("remove", ["config.json", "vocab.txt", "model.safetensors"])
def test_an_incomplete_pretrained_directory_is_one_clear_error(tmp_path, remove):
    from tasks_mtl.model import new_encoder
    from tasks_mtl.tokenization import build_tokenizer

    directory = tmp_path / "bert"
    save_tiny_bert(directory, set("张伟"))
    (directory / remove).unlink()
    cfg = load_config(None, overrides={"encoder.pretrained": str(directory)})
    for build in (lambda: build_tokenizer(cfg), lambda: new_encoder(cfg, 8, 0)):
        with pytest.raises(FileNotFoundError, match=rf"{directory} has no [^.]*{remove}"):
            build()


def test_mismatched_vocabulary_or_a_window_beyond_the_positions_is_refused(tmp_path):
    from tasks_mtl.model import new_encoder

    directory = tmp_path / "bert"
    reference = save_tiny_bert(directory, set("张伟"))
    cfg = load_config(None, overrides={"encoder.pretrained": str(directory), "encoder.max_length": 32})
    with pytest.raises(ValueError, match="vocab.txt and the weights must match"):
        new_encoder(cfg, reference.config.vocab_size + 1, 0)
    long = load_config(None, overrides={"encoder.pretrained": str(directory), "encoder.max_length": 128})
    with pytest.raises(ValueError, match="max_length 128 exceeds the 64 positions"):
        new_encoder(long, reference.config.vocab_size, 0)


@pytest.mark.slow
def test_the_bert_base_chinese_profile_runs_on_a_stand_in_at_its_path(tmp_path):
    """params.yaml's `bert-base-chinese` profile: the published recipe's ranges, and every stage of it run on
    the bundled data (shrunk) with a tiny BERT saved where the profile looks for the real one; on the CPU,
    in fp32, with a window the tiny BERT's 64 positions hold and 3 steps a stage."""
    import shutil

    from e2e_helpers import REPO, env_for, ingest_shrunk

    from tasks_mtl.data.prepare import prepare
    from tasks_mtl.evaluate import evaluate_to_report
    from tasks_mtl.tokenization import tokenize
    from tasks_mtl.train import train_all

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    profile = load_config(tmp_path / "params.yaml", profile="bert-base-chinese")
    assert profile.encoder.pretrained == Path("models/bert-base-chinese")
    assert profile.training.device == "cuda" and profile.training.bf16
    assert 128 <= profile.encoder.max_length <= 256 and profile.training.batch_size == 32
    tuned = [s for s in profile.training.stages if s.freeze_layers != "all"]
    assert tuned and all(2e-5 <= s.encoder_lr <= 5e-5 and 1e-4 <= s.head_lr <= 2e-3 for s in tuned)
    assert profile.training.stages[0].freeze_layers == "all"  # the new heads first, on the frozen encoder

    ingest_shrunk(tmp_path, env_for(tmp_path))
    stand_in = {"training.device": "cpu", "training.bf16": False, "encoder.max_length": 64,
                **{f"training.stages.{i}.steps": 3 for i in range(len(profile.training.stages))}}
    cfg = load_config(tmp_path / "params.yaml", profile="bert-base-chinese", overrides=stand_in)
    prepare(cfg)
    save_tiny_bert(cfg.path(cfg.encoder.pretrained), project_characters(cfg.path(cfg.data.prepared_dir)))
    tokenize(cfg)
    metrics = evaluate_to_report(cfg, train_all(cfg))
    assert set(metrics) == set(cfg.tasks) == {"sentiment", "ner", "cws", "pos", "nsp", "mlm"}
    assert all(math.isfinite(v) for values in metrics.values() for v in values.values())
