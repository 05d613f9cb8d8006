"""Data validation: good data passes; each kind of bad data is rejected by name, in the reports too.

Tables are built in memory (the shape `load_task_table` returns) and handed to `validate` via its
`loader` argument; the file-level failures (bad bytes, invalid JSON, leakage between split files, an
emptied review file, a broken newspaper line, a 200,000-character line, a CoNLL file without blank lines,
a ragged CSV row, mixed label types) go through the real readers and must name the file and line.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from tasks_mtl.config import Config, DataConfig, TaskConfig
from tasks_mtl.validation import ValidationResult, validate

SPLIT_OF_ROW = ["train"] * 8 + ["validation"] * 2 + ["test"] * 2  # 12 rows, every split above its minimum
TEXTS = [f"这是第{i}条评论，写得很清楚。" for i in range(len(SPLIT_OF_ROW))]

SENTIMENT = ["negative", "positive"]
UNUSED = {"all": Path("unused")}  # tables come from the in-memory loader, never from this file
TASKS = {
    "sentiment": TaskConfig(type="classification", files=UNUSED, labels=SENTIMENT),
    "nsp": TaskConfig(type="pair_classification", files=UNUSED, labels=["not_next", "is_next"]),
    "ner": TaskConfig(type="token_classification", files=UNUSED, labels=["PER", "LOC"], scheme="bio"),
    "cws": TaskConfig(type="token_classification", files=UNUSED, scheme="bmes"),
    "mlm": TaskConfig(type="mlm", files=UNUSED),
}


# --- tiny good tables, one per task type ---------------------------------------------------------


def _meta(keys: list[str], name: str) -> dict[str, list]:
    sources = [f"{name}.jsonl:{i + 1}" for i in range(len(keys))]
    return {"split": list(SPLIT_OF_ROW[: len(keys)]), "source": sources, "key": keys}


def good_classification() -> pd.DataFrame:
    labels = SENTIMENT * (len(TEXTS) // 2)
    return pd.DataFrame({"text": TEXTS, "label": labels, **_meta(TEXTS, "sentiment")})


def good_pairs() -> pd.DataFrame:
    pairs = [f"下一句{i}。" for i in range(len(TEXTS))]
    labels = ["is_next", "not_next"] * (len(TEXTS) // 2)
    return pd.DataFrame({"text": TEXTS, "text_pair": pairs, "label": labels, **_meta(TEXTS, "nsp")})


def good_ner() -> pd.DataFrame:
    tokens = [list(f"张三去北京{i}") for i in range(len(SPLIT_OF_ROW))]
    tags = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"] + ["O"] * (len(t) - 5) for t in tokens]
    return pd.DataFrame({"tokens": tokens, "tags": tags, **_meta(["".join(t) for t in tokens], "ner")})


def good_cws() -> pd.DataFrame:
    words = [["我们", "去", f"北京{i}"] for i in range(len(SPLIT_OF_ROW))]
    tokens = [list("".join(w)) for w in words]
    def bmes(word: str) -> list[str]:
        return ["S"] if len(word) == 1 else ["B"] + ["M"] * (len(word) - 2) + ["E"]

    tags = [[t for w in ws for t in bmes(w)] for ws in words]
    return pd.DataFrame({"tokens": tokens, "tags": tags, **_meta(["".join(t) for t in tokens], "cws")})


def good_mlm() -> pd.DataFrame:
    return pd.DataFrame({"text": TEXTS, **_meta(TEXTS, "mlm")})


GOOD = {
    "sentiment": good_classification,
    "nsp": good_pairs,
    "ner": good_ner,
    "cws": good_cws,
    "mlm": good_mlm,
}


def make_config(root: Path, task_names: list[str], **data: object) -> Config:
    data_cfg = {"min_rows": {"train": 4, "validation": 1, "test": 1}, "min_class_share": 0.1, **data}
    return Config(root=root, tasks={n: TASKS[n] for n in task_names}, data=DataConfig(**data_cfg))


def run(tmp_path: Path, tables: dict[str, pd.DataFrame], **data: object) -> ValidationResult:
    cfg = make_config(tmp_path, list(tables), **data)
    return validate(cfg, loader=lambda _cfg, name: tables[name])


def failed_names(result: ValidationResult, task: str) -> list[str]:
    return [e.name for e in result.tasks[task].failed]


def assert_rejected(
    tmp_path: Path, result: ValidationResult, task: str, name_part: str, *, says: str = ""
) -> None:
    """The run failed, one failed expectation's name contains `name_part` (and its text `says`),
    and both reports record that failure."""
    assert result.success is False
    assert result.tasks[task].success is False
    matches = [e for e in result.tasks[task].failed if name_part in e.name]
    assert matches, f"no failed expectation named like {name_part!r}; failed: {failed_names(result, task)}"
    if says:
        text = " ".join([matches[0].message, *(ex["value"] for ex in matches[0].examples)])
        assert says in text, text
    report = json.loads((tmp_path / "reports" / "validation.json").read_text(encoding="utf-8"))
    assert report["success"] is False and report["tasks"][task]["success"] is False
    assert any(name_part in e["name"] and not e["success"] for e in report["tasks"][task]["expectations"])
    page = (tmp_path / "reports" / "validation.html").read_text(encoding="utf-8")
    assert html.escape(matches[0].name) in page
    assert name_part in result.summary()


# --- good data -------------------------------------------------------------------------------------


def test_good_data_of_every_task_type_passes(tmp_path: Path) -> None:
    result = run(tmp_path, {name: make() for name, make in GOOD.items()})
    assert {n: failed_names(result, n) for n in result.tasks} == {n: [] for n in GOOD}
    assert result.success
    report = json.loads((tmp_path / "reports" / "validation.json").read_text(encoding="utf-8"))
    assert report["success"] is True
    assert set(report["tasks"]) == set(GOOD)
    assert report["tasks"]["ner"]["rows"] == len(SPLIT_OF_ROW)
    # every check ran as a GX expectation and is listed, passing
    kinds = {e["expectation"] for e in report["tasks"]["ner"]["expectations"]}
    assert {"expect_column_pair_values_to_be_equal", "expect_column_values_to_be_null"} <= kinds
    assert "passed" in (tmp_path / "reports" / "validation.html").read_text(encoding="utf-8")


def test_exact_duplicates_are_counted_and_allowed(tmp_path: Path) -> None:
    table = good_classification()
    table = pd.concat([table, table.iloc[[0, 0]]], ignore_index=True)
    result = run(tmp_path, {"sentiment": table})
    assert result.success, result.summary()
    assert (result.tasks["sentiment"].duplicates, result.tasks["sentiment"].conflicts) == (2, 0)


# --- each kind of bad data -------------------------------------------------------------------------


def test_missing_column_is_named(tmp_path: Path) -> None:
    result = run(tmp_path, {"sentiment": good_classification().drop(columns=["label"])})
    assert failed_names(result, "sentiment") == ["column 'label' exists"]
    assert_rejected(tmp_path, result, "sentiment", "column 'label' exists", says="missing")


def test_non_utf8_file_is_unreadable_not_a_crash(tmp_path: Path) -> None:
    good_line = '{"text": "好", "label": "positive"}\n'.encode()
    (tmp_path / "bad.jsonl").write_bytes(good_line + b'{"text": "\xff\xfe", "label": "negative"}\n')
    task = TaskConfig(type="classification", files={"all": Path("bad.jsonl")}, labels=SENTIMENT)
    result = validate(Config(root=tmp_path, tasks={"reviews": task}))
    assert failed_names(result, "reviews") == ["readable"]
    assert_rejected(tmp_path, result, "reviews", "readable", says="not valid UTF-8")
    assert "bad.jsonl:2" in result.tasks["reviews"].failed[0].message


def test_invalid_json_is_unreadable(tmp_path: Path) -> None:
    lines = '{"text": "好", "label": "positive"}\n{"text": "坏"\n'
    (tmp_path / "broken.jsonl").write_text(lines, encoding="utf-8")
    task = TaskConfig(type="classification", files={"all": Path("broken.jsonl")}, labels=SENTIMENT)
    result = validate(Config(root=tmp_path, tasks={"reviews": task}))
    assert_rejected(tmp_path, result, "reviews", "readable", says="invalid JSON")


def test_empty_text(tmp_path: Path) -> None:
    table = good_classification()
    table.loc[3, "text"] = "  "
    result = run(tmp_path, {"sentiment": table})
    assert_rejected(tmp_path, result, "sentiment", "text not empty")
    assert result.tasks["sentiment"].failed[0].examples[0]["source"] == "sentiment.jsonl:4"


def test_empty_text_pair(tmp_path: Path) -> None:
    table = good_pairs()
    table.loc[5, "text_pair"] = ""
    result = run(tmp_path, {"nsp": table})
    assert_rejected(tmp_path, result, "nsp", "text_pair not empty")


def test_null_text(tmp_path: Path) -> None:
    table = good_classification()
    table.loc[2, "text"] = None
    result = run(tmp_path, {"sentiment": table})
    assert failed_names(result, "sentiment") == ["text not null"]
    assert_rejected(tmp_path, result, "sentiment", "text not null", says="1 of 12")


def test_unknown_label(tmp_path: Path) -> None:
    table = good_classification()
    table.loc[1, "label"] = "neutral"
    result = run(tmp_path, {"sentiment": table})
    assert failed_names(result, "sentiment") == ["labels in declared set"]
    assert_rejected(tmp_path, result, "sentiment", "labels in declared set", says="neutral")
    assert result.tasks["sentiment"].failed[0].examples[0]["source"] == "sentiment.jsonl:2"


def test_tokens_and_tags_length_mismatch(tmp_path: Path) -> None:
    table = good_ner()
    table.at[0, "tags"] = table.at[0, "tags"][:-1]
    result = run(tmp_path, {"ner": table})
    assert failed_names(result, "ner") == ["tokens and tags of equal length"]
    assert_rejected(tmp_path, result, "ner", "tokens and tags of equal length", says="n_tokens=6 vs n_tags=5")


def test_token_row_without_tags(tmp_path: Path) -> None:
    table = good_ner()
    table.at[0, "tags"] = None
    result = run(tmp_path, {"ner": table})
    assert failed_names(result, "ner") == ["tags is a list", "tokens and tags of equal length"]
    says = "n_tokens=6 vs n_tags=None"
    assert_rejected(tmp_path, result, "ner", "tokens and tags of equal length", says=says)


def test_invalid_tag_sequence_i_after_o(tmp_path: Path) -> None:
    table = good_ner()
    table.at[4, "tags"] = ["O", "I-PER", "O", "B-LOC", "I-LOC", "O"]
    result = run(tmp_path, {"ner": table})
    assert failed_names(result, "ner") == ["tag sequences well-formed under bio"]
    assert_rejected(tmp_path, result, "ner", "tag sequences well-formed", says="I-PER at 1 follows O")


def test_malformed_segmentation_tags(tmp_path: Path) -> None:
    table = good_cws()
    table.at[0, "tags"] = ["B", "B", "S", "B", "M", "E"]  # the first word never closes
    result = run(tmp_path, {"cws": table})
    assert_rejected(tmp_path, result, "cws", "tag sequences well-formed under bmes", says="not closed")


def test_unknown_tag(tmp_path: Path) -> None:
    table = good_ner()
    table.at[6, "tags"] = ["B-ORG", "I-ORG", "O", "B-LOC", "I-LOC", "O"]  # ORG is not a declared type
    result = run(tmp_path, {"ner": table})
    assert failed_names(result, "ner") == ["tags in declared tag set"]
    assert_rejected(tmp_path, result, "ner", "tags in declared tag set", says="B-ORG")


def test_conflicting_duplicates_above_one_percent(tmp_path: Path) -> None:
    table = good_classification()
    flipped = table.iloc[[0]].assign(label="positive", source="sentiment.jsonl:99")  # row 0 is negative
    result = run(tmp_path, {"sentiment": pd.concat([table, flipped], ignore_index=True)})
    assert result.tasks["sentiment"].conflicts == 1
    assert_rejected(tmp_path, result, "sentiment", "conflicting duplicates", says="negative | positive")


def test_conflicting_duplicates_below_one_percent_pass_but_are_counted(tmp_path: Path) -> None:
    n = 150  # one conflicting input of 150 is 0.67%
    texts = [f"评论{i}" for i in range(n)]
    splits = ["train"] * 130 + ["validation"] * 10 + ["test"] * 10
    table = pd.DataFrame({
        "text": texts, "label": ["negative", "positive"] * (n // 2), "split": splits,
        "source": [f"r.jsonl:{i}" for i in range(n)], "key": texts,
    })
    flipped = table.iloc[[0]].assign(label="positive")
    result = run(tmp_path, {"sentiment": pd.concat([table, flipped], ignore_index=True)})
    assert result.success, result.summary()
    assert result.tasks["sentiment"].conflicts == 1


def test_empty_split(tmp_path: Path) -> None:
    table = good_classification()
    table = table[table["split"] != "test"]
    result = run(tmp_path, {"sentiment": table})
    assert failed_names(result, "sentiment") == ["minimum rows per split (data.min_rows)"]
    assert_rejected(tmp_path, result, "sentiment", "minimum rows per split", says="split 'test' is empty")


def test_too_few_rows_in_a_split(tmp_path: Path) -> None:
    result = run(tmp_path, {"mlm": good_mlm()}, min_rows={"train": 9, "validation": 1, "test": 1})
    says = "split 'train' has 8 rows (minimum 9)"
    assert_rejected(tmp_path, result, "mlm", "minimum rows per split", says=says)


def test_one_class_only(tmp_path: Path) -> None:
    table = good_classification().assign(label="positive")
    result = run(tmp_path, {"sentiment": table})
    assert_rejected(tmp_path, result, "sentiment", "at least two classes")
    assert_rejected(tmp_path, result, "sentiment", "minimum share per class", says="class 'negative' is 0.0%")


def test_leakage_between_explicit_split_files(tmp_path: Path) -> None:
    records = [{"text": f"第{i}句", "label": SENTIMENT[i % 2]} for i in range(6)]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # rows 4 and 5 of train are the whole of test
    (tmp_path / "test.jsonl").write_text("\n".join(lines[4:]) + "\n", encoding="utf-8")
    files = {"train": Path("train.jsonl"), "test": Path("test.jsonl")}
    task = TaskConfig(type="classification", files=files, labels=SENTIMENT)
    cfg = Config(root=tmp_path, tasks={"reviews": task}, data=DataConfig(min_rows={"train": 2, "test": 1}))
    result = validate(cfg)
    assert failed_names(result, "reviews") == ["no key in two splits (leakage)"]
    assert_rejected(tmp_path, result, "reviews", "leakage")
    sources = {ex["source"] for ex in result.tasks["reviews"].failed[0].examples}
    assert sources == {"train.jsonl:5", "train.jsonl:6", "test.jsonl:1", "test.jsonl:2"}


def test_text_too_long(tmp_path: Path) -> None:
    table = good_mlm()
    table.loc[0, "text"] = "长" * 21
    result = run(tmp_path, {"mlm": table}, max_chars=20)
    assert failed_names(result, "mlm") == ["text length within 1..20 characters"]
    assert_rejected(tmp_path, result, "mlm", "text length within", says="长" * 21)


def test_token_text_too_long(tmp_path: Path) -> None:
    result = run(tmp_path, {"ner": good_ner()}, max_chars=5)  # every sentence has 6 characters
    assert_rejected(tmp_path, result, "ner", "text length within 1..5", says="12 of 12")


# --- the reports -----------------------------------------------------------------------------------


def test_reports_escape_content_and_are_deterministic(tmp_path: Path) -> None:
    table = good_classification()
    table.loc[0, "label"] = "<script>alert(1)</script>"
    run(tmp_path, {"sentiment": table})
    page = (tmp_path / "reports" / "validation.html").read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert 'class="fail"' in page
    first = json.loads((tmp_path / "reports" / "validation.json").read_text(encoding="utf-8"))
    run(tmp_path, {"sentiment": table})
    second = json.loads((tmp_path / "reports" / "validation.json").read_text(encoding="utf-8"))
    first.pop("seconds"), second.pop("seconds")
    assert first == second


def test_conflicting_tag_sequences_name_the_first_difference(tmp_path: Path) -> None:
    table = good_cws()
    other = table.iloc[[0]].copy()
    other.at[other.index[0], "tags"] = ["B", "E", "S", "B", "E", "S"]  # 北京0 split as 北京 + 0
    result = run(tmp_path, {"cws": pd.concat([table, other], ignore_index=True)})
    assert result.tasks["cws"].conflicts == 1
    assert_rejected(tmp_path, result, "cws", "conflicting duplicates", says="tags differ at token 4: E | M")


# --- bad files through the real readers: each stopped with a message naming file and line -----------


def _bundled(tmp_path: Path, *names: str) -> ValidationResult:
    """Validate bundled tasks read from the raw files under tmp_path/data (write_raw's layout)."""
    labels = {"sentiment": SENTIMENT, "ner": ["PER", "LOC", "ORG"], "pos": ["n", "v", "nr", "ns", "nt", "w", "u",
                                                                            "a", "r", "d", "k", "Vg"]}
    types = {"sentiment": "classification", "ner": "token_classification", "pos": "token_classification"}
    tasks = {n: TaskConfig(type=types[n], bundled=n, labels=labels[n]) for n in names}
    cfg = Config(root=tmp_path, tasks=tasks, data=DataConfig(min_rows={"train": 1}, min_class_share=0.0))
    return validate(cfg)


def _stopped_at(result: ValidationResult, task: str, where: str) -> None:
    """The run failed for `task` and the terminal summary points at `where` (file:line)."""
    assert result.success is False and result.tasks[task].success is False
    assert where in result.summary(), result.summary()


def test_review_file_emptied_of_one_class(tmp_path: Path, tiny_raw: Path) -> None:
    raw = tiny_raw  # the conftest's raw files under tmp_path/data
    (raw / "sentiment" / "neg.txt").write_text("\n\n", encoding="utf-8")
    result = _bundled(tmp_path, "sentiment")
    _stopped_at(result, "sentiment", "sentiment/neg.txt:1")
    assert "negative" in result.summary()


def test_untagged_word_in_the_newspaper_file(tmp_path: Path, tiny_raw: Path) -> None:
    raw = tiny_raw
    newspaper = (raw / "peoples_daily" / "199801.txt").read_text(encoding="utf-8")
    lines = newspaper.split("\n")
    lines[1] = lines[1].replace("欢迎/v", "欢迎")
    (raw / "peoples_daily" / "199801.txt").write_text("\n".join(lines), encoding="utf-8")
    result = _bundled(tmp_path, "ner")
    _stopped_at(result, "ner", "peoples_daily/199801.txt:2")
    assert "'欢迎' is not word/tag" in result.summary()


def test_unknown_tag_in_the_newspaper_file(tmp_path: Path, tiny_raw: Path) -> None:
    raw = tiny_raw
    newspaper = (raw / "peoples_daily" / "199801.txt").read_text(encoding="utf-8")
    text = newspaper.replace("高兴/a", "高兴/zz")  # line 2; zz is no People's Daily tag
    (raw / "peoples_daily" / "199801.txt").write_text(text, encoding="utf-8")
    result = _bundled(tmp_path, "pos")
    _stopped_at(result, "pos", "peoples_daily/199801.txt:2")
    assert "B-zz" in result.summary()


def test_a_200000_character_line(tmp_path: Path, tiny_raw: Path) -> None:
    raw = tiny_raw  # the conftest's raw files under tmp_path/data
    with (raw / "sentiment" / "pos.txt").open("a", encoding="utf-8") as f:
        f.write("好" * 200_000 + "\n")  # line 4
    result = _bundled(tmp_path, "sentiment")
    _stopped_at(result, "sentiment", "sentiment/pos.txt:4")
    assert "text length within" in result.summary()
    assert len(result.summary()) < 5_000  # the line is cut in the report, not printed whole


def test_a_200000_character_newspaper_line(tmp_path: Path, tiny_raw: Path) -> None:
    raw = tiny_raw
    newspaper = (raw / "peoples_daily" / "199801.txt").read_text(encoding="utf-8")
    (raw / "peoples_daily" / "199801.txt").write_text(newspaper + "好/a  " * 100_000 + "\n", encoding="utf-8")
    result = _bundled(tmp_path, "ner")
    _stopped_at(result, "ner", "peoples_daily/199801.txt:4")


def test_conll_file_missing_its_blank_lines(tmp_path: Path) -> None:
    sentences = [["张", "三", "去", "北", "京", "。"], ["李", "四", "来", "上", "海", "。"], ["好", "！"]]
    tags = [["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"], ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"], ["O", "O"]]
    lines = [f"{tok}\t{tag}" for s, t in zip(sentences, tags) for tok, tag in zip(s, t)]  # no blank lines
    (tmp_path / "ner.conll").write_text("\n".join(lines) + "\n", encoding="utf-8")
    task = TaskConfig(type="token_classification", files={"all": Path("ner.conll")}, labels=["PER", "LOC"])
    result = validate(Config(root=tmp_path, tasks={"ner": task}, data=DataConfig(min_rows={"train": 1}, min_class_share=0.0)))
    _stopped_at(result, "ner", "ner.conll:7")  # where the second sentence starts
    assert "blank line" in result.summary()


def test_csv_with_a_ragged_row(tmp_path: Path) -> None:
    rows = ["text,label", "很好用,positive", "太差了,negative,extra", "一般,negative"]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    task = TaskConfig(type="classification", files={"all": Path("reviews.csv")}, labels=SENTIMENT)
    result = validate(Config(root=tmp_path, tasks={"reviews": task}, data=DataConfig(min_rows={"train": 1}, min_class_share=0.0)))
    _stopped_at(result, "reviews", "reviews.csv:3")
    assert "3 fields" in result.summary()


def test_csv_with_a_short_row(tmp_path: Path) -> None:
    rows = ["text,label,note", "很好用,positive,a", "太差了,negative", "一般,negative,c"]
    (tmp_path / "reviews.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    task = TaskConfig(type="classification", files={"all": Path("reviews.csv")}, labels=SENTIMENT)
    result = validate(Config(root=tmp_path, tasks={"reviews": task}, data=DataConfig(min_rows={"train": 1}, min_class_share=0.0)))
    _stopped_at(result, "reviews", "reviews.csv:3")


def test_mixed_label_types(tmp_path: Path) -> None:
    records = [{"text": "很好用", "label": "positive"}, {"text": "太差了", "label": 0}, {"text": "一般", "label": "negative"}]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (tmp_path / "reviews.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for labels in (SENTIMENT, []):  # declared classes, and classes taken from the data
        task = TaskConfig(type="classification", files={"all": Path("reviews.jsonl")}, labels=labels)
        result = validate(Config(root=tmp_path, tasks={"reviews": task}, data=DataConfig(min_rows={"train": 1}, min_class_share=0.0)))
        _stopped_at(result, "reviews", "reviews.jsonl:2")
