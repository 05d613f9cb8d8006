"""How fast this host is at the moment of a measurement, for the benchmarks whose figures move with its background
load: a 2048 x 2048 matmul's rate in fp32 or bf16 and the 1-minute load average. Another process busy on the same
cores slows torch's threads far more than its share (they wait for each other), so a reading taken before and
after a run tells a slow host from slow code: the same code measured with a bf16 matmul rate a third lower is not
a regression. Run as a script (`python benchmarks/x.py`), a benchmark finds this module next to it."""

from __future__ import annotations

import os
import time

import torch

MATMUL_N = 2048


def matmul_gflops(dtype: torch.dtype, n: int = MATMUL_N, warmup: int = 3, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matmul in `dtype` at torch's thread count, after `warmup` untimed runs."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    out = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=out)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b, out=out)
    return 2 * n**3 * repeats / (time.perf_counter() - started) / 1e9


def reading() -> dict[str, float]:
    """The host's speed now: the bf16 matmul rate (GFLOP/s) and the 1-minute load average."""
    return {"matmul_bf16_gflops": round(matmul_gflops(torch.bfloat16), 1),
            "load_average": round(os.getloadavg()[0], 2)}
