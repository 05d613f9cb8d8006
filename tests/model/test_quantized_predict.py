"""Prediction speed options: the shared length batching, one encoder pass for the token tasks and sentiment, the
batched Viterbi, bf16 encoder layers, and the dynamic int8 model for CPU serving."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tasks_mtl.cli import app
from tasks_mtl.predict import Predictor
from tasks_mtl.spans import lenient_spans, render_tokens
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import train_stage

TEXTS = ["张伟在北京学习", "今天天气非常很好", "我们喜欢这个手机质量", "李娜在上海公司", "朋友", "中国北京天气很差",
         "王芳在广州学习非常喜欢", "这个公司很好"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project and its first stage, trained once for the tests of this file."""
    from tiny_project import make_tiny_project

    cfg = make_tiny_project(tmp_path_factory.mktemp("quantize"))
    tokenize(cfg)
    return cfg, train_stage(cfg, 0)


@pytest.fixture(scope="module")
def checkpoint(trained):
    return trained[1]


def test_batches_by_length_cover_every_row_once_shortest_first():
    predictor = object.__new__(Predictor)  # only the batch size matters here
    predictor.batch_size = 3
    lengths = [5, 1, 5, 3, 9, 1, 2]
    batches = predictor.batches_by_length(lengths)
    assert batches == [[1, 5, 6], [3, 0, 2], [4]]  # sorted by length, ties in input order, 3 rows a batch
    assert all(isinstance(i, int) for batch in batches for i in batch)


def test_quantized_model_keeps_the_contract_and_mostly_agrees(checkpoint):
    exact = Predictor.from_dir(checkpoint, device="cpu", precision="fp32")
    quantized = Predictor.from_dir(checkpoint, quantize=True)
    linear = [m for m in quantized.model.modules() if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert linear and not any(type(m) is torch.nn.Linear for m in quantized.model.modules())

    pairs = ["我们喜欢", None] * (len(TEXTS) // 2)
    want, got = exact.predict(TEXTS, pairs), quantized.predict(TEXTS, pairs)
    for record, text in zip(got, TEXTS):
        assert set(record) == set(want[0] if "text_pair" in record else want[1])
        assert "".join(record["cws"]) == text  # words join back to the text
        assert record["sentiment"]["label"] in ("negative", "positive")
        assert all(text[e["start"]:e["end"]] == e["text"] for e in record["ner"])
    # int8 weights move the scores a little; decisions mostly stay
    for task in ("sentiment", "nsp"):
        rows = [i for i, r in enumerate(want) if task in r]
        assert np.allclose([got[i][task]["score"] for i in rows], [want[i][task]["score"] for i in rows], atol=0.05)
    tags = [(a, b) for w, g in zip(exact.token_tags("ner", [list(t) for t in TEXTS]),
                                   quantized.token_tags("ner", [list(t) for t in TEXTS])) for a, b in zip(w, g)]
    assert sum(a == b for a, b in tags) >= 0.8 * len(tags)


def test_mtl_predict_quantize_writes_the_records(checkpoint, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in enumerate(TEXTS)),
                      encoding="utf-8")
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["predict", "--input", str(source), "--output", str(out), "--model",
                                      str(checkpoint), "--params", str(checkpoint.parent.parent / "params.yaml"), "--quantize"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == list(range(len(TEXTS)))
    assert all({"sentiment", "ner", "cws"} <= set(r) and "".join(r["cws"]) == r["text"] for r in records)


@pytest.mark.parametrize(("tags", "rows", "length"), [(89, 16, 30), (4, 1, 12), (7, 9, 1), (3, 6, 8)])
def test_batched_viterbi_finds_torchcrfs_paths(tags, rows, length):
    from torchcrf import CRF

    from tasks_mtl.tasks.token_classification import _crf_class

    torch.manual_seed(tags + rows + length)
    ours, reference = _crf_class()(tags, batch_first=True), CRF(tags, batch_first=True)
    for p in reference.parameters():
        torch.nn.init.normal_(p)
    ours.load_state_dict(reference.state_dict())
    emissions = torch.randn(rows, length, tags)
    lengths = torch.randint(1, length + 1, (rows,))
    lengths[0] = length
    mask = torch.arange(length)[None] < lengths[:, None]
    paths = ours.decode(emissions, mask)
    assert paths == reference.decode(emissions, mask)
    assert [len(p) for p in paths] == lengths.tolist()
    assert ours.paths(emissions, lengths) == paths  # what the Predictor calls: batch first, by lengths
    none = torch.cat([lengths[:1], torch.zeros(1, dtype=lengths.dtype), lengths[1:]])  # a row without positions
    emissions_with_none = torch.cat([emissions[:1], torch.randn(1, length, tags), emissions[1:]])
    assert ours.paths(emissions_with_none, none) == [paths[0], [], *paths[1:]]


def test_viterbi_keeps_the_first_of_equal_scores_as_torchcrf():
    """All-zero parameters make every path equal: the compiled Viterbi (tasks_mtl.chain) must pick torchcrf's."""
    from torchcrf import CRF

    from tasks_mtl.tasks.token_classification import _crf_class

    for tags in (3, 89):
        reference, ours = CRF(tags, batch_first=True), _crf_class()(tags, batch_first=True)
        for p in reference.parameters():
            torch.nn.init.zeros_(p)
        ours.load_state_dict(reference.state_dict())
        emissions = torch.zeros(2, 5, tags)
        emissions[1, 2, tags - 1] = 1.0  # one position with a clear winner among ties
        mask = torch.ones(2, 5, dtype=torch.bool)
        assert ours.decode(emissions, mask) == reference.decode(emissions, mask) == [[0] * 5, [0, 0, tags - 1, 0, 0]]


def test_viterbi_adds_the_emission_before_comparing_as_torchcrf():
    """Candidates 1 and 1 + 2^-23 differ, but + 3.0 rounds both to 4.0 in fp32: torchcrf compares the sums with the
    emission and keeps the first tag; comparing before adding it would keep the second."""
    from torchcrf import CRF

    from tasks_mtl.tasks.token_classification import _crf_class

    reference, ours = CRF(2, batch_first=True), _crf_class()(2, batch_first=True)
    for p in reference.parameters():
        torch.nn.init.zeros_(p)
    with torch.no_grad():
        reference.start_transitions.copy_(torch.tensor([1.0, 1.0 + 2.0**-23]))
    ours.load_state_dict(reference.state_dict())
    emissions = torch.tensor([[[0.0, 0.0], [3.0, 3.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert ours.decode(emissions, mask) == reference.decode(emissions, mask) == [[0, 0]]


def _count_passes(predictor, monkeypatch) -> list[list[str]]:
    passes: list[list[str]] = []
    encode = predictor.model.tasks_hidden

    def counted(tasks, batch):
        passes.append(sorted(tasks))
        return encode(tasks, batch)

    monkeypatch.setattr(predictor.model, "tasks_hidden", counted)
    return passes


def test_one_encoder_pass_serves_the_token_tasks_and_sentiment(checkpoint, monkeypatch):
    predictor = Predictor.from_dir(checkpoint, device="cpu", precision="fp32")
    alone = predictor.class_probs("sentiment", TEXTS)  # sentiment's own encoding of each text
    passes = _count_passes(predictor, monkeypatch)
    records = predictor.predict(TEXTS)
    readers = sorted(t for t, c in predictor.tasks.items() if c.type in ("token_classification", "classification"))
    assert "sentiment" in readers and "ner" in readers
    assert passes == [readers]  # one batch, one pass: every token head and sentiment's head read it
    assert [r["sentiment"]["score"] for r in records] == pytest.approx(alone.max(1), abs=1e-5)
    assert [r["sentiment"]["label"] for r in records] == [predictor.tasks["sentiment"].labels[i] for i in alone.argmax(1)]


@pytest.mark.parametrize("quantize", [False, True])
def test_texts_encoded_otherwise_join_the_pass_as_rows_of_their_own_encoding(checkpoint, monkeypatch, quantize):
    predictor = Predictor.from_dir(checkpoint, device="cpu", precision="auto" if quantize else "fp32", quantize=quantize)
    # latin pieces; plain Chinese; longer than a window; latin again, in the shorter length batch
    texts = ["iPhone 12 手机很好", "张伟在北京学习", "我们" * 300, "OK 好"]
    for text in (texts[0], texts[3]):
        own = predictor.tokenizer(text)["input_ids"]
        assert own != predictor.tokenizer(list(text), is_split_into_words=True)["input_ids"]  # the premise
    token_tasks = [n for n, c in predictor.tasks.items() if c.type == "token_classification"]
    monkeypatch.setattr(predictor, "batch_size", 2)  # two length batches, each with a row of its own encoding
    alone = predictor.class_probs("sentiment", texts)
    tags = predictor.tasks_token_tags(token_tasks, [list(t) for t in texts])  # no sentiment: no rows added
    # int8 quantises each batch by its own range, so a score depends on its batch: the texts sentiment's own
    # passes get (all but the plain Chinese one), batched as predict batches them
    rest = predictor.class_probs("sentiment", [texts[i] for i in (0, 2, 3)]) if quantize else None
    passes = _count_passes(predictor, monkeypatch)
    records = predictor.predict(texts)
    if not quantize:
        assert [r["sentiment"]["score"] for r in records] == pytest.approx(alone.max(1), abs=1e-5)
    else:
        assert [records[i]["sentiment"]["score"] for i in (0, 2, 3)] == pytest.approx(rest.max(1), abs=1e-6)
    readers = sorted(token_tasks + ["sentiment"])
    if not quantize:  # a pass per length batch serves the tags and every sentiment but the long text's
        assert passes == [readers, readers, ["sentiment"]]
    else:  # int8: an added row would change the batch's quantisation and so its tags: the latin texts go with the
        # long one to sentiment's own passes (two batches of at most two), and the second batch has no shared row
        assert passes == [readers, sorted(token_tasks), ["sentiment"], ["sentiment"]]
    for name in token_tasks:  # the added rows change no tag
        cfg = predictor.tasks[name]
        assert [r[name] for r in records] == [render_tokens(t, lenient_spans(tags[name][i], cfg.scheme), cfg.output)
                                              for i, t in enumerate(texts)]


def test_bf16_runs_only_the_layers_in_bf16_and_agrees_with_fp32(checkpoint):
    from tasks_mtl.model import bf16_fast

    exact = Predictor.from_dir(checkpoint, device="cpu", precision="fp32")
    half = Predictor.from_dir(checkpoint, device="cpu", precision="bf16")
    assert (exact.precision, half.precision) == ("fp32", "bf16")
    assert all(p.dtype == torch.bfloat16 for p in half.model.bert.encoder.parameters())
    assert all(p.dtype == torch.float32 for p in [*half.model.bert.embeddings.parameters(),
                                                  *half.model.heads.parameters()])
    want, got = exact.predict(TEXTS), half.predict(TEXTS)
    assert np.allclose([r["sentiment"]["score"] for r in got], [r["sentiment"]["score"] for r in want], atol=0.02)
    tags = [(a, b) for w, g in zip(exact.token_tags("ner", [list(t) for t in TEXTS]),
                                   half.token_tags("ner", [list(t) for t in TEXTS])) for a, b in zip(w, g)]
    assert sum(a == b for a, b in tags) >= 0.9 * len(tags)
    auto = Predictor.from_dir(checkpoint, device="cpu")
    assert auto.precision == ("bf16" if bf16_fast(torch.device("cpu")) else "fp32")
    with pytest.raises(ValueError, match="precision 'fp16'"):
        Predictor.from_dir(checkpoint, device="cpu", precision="fp16")
    with pytest.raises(ValueError, match="exclude"):
        Predictor.from_dir(checkpoint, quantize=True, precision="bf16")


def test_latency_benchmark_measures_every_variant_and_reads_the_host_speed_around_them(trained, capsys, monkeypatch):
    """benchmarks/predict_latency.py without the server: one JSON line, the three variants measured on the tiny
    model's test texts, and the host's bf16 matmul rate and load read before and after."""
    from tiny_project import load_benchmark

    cfg, model = trained
    line = load_benchmark("predict_latency", monkeypatch).main(
        ["--model", str(model), "--params", str(cfg.root / "params.yaml"), "--no-http", "--runs", "5", "--batches", "1",
         "--pause-ms", "1"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == line
    assert line["texts"] > 0 and 0 < line["mean_chars"] <= 64
    assert line["fp32"]["precision"] == "fp32" and line["int8"]["precision"] == "int8"
    assert line["default"]["precision"] in ("bf16", "fp32")
    for variant in ("default", "fp32", "int8"):
        python = line[variant]["python"]
        assert 0 < python["p50_ms"] <= python["p99_ms"] and python["batch64_sentences_per_s"] > 0
        assert 0 < python["paced_p50_ms"] <= python["paced_p99_ms"]
        assert "http" not in line[variant] and set(line[variant]["meets"]) == {"python_p50", "batch"}
    for moment in ("before", "after"):
        assert line["host"][moment]["matmul_bf16_gflops"] > 0 and line["host"][moment]["load_average"] >= 0


def test_paced_single_requests_wait_before_each_call_and_time_only_the_call(monkeypatch):
    """`--pause-ms`: each paced request starts at least the pause after the previous one ended, and the pause is
    not part of its latency; without a pause there is no paced figure."""
    from tiny_project import load_benchmark

    benchmark = load_benchmark("predict_latency", monkeypatch)
    spans = []

    def call(texts):
        started = time.perf_counter()
        time.sleep(0.002)
        spans.append((started, time.perf_counter(), texts))

    seconds = benchmark.singles(call, ["a", "b", "c"], 4, pause_s=0.1)
    assert [texts for *_, texts in spans] == [["a"], ["b"], ["c"], ["a"]]
    assert all(later[0] - earlier[1] >= 0.1 for earlier, later in itertools.pairwise(spans))
    assert all(0.002 <= s < 0.1 for s in seconds)
    paced = benchmark.measure(call, ["a", "b"], 4, 1, pause_ms=30)
    assert set(paced) == {"p50_ms", "p99_ms", "paced_p50_ms", "paced_p99_ms", "batch64_sentences_per_s"}
    assert "paced_p50_ms" not in benchmark.measure(call, ["a", "b"], 4, 1)
