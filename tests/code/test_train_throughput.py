"""benchmarks/train_throughput.py on the tiny project: one JSON line, every variant measured, nothing written
to the project's tokenized cache or checkpoints."""

import json

import pytest
import torch
from tiny_project import load_benchmark


@pytest.mark.slow
def test_benchmark_measures_every_variant_in_scratch_dirs(tiny_cfg, capsys, monkeypatch):
    benchmark = load_benchmark("train_throughput", monkeypatch)
    rates = {torch.float32: iter([100.0, 150.0, 120.0]), torch.bfloat16: iter([500.0, 900.0, 700.0])}
    monkeypatch.setattr(benchmark, "matmul_gflops", lambda dtype: next(rates[dtype]))  # a host that varies
    line = benchmark.main(["--params", str(tiny_cfg.root / "params.yaml"), "--steps", "3", "--warmup-steps", "1",
                           "--batch-size", "8"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == line
    for key in ("project", "hf_padded", "hf_grouped", "hf_best"):
        assert line[f"{key}_useful_tokens_per_s"] > 0
    assert all(d["timed_batches"] == 2 for d in line["hf_details"].values())
    assert line["hf_details"]["padded"]["padding_share"] > line["hf_details"]["grouped"]["padding_share"]
    assert line["project_vs_hf_grouped"] > 0 and set(line["meets"]) == set(line["targets"])
    # probed before and after the project's run and after the Trainer's; the peak is the best reading
    assert line["matmul_bf16_readings"] == [500.0, 900.0, 700.0] and line["matmul_bf16_gflops"] == 900.0
    assert line["matmul_gflops"] == 150.0
    assert line["project_share_of_bf16_peak"] == pytest.approx(line["project_train_gflops"] / 900, abs=1e-3)
    assert line["encoder"]["layers"] == 2 and line["encoder"]["hidden"] == 32
    assert not (tiny_cfg.root / "tokenized").exists() and not (tiny_cfg.root / "checkpoints").exists()
