"""Serving as a user runs it, on a trained tiny checkpoint: `mtl serve` as a real server process on 127.0.0.1
(good and bad requests over HTTP, a bounded fuzz of the endpoint: bad input gets a 4xx naming the record and
the problem, never a traceback, and the server keeps answering) and `mtl predict` in a shell pipe."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest
import torch
from e2e_helpers import BIN, env_for, free_port, wait_healthy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks_mtl.model import bf16_fast
from tasks_mtl.serve import MAX_RECORDS, MAX_TEXT_CHARS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tiny_project import make_tiny_project

    from tasks_mtl.tokenization import tokenize
    from tasks_mtl.train import train_all

    root = tmp_path_factory.mktemp("serve")
    cfg = make_tiny_project(root, {"training": {"stages": [{"name": "joint", "steps": 4}]}})
    tokenize(cfg)
    return train_all(cfg)


@pytest.fixture(scope="module")
def server(checkpoint):
    root = checkpoint.parent.parent
    port = free_port()
    proc = subprocess.Popen([str(BIN / "mtl"), "serve", "--model", str(checkpoint), "--port", str(port)],
                            cwd=root, env=env_for(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(f"{base}/health", proc, "mtl serve", timeout=120, log=lambda: (proc.kill(), proc.stdout.read())[1])
    client = httpx.Client(base_url=base, timeout=30)
    yield client
    client.close()
    proc.terminate()
    proc.wait(timeout=20)


def _no_traceback(response: httpx.Response) -> None:
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text


def test_health_names_the_model_and_its_tasks(server):
    body = server.get("/health").json()
    assert body["status"] == "ok" and set(body["tasks"]) == {"sentiment", "ner", "cws", "nsp", "mlm"}
    assert body["precision"] == ("bf16" if bf16_fast(torch.device("cpu")) else "fp32")  # auto: bf16 where native


def test_good_records_come_back_with_every_task_and_their_own_fields(server):
    response = server.post("/predict", json={"records": [
        {"id": 7, "text": "张伟在北京学习很好"}, {"text": "我们今天", "text_pair": "非常喜欢"}]})
    assert response.status_code == 200, response.text
    first, second = response.json()["predictions"]
    assert first["id"] == 7 and first["text"] == "张伟在北京学习很好"
    assert first["sentiment"]["label"] in {"negative", "positive"} and 0 <= first["sentiment"]["score"] <= 1
    assert "".join(first["cws"]) == first["text"]  # words cover the text
    assert all(first["text"][e["start"]:e["end"]] == e["text"] for e in first["ner"])
    assert "nsp" not in first and second["nsp"]["label"] in {"not_next", "is_next"}


@pytest.mark.parametrize("body, record, field", [
    ({"records": [{"text": "好"}, {"text": None}]}, 1, "text"),
    ({"records": [{"text": 123}]}, 0, "text"),
    ({"records": [{"text": True}]}, 0, "text"),
    ({"records": [{"text": ""}]}, 0, "text"),
    ({"records": [{"text": "   "}]}, 0, "text"),
    ({"records": [{"text": "好", "text_pair": 5}]}, 0, "text_pair"),
    ({"records": [{"no_text": "好"}]}, 0, "text"),
    ({"records": [{"text": "好" * (MAX_TEXT_CHARS + 1)}]}, 0, "text"),
    ({"records": []}, None, "records"),
    ({"records": [{"text": "好"}] * (MAX_RECORDS + 1)}, None, "records"),
    ({"texts": ["好"]}, None, None),
    ([{"text": "好"}], None, None),
])
def test_bad_requests_get_a_422_naming_the_record_and_the_problem(server, body, record, field):
    response = server.post("/predict", json=body)
    assert response.status_code == 422, response.text
    _no_traceback(response)
    detail = response.json()["detail"]
    assert detail.startswith(f"record {record}:" if record is not None else "request:"), detail
    if field:
        assert f"`{field}`" in detail, detail


def test_a_body_that_is_not_utf8_json_is_a_4xx(server):
    for content in (b'{"records": [{"text": "\xff\xfe"}]}', b"not json", "好".encode("gbk")):
        response = server.post("/predict", content=content, headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, response.text
        _no_traceback(response)
    assert server.get("/health").status_code == 200  # still up


def test_the_schema_is_published(server):
    schema = server.get("/openapi.json").json()
    assert "/predict" in schema["paths"] and "Record" in json.dumps(schema["components"])


# finite floats only: the client cannot send inf as JSON at all (a body the server never sees)
SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=40))
JSON_VALUES = st.recursive(SCALARS,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)
RECORDS = st.lists(st.fixed_dictionaries({"text": JSON_VALUES}, optional={"text_pair": JSON_VALUES}), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(st.fixed_dictionaries({"records": RECORDS}), JSON_VALUES))
def test_fuzzed_bodies_get_200_or_a_clean_4xx_and_the_server_stays_up(server, body):
    response = server.post("/predict", json=body)
    _no_traceback(response)
    records = body.get("records") if isinstance(body, dict) and set(body) == {"records"} else None
    valid = bool(records) and all(
        isinstance(r.get("text"), str) and r["text"].strip()
        and (r.get("text_pair") is None or (isinstance(r["text_pair"], str) and r["text_pair"].strip()))
        for r in records)
    if valid:
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == len(records)
    else:
        assert response.status_code == 422, response.text


def test_predict_in_a_pipe_keeps_fields_skips_bad_lines_and_keeps_stdout_clean(checkpoint, tmp_path):
    lines = ['\ufeff{"id": 1, "text": "张伟在北京"}', '{"id": 2, "txt": "oops"}', "not json", "",
             '{"id": 3, "text": "今天很好", "text_pair": "我们喜欢", "source": "x"}']
    errors = tmp_path / "errors.jsonl"
    proc = subprocess.run([str(BIN / "mtl"), "predict", "--input", "-", "--output", "-", "--model", str(checkpoint),
                           "--errors", str(errors)], input="\n".join(lines).encode("utf-8"), capture_output=True,
                          cwd=tmp_path, env=env_for(tmp_path), timeout=300)
    assert proc.returncode == 2, proc.stderr.decode()  # some lines were skipped
    out = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]  # nothing but JSONL
    assert [r["id"] for r in out] == [1, 3] and out[1]["source"] == "x" and "nsp" in out[1]
    assert out[0]["text"] == "张伟在北京" and "".join(out[0]["cws"]) == "张伟在北京"  # the BOM is not text
    stderr = proc.stderr.decode()
    assert "line 2: each line needs a non-empty string field `text` (skipped)" in stderr
    assert "line 3: not valid JSON" in stderr and "2 predictions -> stdout; 2 bad lines skipped" in stderr
    skipped = [json.loads(line) for line in errors.read_text(encoding="utf-8").splitlines()]
    assert [(e["line"], e["input"]) for e in skipped] == [(2, '{"id": 2, "txt": "oops"}'), (3, "not json")]
