"""Training keeps the memory it frees for its next step instead of handing it back to the system.

glibc's malloc serves a block above its mmap threshold (128 KiB at first, raised as far as 32 MiB as such blocks
are freed) from a fresh mapping that it unmaps on free, and gives the heap's top back once more than its trim
threshold lies free there. Every training step allocates and frees tensors of much the same sizes (one 32 x 128 x
1024 bf16 activation is 8 MiB), so the next step faulted those pages in again, each one zeroed by the kernel: on the
benchmark's sentiment stage (benchmarks/train_throughput.py) 4,400-5,400 minor page faults per step, 1,200 with
the thresholds raised; of seven pairs of runs of 150 steps taken in turn, six gained 2-18% in tokens per second
(median 6%) and one lost 2%. Tensors are allocated 64-byte aligned either way, so the arithmetic is the same.

`train_stage` calls it; the setting is process-wide, so what the process does next (the pipeline's evaluation in
the same flow) runs with it too. `Predictor` does not call it: single sentences got slower with it (p50 5.4 ->
6.0-6.2 ms in alternating runs; batches of 64 ran 1-8% faster), and `mtl serve` is a process of its own. The cost
is that a training process keeps up to `TRIM_THRESHOLD` of freed memory at its heap's top.
"""

from __future__ import annotations

import ctypes
import functools

MMAP_THRESHOLD = 256 << 20  # blocks at least this large are still mapped and unmapped one by one
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before some is given back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process: True when both took. False where malloc is not
    glibc's (no `mallopt`, or it refuses one: each is asked on its own), which leaves that one as it was."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    took = [mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    return all(took)
