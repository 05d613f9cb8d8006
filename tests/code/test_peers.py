"""Classical peers (tasks_mtl/peers.py), benchmarks/peers.py and `mtl compare`, on the tiny project."""

import gc
import json
from collections import Counter

import pytest
from tiny_project import load_benchmark
from typer.testing import CliRunner

from tasks_mtl.cli import app
from tasks_mtl.data.prepare import read_split
from tasks_mtl.peers import compare_rows, peer_kind, predict_peer, score_peer, token_features, train_peer


def _accuracy(pred: list, gold: list) -> float:
    assert len(pred) == len(gold)
    return sum(p == g for p, g in zip(pred, gold, strict=True)) / len(gold)


def _majority(values: list) -> float:
    return Counter(values).most_common(1)[0][1] / len(values)


def test_token_features_see_two_neighbours_each_side_and_the_ends():
    feats = token_features(list("我爱你"))
    assert len(feats) == 3
    assert {"c0=爱", "c-1=我", "c+1=你", "c-2=<s>", "c+2=</s>",
            "b-1,0=我|爱", "b0,1=爱|你", "b-2,-1=<s>|我", "b1,2=你|</s>"} <= set(feats[1])
    assert "BOS" in feats[0] and "EOS" in feats[2] and not {"BOS", "EOS"} & set(feats[1])
    assert token_features([]) == []


@pytest.mark.parametrize("task", ["ner", "cws"])
def test_crf_learns_the_tiny_tagging_data(tiny_cfg, task):
    peer = train_peer(tiny_cfg, task, max_iterations=30)
    rows = read_split(tiny_cfg, task, "train")
    pred = predict_peer(peer, [r["tokens"] for r in rows])
    flat_pred = [t for seq in pred for t in seq]
    flat_gold = [t for r in rows for t in r["tags"]]
    accuracy = _accuracy(flat_pred, flat_gold)
    assert accuracy >= 0.95 and accuracy > _majority(flat_gold) + 0.3
    assert peer.kind == "crf" and set(peer.labels) <= set(tiny_cfg.tasks[task].tag_set())


def test_crf_finds_entities_on_unseen_sentences(tiny_cfg):
    metrics = score_peer(tiny_cfg, "ner", train_peer(tiny_cfg, "ner", max_iterations=30), split="test")
    # 北京 and 上海 occur as plain words (O) and, after 在, as places: context features must decide
    assert metrics["f1"] >= 0.9 and metrics["f1_PER"] >= 0.9 and metrics["f1_LOC"] >= 0.9


def test_predictions_keep_the_input_lengths(tiny_cfg):
    crf = train_peer(tiny_cfg, "ner", max_iterations=10)
    gc.collect()  # the tagger reads its model buffer in place: that buffer must outlive collection
    inputs = [[], ["我"], list("张伟在上海学习"), list("好" * 40)]
    assert [len(tags) for tags in predict_peer(crf, inputs)] == [0, 1, 7, 40]
    lr = train_peer(tiny_cfg, "sentiment")
    texts = ["很好", "这个手机质量很差", "", "完全没见过的字"]
    labels = predict_peer(lr, texts)
    assert len(labels) == len(texts) and set(labels) <= {"negative", "positive"}
    assert predict_peer(lr, []) == [] and predict_peer(crf, []) == []


def test_tfidf_lr_beats_the_majority_class(tiny_cfg):
    rows = read_split(tiny_cfg, "sentiment", "train")
    peer = train_peer(tiny_cfg, "sentiment")
    gold = [r["label"] for r in rows]
    accuracy = _accuracy(predict_peer(peer, [r["text"] for r in rows]), gold)
    assert peer.kind == "tfidf_lr" and accuracy >= 0.95 and accuracy > _majority(gold) + 0.3
    assert score_peer(tiny_cfg, "sentiment", peer)["accuracy"] >= 0.9  # unseen test rows, same cue


def test_score_peer_reports_the_model_metric_names(tiny_cfg):
    expected = {  # what tasks_mtl.evaluate.evaluate returns for these task types
        "sentiment": {"accuracy", "macro_f1"},
        "ner": {"accuracy", "precision", "recall", "f1", "f1_PER", "f1_LOC", "f1_ORG"},
        "cws": {"accuracy", "precision", "recall", "f1"},
    }
    for task, names in expected.items():
        metrics = score_peer(tiny_cfg, task, train_peer(tiny_cfg, task, max_iterations=5))
        assert set(metrics) == names
        assert set(tiny_cfg.gates.thresholds[task]) <= names  # the gated metric can be compared
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in metrics.values())


def test_tasks_without_a_peer_are_refused(tiny_cfg, tmp_path):
    for task in ("nsp", "mlm"):
        assert peer_kind(tiny_cfg.tasks[task]) is None
        with pytest.raises(ValueError, match="no classical peer"):
            train_peer(tiny_cfg, task)
    with pytest.raises(KeyError):
        train_peer(tiny_cfg, "pos")  # not configured in the tiny project
    peer = train_peer(tiny_cfg, "cws", max_train=10, max_iterations=5, model_dir=tmp_path / "crf")
    assert peer.train_rows == 10 and (tmp_path / "crf" / "cws.crfsuite").stat().st_size > 0


def test_compare_rows_use_the_gated_metric_and_mark_missing_model_values():
    model = {"sentiment": {"accuracy": 0.9, "macro_f1": 0.8}, "ner": {"f1": 0.9, "accuracy": 0.99}}
    peers = {"sentiment": {"accuracy": 0.86, "macro_f1": 0.85, "train_s": 3.0},
             "ner": {"f1": 0.95, "accuracy": 0.98, "train_s": 100.0}, "cws": {"f1": 0.97, "accuracy": 0.97}}
    rows = compare_rows(model, peers, {"sentiment": {"accuracy": 0.85}, "ner": {"f1": 0.945}})
    assert [r[:2] for r in rows] == [("sentiment", "accuracy"), ("ner", "f1"),
                                     ("cws", "accuracy"), ("cws", "f1")]
    assert rows[0][4] == pytest.approx(0.04) and rows[1][4] == pytest.approx(-0.05)
    assert rows[2][2] is None and rows[2][4] is None  # no model value for cws
    assert all(r[1] != "train_s" for r in compare_rows(model, peers))


def _table_rows(output: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("│").split("│")] for line in output.splitlines()
            if line.startswith("│")]


def test_benchmark_merges_and_compare_prints_a_row_per_task(tiny_cfg, capsys, monkeypatch):
    params, reports = tiny_cfg.root / "params.yaml", tiny_cfg.root / "reports"
    reports.mkdir()
    (reports / "peers.json").write_text(json.dumps({"pos": {"accuracy": 0.93, "f1": 0.92, "train_s": 1.0}}))
    # the tiny project has prepared splits and no raw data: re-preparing would fail, so this also
    # checks that the benchmark leaves existing prepared data alone
    benchmark = load_benchmark("peers", monkeypatch)
    line = benchmark.main(["--params", str(params), "--tasks", "sentiment,ner,cws,mlm", "--max-iterations", "20"])
    printed = capsys.readouterr()
    assert json.loads(printed.out.strip().splitlines()[-1]) == line
    assert "skipping mlm" in printed.err
    assert set(line["peers"]) == {"sentiment", "ner", "cws"}
    assert all(entry["train_s"] >= 0 and entry["train_rows"] == 48 for entry in line["peers"].values())
    stored = json.loads((reports / "peers.json").read_text())
    assert set(stored) == {"pos", "sentiment", "ner", "cws"} and stored["pos"]["accuracy"] == 0.93

    model = {"sentiment": {"accuracy": stored["sentiment"]["accuracy"] + 0.05},
             "ner": {"f1": stored["ner"]["f1"] - 0.1}, "pos": {"accuracy": 0.99, "f1": 0.95}}  # no cws figure
    (reports / "metrics.json").write_text(json.dumps(model))
    result = CliRunner().invoke(app, ["compare", "--params", str(params),
                                      "--metrics", str(reports / "metrics.json")])
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.output)
    # one row per gated task; pos has no gate in the tiny project, so both of its peer metrics show
    assert sorted((r[0], r[1]) for r in rows) == [("cws", "f1"), ("ner", "f1"), ("pos", "accuracy"), ("pos", "f1"),
                                                 ("sentiment", "accuracy")]
    by_task = {r[0]: r for r in rows if (r[0], r[1]) != ("pos", "f1")}
    assert by_task["pos"][1:] == ["accuracy", "0.9900", "0.9300", "+0.0600"]
    assert by_task["cws"][2] == "-" and by_task["ner"][4].startswith("-0.1")
    assert "model beats the peer on: pos, sentiment; not on: cws, ner" in " ".join(result.output.split())


def test_compare_without_peers_fails_in_one_line(tiny_cfg):
    params = str(tiny_cfg.root / "params.yaml")
    result = CliRunner().invoke(app, ["compare", "--params", params, "--metrics", "x.json"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "run python benchmarks/peers.py first" in " ".join(result.output.split())
