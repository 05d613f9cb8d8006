"""Readers: JSONL, CSV, CoNLL records with sources, and errors that name file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks_mtl.data.formats import DataFormatError, infer_format, read_records


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


def test_jsonl_classification_keeps_required_columns_and_lines(tmp_path):
    data = '{"text": "很好", "label": "positive", "id": 7}\n\n{"text": "差", "label": "negative"}\n'
    path = _write(tmp_path / "a.jsonl", data)
    records = read_records(path, None, "classification")
    assert records == [
        {"text": "很好", "label": "positive", "source": f"{path}:1"},
        {"text": "差", "label": "negative", "source": f"{path}:3"},
    ]


def test_jsonl_pairs_tokens_and_mlm(tmp_path):
    pair = _write(tmp_path / "p.jsonl", '{"text": "甲", "text_pair": "乙", "label": "is_next"}\n')
    assert read_records(pair, "jsonl", "pair_classification")[0]["text_pair"] == "乙"
    tok = _write(tmp_path / "t.jsonl", '{"tokens": ["北京", "好"], "tags": ["B-LOC", "O"]}\n')
    assert read_records(tok, "jsonl", "token_classification")[0]["tokens"] == ["北京", "好"]
    mlm = _write(tmp_path / "m.jsonl", '{"text": "只要文本", "label": "ignored"}\n')
    assert read_records(mlm, "jsonl", "mlm") == [{"text": "只要文本", "source": f"{mlm}:1"}]


def test_source_name_replaces_the_path(tmp_path):
    path = _write(tmp_path / "a.jsonl", '{"text": "好"}\n')
    assert read_records(path, None, "mlm", source_name="extra/a.jsonl")[0]["source"] == "extra/a.jsonl:1"


def test_csv_with_bom_crlf_and_quoted_newline(tmp_path):
    data = '\ufefftext,text_pair,label\r\n"第一行\r\n第二行",乙,is_next\r\n甲,丙,not_next\r\n'
    path = _write(tmp_path / "a.csv", data)
    records = read_records(path, None, "pair_classification")
    assert [r["text"] for r in records] == ["第一行\n第二行", "甲"]
    assert [r["source"] for r in records] == [f"{path}:2", f"{path}:4"]
    assert records[1] == {"text": "甲", "text_pair": "丙", "label": "not_next", "source": f"{path}:4"}


def test_conll_words_and_characters_with_tabs_and_extra_columns(tmp_path):
    data = "北京\tB-LOC\n欢迎 O\n\n\n-DOCSTART- O\n中 NN x B-ORG\n国 NN x I-ORG\n"
    path = _write(tmp_path / "a.conll", data)
    records = read_records(path, None, "token_classification")
    assert records == [
        {"tokens": ["北京", "欢迎"], "tags": ["B-LOC", "O"], "source": f"{path}:1"},
        {"tokens": ["中", "国"], "tags": ["B-ORG", "I-ORG"], "source": f"{path}:6"},
    ]


@pytest.mark.parametrize(
    "name,content,task_type,message",
    [
        ("bad.jsonl", b'{"text": "ok", "label": "x"}\n{"text": "\xe4\xb8", "label": "x"}\n', "classification",
         r"bad.jsonl:2: not valid UTF-8 at byte 39"),
        ("bad.jsonl", '{"text": "ok", "label": "x"}\n{"text": "oops"\n', "classification",
         r"bad.jsonl:2: invalid JSON"),
        ("bad.jsonl", '{"text": "ok", "score": 1}\n', "classification",
         r"bad.jsonl:1: missing column 'label' \(found: text, score\)"),
        ("bad.jsonl", '["text", "label"]\n', "classification", r"bad.jsonl:1: expected a JSON object"),
        ("bad.jsonl", '{"tokens": ["a", "b"], "tags": ["O"]}\n', "token_classification", r"bad.jsonl:1: 2 tokens but 1 tags"),
        ("bad.csv", "text,score\n好,1\n", "classification", r"bad.csv:1: missing column 'label' \(found: text, score\)"),
        ("bad.csv", "text,label\n好,positive\n差\n", "classification", r"bad.csv:3: row has no value for column 'label'"),
        ("bad.conll", "北 B-LOC\n京\n", "token_classification", r"bad.conll:2: CoNLL line without a tag"),
        ("bad.conll", "北 B-LOC\n", "classification", r"CoNLL files hold token data"),
        ("bad.parquet", "x", "classification", r"cannot tell the format"),
    ],
)
def test_errors_name_file_and_line(tmp_path, name, content, task_type, message):
    path = _write(tmp_path / name, content)
    with pytest.raises(DataFormatError, match=message):
        read_records(path, None, task_type)


def test_infer_format():
    assert infer_format(Path("x.JSONL")) == "jsonl"
    assert infer_format(Path("x.csv")) == "csv"
    assert infer_format(Path("x.bio")) == "conll"
