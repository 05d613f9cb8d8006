"""Data validation with Great Expectations: stop a bad data file before it reaches training.

Every task's table (one row per record, as `tasks_mtl.data.tables.load_task_table` reads it)
is checked by one expectation suite per task type. Checks that are not built into GX are
expressed as built-in expectations on derived columns (`n_chars`, `unknown_tag`,
`tag_error`, `split_count_of_key`, ...) or on small derived frames (one row per distinct
input for conflicting labels, one per split for row counts, one per split and class for class
shares), so GX does the judging and the reporting while pandas does the cheap derivation.

The outcome is written to `reports/validation.json` (machine readable) and
`reports/validation.html` (a person reads it), and `ValidationResult.summary()` names each
failed expectation with example rows, so the CLI can stop the run with a useful message.

Great Expectations takes seconds to import, so it is imported inside `_Runner` only.
"""

from __future__ import annotations

import html
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks_mtl.config import SPLITS, Config, TaskConfig

MAX_CONFLICT_SHARE = 0.01  # conflicting duplicates are dropped by prepare; more than 1% means a broken file
MAX_EXAMPLES = 5  # example rows shown per failed expectation
MAX_VALUE_CHARS = 80  # long texts are cut in reports; the source (file:line) finds the rest

REQUIRED_COLUMNS: dict[str, list[str]] = {
    "classification": ["text", "label"],
    "pair_classification": ["text", "text_pair", "label"],
    "token_classification": ["tokens", "tags"],
    "mlm": ["text"],
}
COMMON_COLUMNS = ["split", "source", "key"]  # added by the table loader for every task type

Loader = Callable[[Config, str], pd.DataFrame]


@dataclass
class ExpectationResult:
    """One checked expectation: what it checks, whether it held, and rows that broke it."""

    name: str  # human name, e.g. "labels in declared set"
    expectation: str  # GX expectation type, e.g. "expect_column_values_to_be_in_set"
    success: bool
    column: str | None = None  # the (derived) column or frame the expectation ran on
    observed: Any = None  # GX observed value for aggregate expectations
    unexpected_count: int | None = None
    element_count: int | None = None
    examples: list[dict[str, str]] = field(default_factory=list)  # {"source", "value"[, "key"]}
    message: str = ""  # one line for people

    def describe(self) -> str:
        lines = [f"{self.name} ({self.expectation}): {self.message}"]
        for ex in self.examples:
            lines.append(f"      {ex.get('source', '?')}: {ex.get('value', '')}")
        return "\n".join(lines)


@dataclass
class TaskResult:
    name: str
    type: str
    success: bool
    rows: int = 0
    duplicates: int = 0  # rows repeating an earlier (input, label) exactly
    conflicts: int = 0  # distinct inputs seen with more than one label
    expectations: list[ExpectationResult] = field(default_factory=list)

    @property
    def failed(self) -> list[ExpectationResult]:
        return [e for e in self.expectations if not e.success]


@dataclass
class ValidationResult:
    success: bool
    tasks: dict[str, TaskResult]
    seconds: float = 0.0

    def summary(self) -> str:
        """Short text for the terminal: one line per task, each failed expectation with examples."""
        failed = [t for t in self.tasks.values() if not t.success]
        if self.success:
            head = "validation passed"
        else:
            head = f"validation FAILED ({len(failed)} of {len(self.tasks)} tasks)"
        lines = [f"{head} in {self.seconds:.1f}s"]
        for task in self.tasks.values():
            status = "ok" if task.success else "FAILED"
            lines.append(
                f"  {task.name} ({task.type}): {status}; {task.rows} rows, "
                f"{task.duplicates} duplicates, {task.conflicts} conflicting inputs"
            )
            for exp in task.failed:
                lines.append("    - " + exp.describe())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "success": self.success,
            "seconds": round(self.seconds, 3),
            "tasks": {
                name: {
                    "type": t.type,
                    "success": t.success,
                    "rows": t.rows,
                    "duplicates": t.duplicates,
                    "conflicts": t.conflicts,
                    "expectations": [asdict(e) for e in t.expectations],
                }
                for name, t in self.tasks.items()
            },
        }


def validate(cfg: Config, loader: Loader | None = None) -> ValidationResult:
    """Validate every configured task's data and write validation.json/html to the reports dir.

    `loader` reads one task's table; it defaults to `tasks_mtl.data.tables.load_task_table`
    (tests pass in-memory tables). A file that cannot be read becomes a failed "readable"
    expectation for its task rather than a crash, so one report lists every problem.
    """
    start = time.perf_counter()
    if loader is None:
        from tasks_mtl.data.tables import load_task_table

        loader = load_task_table
    read_errors = _read_errors()
    runner = _Runner()
    tasks: dict[str, TaskResult] = {}
    for name, task in cfg.tasks.items():
        try:
            table = loader(cfg, name)
        except read_errors as err:
            # Not a GX expectation: the reader itself refused the file (bad bytes, broken JSON, ...).
            unreadable = ExpectationResult(
                name="readable", expectation="load_task_table", success=False, message=str(err)
            )
            tasks[name] = TaskResult(name=name, type=task.type, success=False, expectations=[unreadable])
            continue
        tasks[name] = runner.validate_table(cfg, name, task, table)
    result = ValidationResult(
        success=all(t.success for t in tasks.values()),
        tasks=tasks,
        seconds=time.perf_counter() - start,
    )
    write_reports(result, cfg.path(cfg.reports_dir))
    return result


def _read_errors() -> tuple[type[BaseException], ...]:
    from tasks_mtl.data.formats import DataFormatError

    return (DataFormatError, FileNotFoundError, UnicodeDecodeError)


# --- derivation: pandas does the cheap work, GX judges --------------------------------------


def _is_seq(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or type(value).__name__ == "ndarray"


def _lengths(values: pd.Series) -> pd.Series:
    """Length of each list cell, None for a non-list (object dtype: counts stay integers in reports,
    and GX's pandas metrics cannot handle the nullable Int64 NA)."""
    return pd.Series([len(v) if _is_seq(v) else None for v in values], index=values.index, dtype=object)


def _identity_columns(task: TaskConfig) -> list[str]:
    """Columns that make two rows 'the same input' (a pair is both texts, not only the first)."""
    return {"pair_classification": ["text", "text_pair"], "token_classification": ["key", "token_text"]}.get(
        task.type, ["key"]
    )


def _conflict_text(targets: pd.Series, tagged: bool) -> str:
    """The labels one input carries; for tag sequences, the first position where they differ."""
    values = sorted({str(v) for v in targets})
    sequences = [v.split(" ") for v in values]
    if tagged and len({len(seq) for seq in sequences}) == 1:
        at = next(i for i in range(len(sequences[0])) if len({seq[i] for seq in sequences}) > 1)
        return f"tags differ at token {at}: " + " | ".join(seq[at] for seq in sequences)
    return "labels: " + " | ".join(values)


def derive_rows(table: pd.DataFrame, task: TaskConfig) -> pd.DataFrame:
    """Add the helper columns the row-level expectations run on."""
    df = table.reset_index(drop=True).copy()
    df["split_count_of_key"] = df.groupby("key", dropna=True)["split"].transform("nunique")
    if task.type == "token_classification":
        from tasks_mtl.data.tagging import validate_sequence

        allowed = set(task.tag_set())
        df["n_tokens"] = _lengths(df["tokens"])
        df["n_tags"] = _lengths(df["tags"])
        n_chars = [len("".join(map(str, v))) if _is_seq(v) else None for v in df["tokens"]]
        df["n_chars"] = pd.Series(n_chars, index=df.index, dtype=object)
        df["unknown_tag"] = [
            next((str(t) for t in v if t not in allowed), None) if _is_seq(v) else None for v in df["tags"]
        ]
        typed = bool(task.labels)  # ner/pos tags carry types (B-PER), cws tags do not (B/M/E/S)
        checked: dict[tuple, str | None] = {}  # many sentences share a tag sequence (all O, ...)

        def tag_error(tags: Any) -> str | None:
            if not _is_seq(tags):
                return None
            seq = tuple(tags)
            if seq not in checked:
                checked[seq] = validate_sequence(seq, task.scheme, typed=typed)
            return checked[seq]

        df["tag_error"] = [tag_error(v) for v in df["tags"]]
        df["token_text"] = [" ".join(map(str, v)) if _is_seq(v) else None for v in df["tokens"]]
        df["target"] = [" ".join(map(str, v)) if _is_seq(v) else None for v in df["tags"]]
    elif task.type in ("classification", "pair_classification"):
        df["target"] = df["label"]
    return df


def derive_inputs(df: pd.DataFrame, task: TaskConfig) -> tuple[pd.DataFrame, int]:
    """One row per distinct input with how many different labels it carries; and the duplicate count."""
    ident = _identity_columns(task)
    if "target" not in df.columns:  # mlm: nothing to conflict, duplicates are repeated texts
        empty = pd.DataFrame(columns=["source", "key", "n_labels", "labels"])
        return empty, int(df.duplicated(subset=ident).sum())
    duplicates = int(df.duplicated(subset=[*ident, "target"]).sum())
    grouped = df.groupby(ident, dropna=False, sort=True)
    inputs = pd.DataFrame(
        {
            "source": grouped["source"].first(),
            "key": grouped["key"].first(),
            "n_labels": grouped["target"].nunique(),
        }
    )
    # Spell out the labels only where they conflict: joining them for every input costs seconds.
    conflicting = inputs.index[inputs["n_labels"] > 1]
    labels = pd.Series(None, index=inputs.index, dtype=object)
    if len(conflicting):
        rows = df.set_index(ident).loc[conflicting, "target"]
        joined = rows.groupby(level=list(range(len(ident))), dropna=False).agg(
            _conflict_text, tagged=task.type == "token_classification"
        )
        labels.loc[joined.index] = joined.values
    inputs["labels"] = labels
    return inputs.reset_index(drop=True), duplicates


def derive_splits(df: pd.DataFrame, cfg: Config) -> pd.DataFrame:
    """Rows per split next to the configured minimum (an empty split says so in `detail`)."""
    counts = df["split"].value_counts()
    rows = []
    for split in SPLITS:
        if split not in cfg.data.min_rows:
            continue
        n, minimum = int(counts.get(split, 0)), int(cfg.data.min_rows[split])
        if n == 0:
            detail = f"split '{split}' is empty (0 rows, minimum {minimum})"
        else:
            detail = f"split '{split}' has {n} rows (minimum {minimum})"
        rows.append({"split": split, "rows": n, "min_rows": minimum, "detail": detail})
    return pd.DataFrame(rows, columns=["split", "rows", "min_rows", "detail"])


def derive_classes(df: pd.DataFrame, task: TaskConfig, cfg: Config) -> pd.DataFrame:
    """Share of each class per non-empty split; declared classes that never occur get share 0."""
    classes = list(task.labels) or sorted({str(v) for v in df["label"].dropna()})
    rows = []
    for split in SPLITS:
        labels = df.loc[df["split"] == split, "label"]
        if labels.empty:
            continue  # the split check reports empty splits
        counts = labels.value_counts()
        for cls in classes:
            n = int(counts.get(cls, 0))
            share = n / len(labels)
            detail = (
                f"class '{cls}' is {share:.1%} of split '{split}' "
                f"({n} of {len(labels)} rows; minimum {cfg.data.min_class_share:.1%})"
            )
            rows.append({"split": split, "label": cls, "rows": n, "share": share, "detail": detail})
    return pd.DataFrame(rows, columns=["split", "label", "rows", "share", "detail"])


# --- the GX side -----------------------------------------------------------------------------


class _Runner:
    """One ephemeral GX context with a pandas asset per frame kind; validates task tables."""

    FRAMES = {  # frame kind -> columns GX reports for each unexpected row
        "rows": ["source", "key"],
        "inputs": ["source", "key", "labels"],
        "splits": ["split", "detail"],
        "classes": ["split", "label", "detail"],
    }

    def __init__(self) -> None:
        import great_expectations as gx
        import great_expectations.expectations as gxe
        from great_expectations.data_context.types.base import (
            DataContextConfig,
            InMemoryStoreBackendDefaults,
            ProgressBarsConfig,
        )

        self.gx, self.gxe = gx, gxe
        project = DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),  # no data docs
            progress_bars=ProgressBarsConfig(globally=False),  # tqdm bars per suite would flood the CLI
        )
        self.context = gx.get_context(mode="ephemeral", project_config=project)
        source = self.context.data_sources.add_pandas("tables")
        self.batches = {
            kind: source.add_dataframe_asset(name=kind).add_batch_definition_whole_dataframe("whole")
            for kind in self.FRAMES
        }

    def run(
        self, kind: str, frame: pd.DataFrame, suite_name: str, checks: list[Any]
    ) -> list[ExpectationResult]:
        """Validate `frame` against one suite of `checks`; results in the order of `checks`."""
        if not checks:
            return []
        suite = self.gx.ExpectationSuite(name=suite_name)
        for position, check in enumerate(checks):
            check.meta = {**(check.meta or {}), "position": position}  # ids exist only in stored suites
            suite.add_expectation(check)
        batch = self.batches[kind].get_batch(batch_parameters={"dataframe": frame})
        index_columns = [c for c in self.FRAMES[kind] if c in frame.columns]
        outcome = batch.validate(
            suite,
            result_format={
                "result_format": "SUMMARY",
                "partial_unexpected_count": MAX_EXAMPLES,
                "unexpected_index_column_names": index_columns,
            },
        )
        # GX may reorder results; report them in the order the checks were declared.
        ordered = sorted(outcome.results, key=lambda r: r.expectation_config.meta["position"])
        return [_to_result(r) for r in ordered]

    def validate_table(self, cfg: Config, name: str, task: TaskConfig, table: pd.DataFrame) -> TaskResult:
        gxe = self.gxe
        required = [*REQUIRED_COLUMNS[task.type], *COMMON_COLUMNS]
        exists = [gxe.ExpectColumnToExist(column=c, description=f"column '{c}' exists") for c in required]
        # Column checks need only the header, so GX gets an empty frame with the table's columns.
        results = self.run("rows", table.iloc[:0], f"{name}-columns", exists)
        if not all(r.success for r in results):
            # Without the columns nothing else can be derived; the report says which are missing.
            return TaskResult(name=name, type=task.type, success=False, rows=len(table), expectations=results)

        df = derive_rows(table, task)
        inputs, duplicates = derive_inputs(df, task)
        conflicts = int((inputs["n_labels"] > 1).sum()) if len(inputs) else 0
        # List columns make GX fingerprint the batch by pickling it (seconds per call); the checks
        # read their derived columns instead, so GX gets the frame without them.
        slim = df.drop(columns=[c for c in ("tokens", "tags", "token_text", "target") if c in df.columns])
        results += self.run("rows", slim, f"{name}-rows", self._row_checks(cfg, task))
        if "target" in df.columns:
            conflict_check = gxe.ExpectColumnValuesToBeBetween(
                column="n_labels",
                max_value=1,
                mostly=1 - MAX_CONFLICT_SHARE,
                description=f"conflicting duplicates (same input, different labels) "
                f"at most {MAX_CONFLICT_SHARE:.0%} of inputs",
            )
            results += self.run("inputs", inputs, f"{name}-inputs", [conflict_check])
        rows_check = gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="rows",
            column_B="min_rows",
            or_equal=True,
            description="minimum rows per split (data.min_rows)",
        )
        results += self.run("splits", derive_splits(df, cfg), f"{name}-splits", [rows_check])
        if task.type in ("classification", "pair_classification"):
            share = cfg.data.min_class_share
            share_check = gxe.ExpectColumnValuesToBeBetween(
                column="share",
                min_value=share,
                description=f"minimum share per class in each split (data.min_class_share {share:.0%})",
            )
            results += self.run("classes", derive_classes(df, task, cfg), f"{name}-classes", [share_check])
        return TaskResult(
            name=name,
            type=task.type,
            success=all(r.success for r in results),
            rows=len(df),
            duplicates=duplicates,
            conflicts=conflicts,
            expectations=results,
        )

    def _row_checks(self, cfg: Config, task: TaskConfig) -> list[Any]:
        """Expectations on the per-row table and its derived columns."""
        gxe = self.gxe
        lo, hi = cfg.data.min_chars, cfg.data.max_chars
        length = f"length within {lo}..{hi} characters"
        checks: list[Any] = [
            gxe.ExpectColumnValuesToBeInSet(
                column="split", value_set=list(SPLITS), description="split is train/validation/test"
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="split_count_of_key", max_value=1, description="no key in two splits (leakage)"
            ),
        ]
        text_columns = {"pair_classification": ["text", "text_pair"], "token_classification": []}
        for col in text_columns.get(task.type, ["text"]):
            checks += [
                gxe.ExpectColumnValuesToNotBeNull(column=col, description=f"{col} not null"),
                gxe.ExpectColumnValuesToNotMatchRegex(
                    column=col, regex=r"^\s*$", description=f"{col} not empty"
                ),
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column=col, min_value=lo, max_value=hi, description=f"{col} {length}"
                ),
            ]
        if task.type in ("classification", "pair_classification"):
            checks.append(gxe.ExpectColumnValuesToNotBeNull(column="label", description="label not null"))
            if task.labels:
                checks.append(
                    gxe.ExpectColumnValuesToBeInSet(
                        column="label", value_set=list(task.labels), description="labels in declared set"
                    )
                )
            checks.append(
                gxe.ExpectColumnUniqueValueCountToBeBetween(
                    column="label",
                    min_value=2,
                    description="at least two classes (one class only cannot be learned)",
                )
            )
        if task.type == "token_classification":
            checks += [
                gxe.ExpectColumnValuesToNotBeNull(column="n_tokens", description="tokens is a list"),
                gxe.ExpectColumnValuesToNotBeNull(column="n_tags", description="tags is a list"),
                gxe.ExpectColumnValuesToBeBetween(
                    column="n_tokens", min_value=1, description="tokens not empty"
                ),
                gxe.ExpectColumnPairValuesToBeEqual(
                    column_A="n_tokens", column_B="n_tags", description="tokens and tags of equal length"
                ),
                gxe.ExpectColumnValuesToBeBetween(
                    column="n_chars", min_value=lo, max_value=hi, description=f"text {length}"
                ),
                gxe.ExpectColumnValuesToBeNull(column="unknown_tag", description="tags in declared tag set"),
                gxe.ExpectColumnValuesToBeNull(
                    column="tag_error", description=f"tag sequences well-formed under {task.scheme}"
                ),
            ]
        return checks


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, tuple) else str(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


def _plain(value: Any) -> Any:
    """Turn numpy scalars and tuples from GX results into JSON-friendly values."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        try:
            return value.item()
        except (ValueError, AttributeError):
            return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _exception_message(info: dict | None) -> str | None:
    """GX reports an error either flat or keyed by the metric that raised it."""
    if not info:
        return None
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, dict)]
    messages = [str(e.get("exception_message")) for e in entries if e.get("raised_exception")]
    return "; ".join(messages) or None


def _to_result(r: Any) -> ExpectationResult:
    """Map a GX ExpectationValidationResult to the project's report record."""
    config = r.expectation_config
    kwargs = config.kwargs
    checked = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    res = r.result or {}
    out = ExpectationResult(
        name=config.description or config.type,
        expectation=config.type,
        success=bool(r.success),
        column=",".join(checked) or None,
        observed=_plain(res.get("observed_value")),
        unexpected_count=_plain(res.get("unexpected_count")),
        element_count=_plain(res.get("element_count")),
    )
    for row in (res.get("partial_unexpected_index_list") or [])[:MAX_EXAMPLES]:
        if not isinstance(row, dict):
            continue
        if "source" in row:
            where = str(row["source"])
        else:
            where = " ".join(f"{k}={row[k]}" for k in ("split", "label") if k in row)
        if "detail" in row:
            value = str(row["detail"])
        elif "labels" in row:
            value = str(row["labels"])
        else:
            value = " vs ".join(f"{c}={_short(_plain(row.get(c)))}" for c in checked)
        example = {"source": where, "value": _short(value) if "detail" not in row else value}
        if "key" in row and row["key"] is not None:
            example["key"] = _short(row["key"])
        out.examples.append(example)
    error = _exception_message(r.exception_info)
    if error:
        out.success = False
        out.message = f"could not be evaluated: {error}"
    elif config.type == "expect_column_to_exist":
        out.message = "present" if out.success else f"column '{kwargs.get('column')}' is missing"
    elif out.unexpected_count is not None:
        total = out.element_count or 0
        pct = res.get("unexpected_percent") or 0.0
        out.message = f"{out.unexpected_count} of {total} unexpected ({pct:.2f}%)"
    else:
        out.message = f"observed {out.observed}"
    return out


# --- reports ---------------------------------------------------------------------------------


def write_reports(result: ValidationResult, reports_dir: Path) -> tuple[Path, Path]:
    """Write validation.json and validation.html; contents depend only on the data (and timing)."""
    reports_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = reports_dir / "validation.json", reports_dir / "validation.html"
    report = json.dumps(result.to_dict(), ensure_ascii=False, indent=2, default=str)
    json_path.write_text(report + "\n", encoding="utf-8")
    html_path.write_text(render_html(result), encoding="utf-8")
    return json_path, html_path


_CSS = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin-bottom: 2em; width: 100%; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
tr.fail { background: #fde2e2; }
tr.pass { background: #eef8ee; }
.examples { font-family: monospace; font-size: 90%; }
"""


def render_html(result: ValidationResult) -> str:
    """A self-contained page: one table per task, failed expectations highlighted with examples."""
    esc = html.escape
    status = "passed" if result.success else "FAILED"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>mtl-zh data validation</title>',
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Data validation: {status}</h1>",
        f"<p>{len(result.tasks)} tasks checked in {result.seconds:.1f}s.</p>",
    ]
    for task in result.tasks.values():
        parts.append(
            f"<h2>{esc(task.name)} ({esc(task.type)}): {'passed' if task.success else 'FAILED'}</h2>"
            f"<p>{task.rows} rows, {task.duplicates} duplicates, {task.conflicts} conflicting inputs</p>"
        )
        parts.append("<table><tr><th>check</th><th>expectation</th><th>result</th><th>examples</th></tr>")
        for exp in task.expectations:
            examples = "<br>".join(
                esc(f"{ex.get('source', '')}: {ex.get('value', '')}") for ex in exp.examples
            )
            parts.append(
                f'<tr class="{"pass" if exp.success else "fail"}"><td>{esc(exp.name)}</td>'
                f"<td>{esc(exp.expectation)}</td><td>{esc(exp.message)}</td>"
                f'<td class="examples">{examples}</td></tr>'
            )
        parts.append("</table>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
