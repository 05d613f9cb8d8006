"""`mtl predict`: JSONL requests in, JSONL records out, through a `Predictor` (tasks_mtl.predict) of a checkpoint
directory or a registry model."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tasks_mtl.predict import Predictor


def read_requests(lines: Iterable[str]) -> tuple[list[tuple[int, dict]], list[tuple[int, str, str]]]:
    """JSONL request lines -> (line number, record) of the good ones and (line number, line, problem) of the
    bad ones. A record needs a non-empty string `text`; `text_pair` is a string or absent; other fields are
    kept. A UTF-8 byte-order mark at the start is ignored; blank lines are skipped."""
    rows, bad = [], []
    for n, line in enumerate(lines, 1):
        line = line.lstrip("\ufeff") if n == 1 else line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            bad.append((n, line.rstrip("\n"), f"not valid JSON ({err.msg})"))
            continue
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            bad.append((n, line.rstrip("\n"), "each line needs a non-empty string field `text`"))
        elif row.get("text_pair") is not None and not isinstance(row["text_pair"], str):
            bad.append((n, line.rstrip("\n"), "`text_pair` must be a string"))
        else:
            rows.append((n, row))
    return rows, bad


def model_location(cfg, model_uri: str | None) -> Path:
    """A checkpoint directory as given, else the registry's copy of a models:/ URI (default: the champion)."""
    if model_uri and Path(model_uri).is_dir():
        return Path(model_uri)
    from tasks_mtl.registry import resolve_model_dir

    return resolve_model_dir(cfg, model_uri)


def predict_file(cfg, input: str | Path, output: str | Path, model_uri: str | None = None, batch_size: int = 32,
                 errors: Path | None = None, chunk: int = 512,
                 quantize: bool = False, precision: str = "auto") -> tuple[int, list[tuple[int, str, str]]]:
    """`mtl predict`: JSONL in, JSONL out (`-` = stdin / stdout), every input field kept and one key per task
    added; the model is a checkpoint dir or a registry URI (default champion). Bad lines are skipped and
    returned as (line number, line, problem), and written to `errors` as JSONL when given. A progress bar
    goes to stderr when it is a terminal; `quantize` loads the model with int8 Linear layers (`quantize_linear`),
    `precision` is the Predictor's.
    Returns (records written, bad lines)."""
    import contextlib
    import io
    import sys

    if str(input) == "-":
        lines = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig").read().splitlines()
    else:
        lines = Path(input).read_text(encoding="utf-8-sig").splitlines()
    rows, bad = read_requests(lines)
    if errors is not None:
        errors.parent.mkdir(parents=True, exist_ok=True)
        errors.write_text("".join(json.dumps({"line": n, "error": why, "input": raw}, ensure_ascii=False) + "\n"
                                  for n, raw, why in bad), encoding="utf-8")
    predictor = (Predictor.from_dir(model_location(cfg, model_uri), batch_size=batch_size, quantize=quantize,
                                    precision=precision) if rows else None)
    with contextlib.ExitStack() as stack:
        if str(output) == "-":
            fh = sys.stdout
        else:
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(Path(output).open("w", encoding="utf-8"))
        progress = None
        if sys.stderr.isatty() and len(rows) > chunk:
            from rich.console import Console
            from rich.progress import Progress

            progress = stack.enter_context(Progress(console=Console(stderr=True), transient=True))
            bar = progress.add_task("predicting", total=len(rows))
        for i in range(0, len(rows), chunk):
            part = [row for _, row in rows[i:i + chunk]]
            pairs = [row.get("text_pair") for row in part]
            records = predictor.predict([row["text"] for row in part], pairs if any(p is not None for p in pairs) else None)
            for row, record in zip(part, records):
                fh.write(json.dumps(row | record, ensure_ascii=False) + "\n")
            if progress is not None:
                progress.update(bar, advance=len(part))
        fh.flush()
    return len(rows), bad
