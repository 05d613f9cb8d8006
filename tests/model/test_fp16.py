"""fp16 training (`training.fp16`): dynamic loss scaling through torch.amp.GradScaler (tasks_mtl.optim.LossScale).
The scale multiplies gradients, not the loss values the weighting reads; an overflow skips the step, leaves the
weights alone and halves the scale; weightings that the scale would change are refused when the config loads."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from tasks_mtl.optim import LossScale


def quadratic(scale: LossScale):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3))
    x = torch.randn(8, 3)
    optimizer = torch.optim.SGD([w], lr=0.1)
    loss = scale.scaled(((x @ w) - 1.0).pow(2).mean())
    return w, optimizer, loss


def test_the_scale_multiplies_gradients_not_the_loss_and_unscaling_restores_them():
    plain_w, plain_opt, plain_loss = quadratic(LossScale(False, torch.device("cpu")))
    plain_loss.backward()
    scale = LossScale(True, torch.device("cpu"))
    w, optimizer, loss = quadratic(scale)
    assert scale.scale == 2.0 ** 16
    assert loss.item() == plain_loss.item()  # what the weighting sees is the true loss
    loss.backward()
    torch.testing.assert_close(w.grad, plain_w.grad * 2.0 ** 16)
    assert scale.unscale([optimizer])
    torch.testing.assert_close(w.grad, plain_w.grad)
    scale.step([optimizer])
    plain_opt.step()
    torch.testing.assert_close(w, plain_w)


def test_an_overflow_skips_the_step_and_halves_the_scale():
    scale = LossScale(True, torch.device("cpu"))
    w, optimizer, loss = quadratic(scale)
    before = w.detach().clone()
    (loss * 1e38).backward()  # the scaled gradient overflows fp32
    assert not scale.unscale([optimizer])
    scale.step([optimizer])
    assert torch.equal(w.detach(), before)
    assert scale.scale == 2.0 ** 15


def test_sparse_gradients_are_unscaled_too():
    scale = LossScale(True, torch.device("cpu"))
    table = torch.nn.Embedding(10, 2, sparse=True)
    optimizer = torch.optim.SparseAdam(list(table.parameters()))
    scale.scaled(table(torch.tensor([1, 3])).sum()).backward()
    assert scale.unscale([optimizer])
    torch.testing.assert_close(table.weight.grad.to_dense()[[1, 3]], torch.ones(2, 2))


def test_fp16_excludes_bf16_and_weightings_the_scale_would_change(tmp_path):
    from tiny_project import make_tiny_project

    with pytest.raises(ValidationError, match="pick one precision"):
        make_tiny_project(tmp_path / "a", {"training": {"fp16": True, "bf16": True}})
    stage = {"name": "joint", "steps": 2, "weighting": "nash_mtl"}
    with pytest.raises(ValidationError, match="does not work under training.fp16"):
        make_tiny_project(tmp_path / "b", {"training": {"fp16": True, "stages": [stage]}})


def test_a_stage_trains_in_fp16_and_logs_its_scale(tmp_path, monkeypatch):
    """The loop's wiring: float16 autocast asked for, losses scaled, gradients unscaled before clipping, the scale
    logged. The CPU emulates float16 matmuls (about 14 s a step here), so autocast itself is left out."""
    from contextlib import nullcontext

    from tasks_mtl.checkpoint import load_checkpoint
    from tasks_mtl.runlog import read_logs
    from tasks_mtl.tokenization import tokenize
    from tasks_mtl.train import train_stage
    from tiny_project import make_tiny_project

    stage = {"name": "joint", "steps": 8, "encoder_lr": 2e-3, "head_lr": 5e-3, "sampler": "all"}
    cfg = make_tiny_project(tmp_path, {"training": {"fp16": True, "stages": [stage], "log_every": 4}})
    tokenize(cfg)
    asked = []
    monkeypatch.setattr(torch, "autocast", lambda device, dtype: asked.append(dtype) or nullcontext())
    model = load_checkpoint(train_stage(cfg, 0), cfg.tasks)[0]
    assert asked == [torch.float16]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    logs = [(step, metric, value) for step, _, metric, value in read_logs(cfg)]
    scales = [v for _, m, v in logs if m == "fp16_loss_scale"]
    assert len(scales) == 2 and all(s >= 1.0 for s in scales)
    assert [v for _, m, v in logs if m == "bf16"] == [0.0] * 2
    first, last = ([v for s, m, v in logs if s == at and m.startswith("loss/")] for at in (4, 8))
    assert sum(last) < sum(first)
