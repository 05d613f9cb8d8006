"""Readers for user-supplied task files: JSONL, CSV and CoNLL.

Each reader returns plain records (`text`/`text_pair`/`label`, `tokens`/`tags`, or `text` for
MLM) plus `source` = "<file>:<line>", so a validation report can point at the exact line.
Anything a reader cannot parse raises DataFormatError naming file and line: a broken file
stops the run here instead of surfacing as an odd loss curve later.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv",
    ".conll": "conll", ".bio": "conll", ".bmes": "conll", ".tsv": "conll", ".txt": "conll",
}
# Columns a record of each task type must have; JSONL token data uses tokens/tags lists.
REQUIRED = {
    "classification": ("text", "label"),
    "pair_classification": ("text", "text_pair", "label"),
    "token_classification": ("tokens", "tags"),
    "mlm": ("text",),
}
CONLL_SKIP_PREFIX = "-DOCSTART-"  # CoNLL-2003 document markers carry no tokens
SENTENCE_ENDS = frozenset("。！？!?")  # a token after one of these starts a new sentence (see _read_conll)
CLOSERS = frozenset("”’」』）)\"'")  # closing quotes and brackets still belong to the sentence before


class DataFormatError(ValueError):
    """A data file that cannot be read; the message names the file and line."""


def infer_format(path: Path) -> str:
    """Format from the file suffix; a suffix we do not know is an error, not a guess."""
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DataFormatError(
            f"{path}: cannot tell the format from suffix {path.suffix!r}; set `format:` "
            f"(jsonl, csv or conll) in the task's configuration"
        )
    return fmt


def read_text(path: Path, name: str | None = None) -> list[str]:
    """Lines of a UTF-8 file (BOM dropped, \\r\\n and \\r normalised); bad bytes name their offset."""
    name = name or str(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{name}:{line}: not valid UTF-8 at byte {err.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_records(
    path: Path, fmt: str | None, task_type: str, *, source_name: str | None = None
) -> list[dict]:
    """Records of one file for a task of `task_type`; `source_name` is how `source` names the file."""
    path = Path(path)
    if task_type not in REQUIRED:
        raise ValueError(f"unknown task type {task_type!r}")
    fmt = fmt or infer_format(path)
    name = source_name or str(path)
    lines = read_text(path, name)
    if fmt == "jsonl":
        return _read_jsonl(lines, name, task_type)
    if fmt == "csv":
        return _read_csv(lines, name, task_type)
    if fmt == "conll":
        if task_type != "token_classification":
            raise DataFormatError(f"{name}: CoNLL files hold token data, but this is a {task_type} task")
        return _read_conll(lines, name)
    raise DataFormatError(f"{name}: unknown format {fmt!r}; use jsonl, csv or conll")


def _read_jsonl(lines: list[str], name: str, task_type: str) -> list[dict]:
    required = REQUIRED[task_type]
    records = []
    first_label: tuple[str, int] | None = None  # (type name, line) of the first label
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            message = f"invalid JSON ({err.msg} at column {err.colno})"
            raise DataFormatError(f"{name}:{number}: {message}") from None
        if not isinstance(obj, dict):
            raise DataFormatError(f"{name}:{number}: expected a JSON object, got {type(obj).__name__}")
        missing = [c for c in required if c not in obj]
        if missing:
            raise DataFormatError(
                f"{name}:{number}: missing column {missing[0]!r} (found: {', '.join(obj) or 'none'})"
            )
        record = {c: obj[c] for c in required}
        if "label" in record:  # 1 and "1" are different classes to every later step
            kind = type(record["label"]).__name__
            first_label = first_label or (kind, number)
            if kind != first_label[0]:
                raise DataFormatError(f"{name}:{number}: label {record['label']!r} is a {kind}, but the label "
                                      f"on line {first_label[1]} is a {first_label[0]} (mixed label types)")
        if task_type == "token_classification":
            _check_token_lists(record, name, number)
        record["source"] = f"{name}:{number}"
        records.append(record)
    return records


def _check_token_lists(record: dict, name: str, number: int) -> None:
    tokens, tags = record["tokens"], record["tags"]
    if not (isinstance(tokens, list) and isinstance(tags, list)):
        raise DataFormatError(f"{name}:{number}: `tokens` and `tags` must be lists")
    if not all(isinstance(x, str) for x in (*tokens, *tags)):
        raise DataFormatError(f"{name}:{number}: `tokens` and `tags` must hold strings")
    if len(tokens) != len(tags):
        raise DataFormatError(f"{name}:{number}: {len(tokens)} tokens but {len(tags)} tags")


def _read_csv(lines: list[str], name: str, task_type: str) -> list[dict]:
    if task_type == "token_classification":
        raise DataFormatError(f"{name}: token data must be CoNLL or JSONL (tokens/tags lists), not CSV")
    required = REQUIRED[task_type]
    reader = csv.DictReader(io.StringIO("\n".join(lines), newline=""))
    found = reader.fieldnames or []
    missing = [c for c in required if c not in found]
    if missing:
        listed = ", ".join(found) or "none"
        raise DataFormatError(f"{name}:1: missing column {missing[0]!r} (found: {listed})")
    records = []
    start = reader.line_num + 1  # physical line where the next record begins
    for row in reader:
        empty = [c for c in required if row.get(c) is None]
        if empty:
            raise DataFormatError(f"{name}:{start}: row has no value for column {empty[0]!r}")
        fields = len(found) + len(row.get(None) or []) - sum(row[c] is None for c in found)
        if fields != len(found):  # DictReader files extra fields under None and fills missing ones with None
            raise DataFormatError(f"{name}:{start}: row has {fields} fields, the header has {len(found)}")
        records.append({**{c: row[c] for c in required}, "source": f"{name}:{start}"})
        start = reader.line_num + 1
    return records


def _read_conll(lines: list[str], name: str) -> list[dict]:
    records: list[dict] = []
    tokens: list[str] = []
    tags: list[str] = []
    first = 0
    second: int | None = None  # line of the first token after a sentence end inside a record

    def flush() -> None:
        if tokens:
            records.append({"tokens": list(tokens), "tags": list(tags), "source": f"{name}:{first}"})
            tokens.clear()
            tags.clear()

    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            flush()
            continue
        if fields[0].startswith(CONLL_SKIP_PREFIX):
            continue
        if len(fields) < 2:
            raise DataFormatError(f"{name}:{number}: CoNLL line without a tag: {line.strip()!r}")
        if not tokens:
            first = number
        tokens.append(fields[0])  # first column: the token; last column: its tag
        tags.append(fields[-1])
        if len(tokens) > 1 and tokens[-2] in SENTENCE_ENDS and fields[0] not in SENTENCE_ENDS | CLOSERS:
            second = second or number  # a sentence starts inside a record
    flush()
    if len(records) == 1 and second is not None:  # not one blank line: the file's sentences ran together
        raise DataFormatError(f"{name}:{second}: a new sentence starts here without a blank line before it; "
                              f"the file has no blank lines, so all its {len(records[0]['tokens'])} tokens "
                              f"would be one sentence (CoNLL needs a blank line after each sentence)")
    return records
