"""tasks_mtl/heap.py: a training process keeps the memory it frees, so the next step's tensors reuse it instead of
faulting fresh pages in. Each measurement runs in a new process: malloc's state is per process."""

from __future__ import annotations

import os
import subprocess
import sys

from tiny_project import REPO_ROOT

# Steps of a toy model whose batches change length as training batches do: a layer's kept activations, four layers,
# then all freed. Prints the minor page faults per step once the first three steps have grown the heap.
STEPS = """
import resource, sys, torch
if sys.argv[1] == "keep":
    from tasks_mtl.heap import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # glibc here; a second call is the first's cached answer

def step(length):
    kept = []
    for _ in range(4):
        kept += [torch.ones(32, length, 1024, dtype=torch.bfloat16), torch.ones(32, 4, length, length)]

lengths = [60, 128, 40, 128, 90, 20, 128, 70, 110, 35] * 2
for n in lengths[:3]:
    step(n)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for n in lengths[3:]:
    step(n)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // (len(lengths) - 3))
"""


def _faults_per_step(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", STEPS, mode], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=False, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_steps_reuse_freed_memory_instead_of_faulting_fresh_pages_in():
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    assert default > 1000  # glibc's own thresholds: each step faults in thousands of pages (~2,200 here)
    assert kept < default / 5  # ~90 here
