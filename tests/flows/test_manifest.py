"""`mtl ingest --manifest`: describes data/ without writing into it."""

import json

from typer.testing import CliRunner

from tasks_mtl.cli import app
from tasks_mtl.data.ingest import ingest


def test_manifest_matches_fresh_ingest_and_flags_edits(tmp_path):
    raw = tmp_path / "data"
    ingest(raw)
    before = {p: p.stat().st_mtime_ns for p in raw.rglob("*")}
    out = tmp_path / "reports" / "data_manifest.json"
    result = CliRunner().invoke(app, ["ingest", "--out", str(raw), "--manifest", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads(out.read_text(encoding="utf-8"))
    assert manifest["matches_source"] is True and manifest["missing"] == []
    assert manifest["files"]["sentiment/pos.txt"]["lines"] == 16548
    assert {p: p.stat().st_mtime_ns for p in raw.rglob("*")} == before  # data/ untouched

    with (raw / "sentiment" / "pos.txt").open("a", encoding="utf-8") as fh:
        fh.write("新加的一行\n")
    (raw / "sentiment" / "neg.txt").unlink()
    result = CliRunner().invoke(app, ["ingest", "--out", str(raw), "--manifest", str(out)])
    manifest = json.loads(out.read_text(encoding="utf-8"))
    assert manifest["matches_source"] is False
    assert manifest["files"]["sentiment/pos.txt"]["matches_source"] is False
    assert manifest["missing"] == ["sentiment/neg.txt"]


def test_manifest_without_data_fails_clearly(tmp_path):
    result = CliRunner().invoke(app, ["ingest", "--out", str(tmp_path / "nope"), "--manifest", str(tmp_path / "m.json")])
    assert result.exit_code == 1 and "mtl ingest" in result.output
