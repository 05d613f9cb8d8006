"""The task-conflict measure: cosines of per-task gradient rows, and the probe's file handling."""

from __future__ import annotations

import json

import pytest
import torch

from tasks_mtl.conflict import _trim, cosine_matrix


def test_cosines_of_aligned_orthogonal_opposite_and_zero_gradients() -> None:
    grads = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, 0.0]])
    cos = cosine_matrix(grads)
    assert cos[0][1] == pytest.approx(1.0) and cos[0][2] == pytest.approx(0.0)
    assert cos[0][3] == pytest.approx(-1.0) and cos[1][3] == pytest.approx(-1.0)
    assert all(c == pytest.approx(1.0) for c in (cos[i][i] for i in range(4)))
    assert cos[4] == [None] * 5 and all(row[4] is None for row in cos)  # no direction: no cosine
    assert cos == [list(col) for col in zip(*cos)]  # symmetric


def test_cosine_is_scale_free() -> None:
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 50, generator=gen, dtype=torch.float64)
    scaled = grads * torch.tensor([[1e-6], [1.0], [1e4]], dtype=torch.float64)
    flat = lambda m: [c for row in m for c in row]
    assert flat(cosine_matrix(scaled)) == pytest.approx(flat(cosine_matrix(grads)), abs=1e-9)


def test_trim_keeps_rows_up_to_the_resume_step_and_drops_a_cut_line(tmp_path) -> None:
    path = tmp_path / "1-joint.conflict.jsonl"
    rows = [json.dumps({"step": s, "stage": "joint", "tasks": [], "cosine": []}) for s in (2, 4, 6)]
    path.write_text("\n".join(rows) + '\n{"step": 8, "sta', encoding="utf-8")
    _trim(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [2, 4]
