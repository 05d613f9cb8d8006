"""Prediction latency and throughput of one model: as served by default (`precision` auto: bf16 encoder layers
where the CPU runs bf16 natively), in fp32, and with dynamic int8 Linear layers.

For each variant: single-sentence p50/p99 (texts of at most 64 characters, one request at a time) through the
Python API (`Predictor.predict`) and over HTTP against `mtl serve` (started here as a subprocess on 127.0.0.1 with
a free port, killed afterwards), and batch-64 throughput (sentences/s: requests of 64 texts, which the Predictor
cuts by length at its default batch size) both ways. `--metrics` also scores every variant on the test split
(the metric cost of bf16 and of int8 against fp32). "host" holds a reading of the host's speed before and after
(`benchmarks/host.py`: a bf16 matmul rate and the load average): single-sentence figures on this 2-core machine move
by 20-40% with its background load, and a rate well below the usual ~800-970 GFLOP/s says the run was slowed.

Single requests are sent back to back (`p50_ms`, `p99_ms`), the usual way, and also one at a time with a pause of
`--pause-ms` before each (`paced_p50_ms`, `paced_p99_ms`; 20 ms by default, 0 skips it): a served model mostly sees
requests that arrive after an idle moment. On this host a sentence after 20 ms of idle took 1.5-2.0 ms longer than
one straight after another in one process (2.4-3.3 ms in this benchmark's runs), with one torch thread as with two
(so not the thread pool waking up).
Prints one JSON line.

    python benchmarks/predict_latency.py --model checkpoints/2-joint [--runs 200] [--metrics]
    python benchmarks/predict_latency.py --model models:/mtl-bert-zh@champion
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from host import reading

MAX_CHARS = 64  # the single-sentence texts: up to 64 characters
BATCH = 64
TARGETS = {"python_p50_ms": 5.0, "http_p50_ms": 10.0, "batch_sentences_per_s": 2000.0}
FALLBACK_TEXTS = ["这家店的菜很好吃", "房间很干净，服务也好。", "张伟在北京大学学习中文。", "今天上海的天气非常好",
                  "手机质量太差了，再也不买", "国务院总理在人民大会堂会见了外国客人。"]


def sentences(cfg, limit: int = 2000) -> list[str]:
    """Test texts cut to MAX_CHARS: sentiment reviews and People's Daily sentences when prepared, else a few fixed ones."""
    from tasks_mtl.data.prepare import read_split

    texts: list[str] = []
    for task in ("sentiment", "ner"):
        try:
            rows = read_split(cfg, task, "test")
        except (FileNotFoundError, KeyError):
            continue
        texts += [(r.get("text") or "".join(r.get("tokens", [])))[:MAX_CHARS] for r in rows]
    texts = [t for t in texts if t.strip()] or FALLBACK_TEXTS
    rng = np.random.default_rng(0)
    return [texts[i] for i in rng.permutation(len(texts))[:limit]] if len(texts) > limit else texts


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def singles(call, texts: list[str], runs: int, pause_s: float = 0.0) -> list[float]:
    """Seconds of `call([text])` for `runs` texts in turn, each after a pause of `pause_s` (not timed)."""
    seconds = []
    for i in range(runs):
        if pause_s:
            time.sleep(pause_s)
        started = time.perf_counter()
        call([texts[i % len(texts)]])
        seconds.append(time.perf_counter() - started)
    return seconds


def measure(call, texts: list[str], runs: int, batches: int, pause_ms: float = 0.0) -> dict[str, float]:
    """Latency of `call([text])` over `runs` texts back to back and, when `pause_ms`, over the first `runs // 2` of
    them again, each sent `pause_ms` after the previous answer; throughput of `call(64 texts)` over `batches` batches."""
    for text in texts[:10]:  # warm-up: allocator, thread pool, tokenizer caches
        call([text])
    result = percentiles(singles(call, texts, runs))
    if pause_ms:
        paced = percentiles(singles(call, texts, max(runs // 2, 1), pause_ms / 1000))
        result |= {f"paced_{key}": value for key, value in paced.items()}
    chunks = [[texts[(b * BATCH + j) % len(texts)] for j in range(BATCH)] for b in range(batches + 1)]
    call(chunks[0])
    started = time.perf_counter()
    for chunk in chunks[1:]:
        call(chunk)
    elapsed = time.perf_counter() - started
    return result | {"batch64_sentences_per_s": round(batches * BATCH / elapsed, 1)}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def served(model_dir: Path, params: str | None, options: list[str], texts: list[str], runs: int, batches: int,
           timeout: float, pause_ms: float = 0.0) -> dict[str, float]:
    """Start `mtl serve` on the model, wait for /health (at most `timeout` s), measure over HTTP, stop it."""
    import httpx

    port = free_port()
    command = [str(Path(sys.executable).parent / "mtl"), "serve", "--model", str(model_dir), "--port", str(port)]
    command += (["--params", params] if params else []) + options
    log = open(os.devnull, "w")  # noqa: SIM115 - closed below; the access log would fill a pipe
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, started = time.monotonic() + timeout, time.monotonic()
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"mtl serve exited with code {server.returncode}: {' '.join(command)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"mtl serve did not answer /health within {timeout:.0f} s")
            time.sleep(0.2)
        ready_s = time.monotonic() - started
        with httpx.Client(base_url=base, timeout=60) as client:
            def call(chunk: list[str]) -> None:
                client.post("/predict", json={"records": [{"text": t} for t in chunk]}).raise_for_status()

            return {**measure(call, texts, runs, batches, pause_ms), "ready_s": round(ready_s, 1)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None,
                        help="checkpoint dir or models:/ URI, resolved as `mtl predict` does (default: the champion)")
    parser.add_argument("--params", default="params.yaml" if Path("params.yaml").is_file() else None)
    parser.add_argument("--runs", type=int, default=200, help="single-sentence requests per measurement")
    parser.add_argument("--batches", type=int, default=10, help="batches of 64 per throughput measurement")
    parser.add_argument("--pause-ms", type=float, default=20.0,
                        help="idle time before each paced single request (half as many as --runs); 0: none")
    parser.add_argument("--no-http", action="store_true", help="skip the served model")
    parser.add_argument("--metrics", action="store_true", help="also score fp32 and int8 on the test split")
    parser.add_argument("--server-timeout", type=float, default=180.0, help="seconds to wait for `mtl serve`")
    args = parser.parse_args(argv)

    import torch

    from tasks_mtl.config import load_config
    from tasks_mtl.predict import Predictor
    from tasks_mtl.predict_jsonl import model_location

    cfg = load_config(args.params)
    try:
        model_dir = model_location(cfg, args.model)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"predict_latency: no model at {args.model or 'the champion'}: {err}")
    if not (model_dir / "mtl.json").is_file():
        sys.exit(f"predict_latency: {model_dir} is not a checkpoint directory (no mtl.json)")
    texts = sentences(cfg)
    result: dict = {"benchmark": "predict_latency", "model": args.model or "champion", "checkpoint": str(model_dir),
                    "threads": torch.get_num_threads(), "texts": len(texts),
                    "mean_chars": round(float(np.mean([len(t) for t in texts])), 1), "runs": args.runs,
                    "pause_ms": args.pause_ms, "targets": TARGETS, "host": {"before": reading()}}
    variants = {"default": ({}, []), "fp32": ({"precision": "fp32"}, ["--precision", "fp32"]),
                "int8": ({"quantize": True}, ["--quantize"])}
    for name, (options, flags) in variants.items():
        started = time.perf_counter()
        predictor = Predictor.from_dir(model_dir, device="cpu", **options)
        entry = {"precision": predictor.precision, "load_s": round(time.perf_counter() - started, 2),
                 "python": measure(predictor.predict, texts, args.runs, args.batches, args.pause_ms)}
        if not args.no_http:
            entry["http"] = served(model_dir, args.params, flags, texts, args.runs, args.batches, args.server_timeout,
                                   args.pause_ms)
        if args.metrics:
            from tasks_mtl.evaluate import evaluate

            predictor.batch_size = cfg.training.eval_batch_size
            entry["metrics"] = evaluate(cfg, model_dir, predictor=predictor)
        entry["meets"] = {"python_p50": entry["python"]["p50_ms"] <= TARGETS["python_p50_ms"],
                          "batch": entry["python"]["batch64_sentences_per_s"] >= TARGETS["batch_sentences_per_s"]}
        if "http" in entry:
            entry["meets"]["http_p50"] = entry["http"]["p50_ms"] <= TARGETS["http_p50_ms"]
        result[name] = entry
        del predictor
    if args.metrics:
        for name in ("default", "int8"):
            result[f"{name}_minus_fp32"] = {
                task: {m: round(v - result["fp32"]["metrics"][task][m], 4) for m, v in values.items()}
                for task, values in result[name]["metrics"].items()}
    result["host"]["after"] = reading()
    print(json.dumps(result, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
