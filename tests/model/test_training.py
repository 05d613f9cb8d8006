"""Behaviour of staged training, resume, checkpoints and the predictor on the tiny project."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from tasks_mtl.checkpoint import load_checkpoint
from tasks_mtl.cli import app
from tasks_mtl.predict import PredictionInputError, Predictor
from tasks_mtl.spans import lenient_spans
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import stage_dir, train_stage


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_parameters_stay_bit_identical(tiny_cfg):
    tokenize(tiny_cfg)
    train_stage(tiny_cfg, 0)  # MLM pretraining
    warm = load_checkpoint(train_stage(tiny_cfg, 1), tiny_cfg.tasks)[0]  # whole encoder frozen
    joint = load_checkpoint(train_stage(tiny_cfg, 2), tiny_cfg.tasks)[0]  # embeddings + layer 0 frozen
    before, after = _weights(warm), _weights(joint)
    frozen = [k for k in before if k.startswith(("bert.embeddings.", "bert.encoder.layer.0."))]
    trained = [k for k in before if k.startswith("bert.encoder.layer.1.") or k.startswith("heads.")]
    assert frozen and trained
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    moved = [k for k in trained if not torch.equal(before[k], after[k])]
    assert len(moved) > 0.8 * len(trained)  # (a head's bias row for an unseen class may legitimately stay)
    assert any(k.startswith("bert.encoder.layer.1.") for k in moved)


def test_warmup_after_pretraining_trains_heads_only(tiny_cfg):
    tokenize(tiny_cfg)
    pretrained = load_checkpoint(train_stage(tiny_cfg, 0), tiny_cfg.tasks)[0]  # MLM-only stage
    warm = load_checkpoint(train_stage(tiny_cfg, 1), tiny_cfg.tasks)[0]  # freeze_layers: all
    a, b = _weights(pretrained), _weights(warm)
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("bert."))
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("heads."))


def test_freezing_a_randomly_initialised_encoder_is_refused(tmp_path):
    from tiny_project import make_tiny_project

    stages = [{"name": "warmup", "freeze_layers": "all", "steps": 2}]
    with pytest.raises(ValueError, match="freezing protects pretrained weights only"):
        make_tiny_project(tmp_path, {"training": {"stages": stages}})


def test_default_stages_fit_the_encoder():
    from tasks_mtl.config import load_config

    scratch = load_config(None)
    assert [s.freeze_layers for s in scratch.training.stages] == ["none"] * len(scratch.training.stages)
    assert [s.name for s in scratch.training.stages] == ["features", "joint"]
    features = scratch.training.stages[0]
    assert features.features_only  # mlm takes part through its neighbour n-gram scores
    assert set(features.task_names(scratch.tasks)) == {"sentiment", "ner", "cws", "pos", "nsp", "mlm"}
    plain = load_config(None, overrides={"tasks.sentiment.tfidf": False, "tasks.nsp.ngram_bag": 0,
                                         "tasks.mlm.neighbours": False,
                                         "tasks.nsp.pair_overlap": False, "tasks.pos.window_features": False,
                                         "tasks.cws.window_features": False, "tasks.ner.window_weights": False,
                                         "tasks.ner.lbfgs_iterations": 0})
    assert [s.name for s in plain.training.stages] == ["joint"]  # nothing for a features stage to fit
    pretrained = load_config(None, overrides={"encoder.pretrained": "/some/bert"})
    assert [s.freeze_layers for s in pretrained.training.stages] == ["all", 1, "none"]


def test_a_features_stage_fits_the_ngram_features_and_leaves_the_encoder_alone(tmp_path):
    """The features stage trains window features, n-gram bags and the heads' own layers; the encoder does not
    run, so its weights stay at their initial values, and the joint stage after it trains everything."""
    from tiny_project import make_tiny_project

    from tasks_mtl.model import new_model
    from tasks_mtl.ngrams import NgramTables
    from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

    cfg = make_tiny_project(tmp_path, {
        "tasks": {"sentiment": {"ngram_bag": 8}, "ner": {"window_features": True, "crf": True}},
        "encoder": {"window_dim": 4},
        "training": {"stages": [
            {"name": "features", "features_only": True, "steps": 6, "head_lr": 5e-3, "ngram_lr": 2e-2,
             "batch_tokens": 256},
            {"name": "joint", "steps": 3, "encoder_lr": 1e-3, "head_lr": 1e-3}]}})
    assert sorted(cfg.training.stages[0].task_names(cfg.tasks)) == ["ner", "sentiment"]
    tokenize(cfg)
    tokenized = cfg.path(cfg.data.tokenized_dir)
    torch.manual_seed(cfg.seed)  # train_stage seeds stage 0 the same way: this is its initial model
    initial = _weights(new_model(cfg, load_tokenizer(tokenized / TOKENIZER_DIR), NgramTables.load(tokenized)))
    fitted = _weights(load_checkpoint(train_stage(cfg, 0), cfg.tasks)[0])
    encoder = [k for k in initial if k.startswith(("bert.", "bigrams."))]
    assert encoder and all(torch.equal(initial[k], fitted[k]) for k in encoder)
    for key in ("window.unigrams.weight", "heads.ner.wide.weight", "heads.sentiment.bag.unigrams.weight",
                "heads.sentiment.classify.weight"):
        assert not torch.equal(initial[key], fitted[key]), key
    # the CRF trains over the window features: the stage fits the linear-chain CRF the classical peer is
    assert not torch.equal(initial["heads.ner.crf.transitions"], fitted["heads.ner.crf.transitions"])
    assert torch.equal(initial["heads.cws.emit.weight"], fitted["heads.cws.emit.weight"])  # cws has no features
    log = (cfg.path(cfg.training.output_dir) / "1-features.log.csv").read_text()
    assert "loss/ner" in log and "loss/cws" not in log and "lr/encoder" not in log
    joint = _weights(load_checkpoint(train_stage(cfg, 1), cfg.tasks)[0])
    assert not torch.equal(fitted["bert.encoder.layer.0.attention.self.query.weight"],
                           joint["bert.encoder.layer.0.attention.self.query.weight"])
    assert not torch.equal(fitted["heads.ner.crf.transitions"], joint["heads.ner.crf.transitions"])


def test_finished_stage_is_not_rerun(tiny_cfg):
    tokenize(tiny_cfg)
    out = train_stage(tiny_cfg, 0)
    stamp = (out / "heads.safetensors").stat().st_mtime_ns
    assert train_stage(tiny_cfg, 0) == out
    assert (out / "heads.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_resume_mid_stage_matches_an_uninterrupted_run(tmp_path, weighting):
    from tiny_project import make_tiny_project

    stages = [{"name": "only", "steps": 8, "encoder_lr": 1e-3, "head_lr": 3e-3, "weighting": weighting,
               "sampler": "temperature"}]
    straight = make_tiny_project(tmp_path / "a", {"training": {"stages": stages}})
    resumed = make_tiny_project(tmp_path / "b", {"training": {"stages": stages}})
    for cfg in (straight, resumed):
        tokenize(cfg)
    full = train_stage(straight, 0)
    partial = train_stage(resumed, 0, stop_after=4)
    assert partial.name.endswith(".resume") and not (stage_dir(resumed, 0) / "done.json").exists()
    done = train_stage(resumed, 0)  # picks up the resume state: optimizer, scheduler, sampler, batches, RNG
    a = load_file(str(full / "heads.safetensors"))
    b = load_file(str(done / "heads.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    ea = load_file(str(full / "encoder" / "model.safetensors"))
    eb = load_file(str(done / "encoder" / "model.safetensors"))
    for key in ea:
        torch.testing.assert_close(ea[key], eb[key], rtol=1e-5, atol=1e-6)
    assert not partial.exists()  # resume state is removed once the stage is done


def test_checkpoint_holds_no_pickles_and_predicts_the_same_after_reload(tiny_cfg):
    tokenize(tiny_cfg)
    out = train_stage(tiny_cfg, 0)
    files = {p.suffix for p in out.rglob("*") if p.is_file()}
    assert not files & {".bin", ".pt", ".pkl", ".pth"}
    meta = json.loads((out / "mtl.json").read_text())
    assert set(meta["tasks"]) == set(tiny_cfg.tasks)
    texts = ["张伟在北京学习", "今天天气非常很好"]
    first = Predictor.from_dir(out).predict(texts, ["我们喜欢", None])
    second = Predictor.from_dir(out).predict(texts, ["我们喜欢", None])
    assert first == second


def test_predictor_records_follow_the_contract_and_survive_long_texts(tiny_cfg):
    tokenize(tiny_cfg)
    predictor = Predictor.from_dir(train_stage(tiny_cfg, 0))
    long_text = "张伟在北京学习 hello 2026" * 20  # far beyond the 32-token window and 64 positions
    records = predictor.predict(["今天天气很好", long_text], ["我们喜欢", None])
    short, long = records
    assert short["text"] == "今天天气很好" and short["text_pair"] == "我们喜欢"
    assert short["sentiment"]["label"] in ("negative", "positive") and 0.5 <= short["sentiment"]["score"] <= 1
    assert short["nsp"]["label"] in ("not_next", "is_next")
    assert "nsp" not in long  # no pair given
    assert "".join(long["cws"]) == long_text  # words join back to the text
    for entity in long["ner"]:
        assert long_text[entity["start"]:entity["end"]] == entity["text"] and entity["type"] in ("PER", "LOC", "ORG")
    with pytest.raises(PredictionInputError):
        predictor.predict([""])
    with pytest.raises(PredictionInputError):
        predictor.predict([None])  # type: ignore[list-item]


def test_lenient_spans_decode_ill_formed_predictions():
    assert lenient_spans(["I-PER", "I-PER", "O", "B-LOC", "I-ORG"], "bio") == [(0, 2, "PER"), (3, 4, "LOC"), (4, 5, "ORG")]
    assert lenient_spans(["B", "E", "S", "M", "E"], "bmes") == [(0, 2, None), (2, 3, None), (3, 5, None)]


def test_missing_pretrained_encoder_is_one_clear_error(tmp_path):
    from tiny_project import make_tiny_project

    cfg = make_tiny_project(tmp_path, {"encoder": {"pretrained": "no/such/bert-base-chinese"}})
    with pytest.raises(FileNotFoundError, match="not a directory.*nothing is downloaded"):
        tokenize(cfg)


@pytest.mark.slow
def test_cli_prepare_prints_a_short_table(tmp_path, monkeypatch):
    import tasks_mtl.data.prepare

    summary = {task: {"train": {"rows": 35127, "duplicates_removed": 1150, "conflicts_dropped": 18, "capped": 0},
                      "validation": {"rows": 4274, "duplicates_removed": 58, "conflicts_dropped": 2, "capped": 0},
                      "test": {"rows": 4378, "duplicates_removed": 71, "conflicts_dropped": 2, "capped": 0}}
               for task in ("cws", "sentiment")}
    monkeypatch.setattr(tasks_mtl.data.prepare, "prepare", lambda cfg: summary)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prepare"], catch_exceptions=False)
    assert result.exit_code == 0 and "prepared rows" in result.output and "{" not in result.output
    assert len(result.output.splitlines()) < 15  # not 150 lines of JSON
    row = next(line for line in result.output.splitlines() if " sentiment " in line)
    assert [cell for cell in row.replace("│", " ").split()] == ["sentiment", "35127", "4274", "4378", "1279", "22", "0"]


def test_cli_train_then_evaluate_end_to_end(tiny_cfg, monkeypatch):
    monkeypatch.chdir(tiny_cfg.root)
    runner = CliRunner()
    for command in (["tokenize"], ["train"], ["evaluate"]):
        result = runner.invoke(app, command, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        if command == ["train"]:  # not a terminal: a plain progress line at each stage's end
            for stage in tiny_cfg.training.stages:
                assert f"{stage.name} {stage.steps}/{stage.steps} (100%) | loss " in result.output, result.output
    metrics = json.loads((tiny_cfg.root / "reports" / "metrics.json").read_text())
    assert set(metrics) == set(tiny_cfg.tasks)
    assert {"accuracy", "macro_f1"} <= set(metrics["sentiment"])
    assert {"f1", "f1_PER", "precision", "recall"} <= set(metrics["ner"])
    assert {"accuracy", "perplexity"} <= set(metrics["mlm"])
    confusion = json.loads((tiny_cfg.root / "reports" / "confusion.json").read_text())
    assert set(confusion) == {"sentiment", "nsp"}  # the classification tasks
    counts = np.array(confusion["sentiment"]["matrix"])
    assert confusion["sentiment"]["labels"] == tiny_cfg.tasks["sentiment"].labels
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["sentiment"]["accuracy"], abs=1e-6)
    result = runner.invoke(app, ["evaluate", "--split", "validation"], catch_exceptions=False)
    assert result.exit_code == 0 and "validation metrics per task" in result.output
    on_validation = json.loads((tiny_cfg.root / "reports" / "metrics_validation.json").read_text())
    assert set(on_validation) == set(tiny_cfg.tasks)
    assert json.loads((tiny_cfg.root / "reports" / "metrics.json").read_text()) == metrics  # test report untouched
    result = runner.invoke(app, ["evaluate", "--split", "dev"])
    assert result.exit_code == 2 and "unknown split 'dev'" in result.output
    losses = tiny_cfg.root / "reports" / "losses"
    assert {p.stem for p in losses.glob("*.csv")} == set(tiny_cfg.tasks)
    # predict on the last checkpoint through the CLI
    requests = tiny_cfg.root / "in.jsonl"
    requests.write_text('{"text": "张伟在上海"}\n{"text": "今天很好", "text_pair": "我们喜欢"}\n', encoding="utf-8")
    last = stage_dir(tiny_cfg, len(tiny_cfg.training.stages) - 1)
    result = runner.invoke(app, ["predict", "--input", str(requests), "--output", "out.jsonl", "--model", str(last)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (tiny_cfg.root / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["text"] for line in lines] == ["张伟在上海", "今天很好"] and "nsp" in lines[1]
    bad = tiny_cfg.root / "bad.jsonl"
    bad.write_text('{"txt": "oops"}\n', encoding="utf-8")
    result = runner.invoke(app, ["predict", "--input", str(bad), "--output", "o.jsonl", "--model", str(last)])
    assert result.exit_code == 2 and "text" in result.output


def test_bf16_autocast_with_gradient_accumulation_and_a_gradient_method(tmp_path):
    from tiny_project import make_tiny_project

    cfg = make_tiny_project(tmp_path, {"training": {"bf16": True, "grad_accum": 2, "stages": [
        {"name": "only", "steps": 3, "encoder_lr": 1e-3, "weighting": "gradnorm"}]}})
    tokenize(cfg)
    out = train_stage(cfg, 0)
    log = (out.parent / "1-only.log.csv").read_text()
    assert "weight/ner" in log and "nan" not in log.lower()


def test_a_user_task_from_files_trains_without_code_changes(tmp_path):
    """Bring your own data: a JSONL classification task and a BIOES CoNLL NER task, split by the rule."""
    import random

    import yaml

    from tasks_mtl.config import load_config
    from tasks_mtl.data.prepare import prepare, read_split

    rng = random.Random(0)
    brands = ["华为", "小米", "苹果"]
    with (tmp_path / "intent.jsonl").open("w", encoding="utf-8") as fh:
        for i in range(300):
            label = rng.choice(["query", "order"])
            text = ("请问" if label == "query" else "我要买") + rng.choice(brands) + "手机" + "的" * (i % 7)
            fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    with (tmp_path / "brands.conll").open("w", encoding="utf-8") as fh:
        for i in range(300):
            brand = rng.choice(brands)
            chars = list("我喜欢" + brand + "手机" + "很" * (i % 9))
            tags = ["O", "O", "O", "B-BRAND", "E-BRAND"] + ["O"] * (len(chars) - 5)
            fh.write("".join(f"{c}\t{t}\n" for c, t in zip(chars, tags)) + "\n")
    params = {
        "tasks_replace": True,
        "tasks": {
            "intent": {"type": "classification", "files": {"all": "intent.jsonl"}, "labels": ["query", "order"]},
            "brand": {"type": "token_classification", "files": {"all": "brands.conll"}, "labels": ["BRAND"],
                      "scheme": "bio"},
        },
        "encoder": {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64, "vocab_size": 200,
                    "vocab_min_frequency": 1, "max_length": 32},
        "training": {"batch_size": 16, "stages": [{"name": "only", "steps": 40, "encoder_lr": 3e-3,
                                                    "head_lr": 3e-3}]},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    cfg = load_config(tmp_path / "params.yaml")
    summary = prepare(cfg)
    assert set(summary) == {"intent", "brand"} and summary["intent"]["test"]["rows"] > 0
    row = read_split(cfg, "brand", "train")[0]
    assert "B-BRAND" in row["tags"] and "E-BRAND" not in row["tags"]  # BIOES converted to the task's BIO
    tokenize(cfg)
    out = train_stage(cfg, 0)
    from tasks_mtl.evaluate import evaluate

    metrics = evaluate(cfg, out)
    assert metrics["intent"]["accuracy"] > 0.9 and metrics["brand"]["f1"] > 0.9  # a trivially learnable pattern
    record = Predictor.from_dir(out).predict(["我喜欢小米手机"])[0]
    assert set(record) == {"text", "intent", "brand"}
    assert record["brand"] == [{"start": 3, "end": 5, "type": "BRAND", "text": "小米"}]


def test_annealing_and_learning_rates_count_optimizer_steps_under_accumulation(tmp_path):
    """With grad_accum=4 the annealed sampler is halfway at half the stage (it used to count micro-batches
    against optimizer steps and finish at a quarter); the logs carry the encoder's own rate and none while
    it is frozen."""
    from tiny_project import make_tiny_project

    from tasks_mtl.checkpoint import load_state

    cfg = make_tiny_project(tmp_path, {"encoder": {"bigrams": False}, "training": {
        "grad_accum": 4, "log_every": 1, "stages": [
        {"name": "pretrain", "tasks": ["mlm"], "steps": 2, "encoder_lr": 1e-3, "head_lr": 3e-3},
        {"name": "warmup", "freeze_layers": "all", "steps": 2, "head_lr": 5e-3, "warmup": 0.0},
        {"name": "joint", "steps": 8, "encoder_lr": 1e-3, "head_lr": 3e-3, "warmup": 0.0, "layer_decay": 0.5,
         "sampler": "annealed"}]}})
    tokenize(cfg)
    train_stage(cfg, 0)
    warm = train_stage(cfg, 1)
    resume = train_stage(cfg, 2, stop_after=4)
    assert load_state(resume)["sampler"]["progress"] == pytest.approx(0.5)
    rows = [line.split(",") for line in (warm.parent / "2-warmup.log.csv").read_text().splitlines()[1:]]
    logged = {metric for _, _, metric, _ in rows}
    assert "lr/heads" in logged and "lr/encoder" not in logged  # frozen: no encoder rate to report
    rows = [line.split(",") for line in (resume.parent / "3-joint.log.csv").read_text().splitlines()[1:]]
    first = {metric: float(value) for step, _, metric, value in rows if step == rows[0][0]}
    expected = 1e-3 * (1 - 1 / 8)  # linear decay after one step; the top layer's rate, not a decayed one
    assert first["lr/encoder"] == pytest.approx(expected) and first["lr/heads"] == pytest.approx(3e-3 * (1 - 1 / 8))


def test_famo_logits_have_their_own_constant_rate(tmp_path):
    from tiny_project import make_tiny_project

    from tasks_mtl.checkpoint import load_state

    cfg = make_tiny_project(tmp_path, {"training": {"stages": [
        {"name": "only", "steps": 6, "encoder_lr": 1e-3, "head_lr": 3e-3, "warmup": 0.5, "weighting": "famo"}]}})
    tokenize(cfg)
    resume = train_stage(cfg, 0, stop_after=1)
    optimizers = load_state(resume)["optimizer"]
    famo = optimizers[-1]["param_groups"]
    assert len(famo) == 1 and famo[0]["lr"] == pytest.approx(0.025)  # no warm-up, no decay
    assert optimizers[0]["param_groups"][0]["lr"] < 1e-3  # the model's rates are warming up
