"""Data-parallel training under torchrun (tasks_mtl/distributed.py): two CPU processes on the tiny project
stay in step, learn, and only rank 0 writes; the launcher and the gradient weightings' cross-rank combine."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks_mtl.checkpoint import load_checkpoint
from tasks_mtl.distributed import state_digest
from tasks_mtl.tokenization import tokenize
from tasks_mtl.train import stage_dir

WORKER = Path(__file__).with_name("ddp_worker.py")

# one joint stage: PCGrad (per-task gradients combined across the ranks), the bigram tables (sparse gradients)
DDP_STAGE = {"name": "joint", "steps": 30, "encoder_lr": 2e-3, "head_lr": 5e-3, "warmup": 0.0, "weighting": "pcgrad",
             "sampler": "all"}


def ddp_project(root: Path):
    from tiny_project import make_tiny_project

    cfg = make_tiny_project(root, {"training": {"stages": [DDP_STAGE], "log_every": 5, "save_every": 10,
                                                "bf16": False}})
    tokenize(cfg)
    return cfg


def torchrun(cfg, writes: Path, **env_extra: str) -> subprocess.CompletedProcess:
    """`mtl train` under torchrun with two CPU processes (gloo), writes recorded in `writes`."""
    env = dict(os.environ, MTL_TEST_WRITES=str(writes), OMP_NUM_THREADS="1", **env_extra,
               PYTHONPATH=os.pathsep.join([str(WORKER.parent.parent), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(WORKER),
         "--params", str(cfg.root / "params.yaml")],
        env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted two-process stage: (config, record of writes, torchrun's result)."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = ddp_project(root)
    writes = root / "writes.jsonl"
    return cfg, writes, torchrun(cfg, writes)


@pytest.mark.slow
def test_two_torchrun_processes_learn_in_step_and_only_rank_0_writes(uninterrupted):
    cfg, writes, result = uninterrupted
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the weights are the same on both ranks: each rank's digest, gathered into done.json by rank 0 ...
    out = stage_dir(cfg, 0)
    done = json.loads((out / "done.json").read_text())
    assert done["processes"] == 2 and len(done["rank_digests"]) == 2
    assert done["rank_digests"][0] == done["rank_digests"][1]
    # ... and they are the digest of the checkpoint written, which trained away from the initial weights
    model = load_checkpoint(out, cfg.tasks)[0]
    assert state_digest(model) == done["rank_digests"][0]

    # only rank 0 wrote: three resume saves (steps 10, 20; 30 is the end) and one checkpoint, every log row once
    calls = [json.loads(line) for line in writes.read_text().splitlines()]
    assert {c["rank"] for c in calls} == {0}
    saves = [Path(c["path"]).name for c in calls if c["call"] == "save_checkpoint"]
    assert saves == ["1-joint.resume", "1-joint.resume", "1-joint"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["1-joint", "1-joint.log.csv", "1-joint.timing.json"]  # resume saves gone
    with (out.parent / "1-joint.log.csv").open() as fh:
        rows = [(int(r["step"]), r["metric"], float(r["value"])) for r in csv.DictReader(fh)]
    assert len(rows) == len({(step, metric) for step, metric, _ in rows})
    assert sorted({step for step, _, _ in rows}) == [5, 10, 15, 20, 25, 30]

    # the loss falls: mean over the tasks, first logged window against the last
    def mean_loss(step: int) -> float:
        values = [v for s, m, v in rows if s == step and m.startswith("loss/")]
        assert len(values) == len(cfg.tasks)
        return sum(values) / len(values)

    assert mean_loss(30) < 0.85 * mean_loss(5)


@pytest.mark.slow
def test_rank_0_killed_mid_stage_then_a_rerun_resumes_and_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    """SIGKILL of rank 0 right after its step-20 resume save takes the whole torchrun down; the same command
    again resumes both ranks from that save (each rank its own shard's batch order) and ends on the weights of
    the uninterrupted run, bit for bit."""
    reference = json.loads((stage_dir(uninterrupted[0], 0) / "done.json").read_text())["rank_digests"][0]
    cfg = ddp_project(tmp_path)
    writes = tmp_path / "writes.jsonl"
    killed = torchrun(cfg, writes, MTL_TEST_KILL_AFTER_SAVES="2")
    assert killed.returncode != 0
    out = stage_dir(cfg, 0)
    assert not (out / "done.json").exists() and out.with_name(out.name + ".resume").exists()
    assert [json.loads(line)["call"] for line in writes.read_text().splitlines()].count("save_checkpoint") == 2

    writes.unlink()
    rerun = torchrun(cfg, writes)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resumes at step 20 of 30" in rerun.stderr
    saves = [Path(c["path"]).name for c in map(json.loads, writes.read_text().splitlines())
             if c["call"] == "save_checkpoint"]
    assert saves == ["1-joint"]  # ten steps left: no resume save at step 30, then the stage's checkpoint
    done = json.loads((out / "done.json").read_text())
    assert done["rank_digests"] == [reference, reference]


def test_mtl_train_nproc_launches_torchrun_with_the_resolved_config(tiny_cfg, monkeypatch):
    from typer.testing import CliRunner

    import tasks_mtl.distributed as distributed
    from tasks_mtl.cli import app
    from tasks_mtl.config import Config

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    seen = {}

    def fake_run(command, env, check):
        config = Path(command[command.index("--config") + 1])
        seen["command"], seen["config"] = command, Config.model_validate(json.loads(config.read_text()))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(distributed.subprocess, "run", fake_run)
    monkeypatch.chdir(tiny_cfg.root)
    result = CliRunner().invoke(app, ["train", "--nproc", "2", "-S", "training.log_every=3"])
    assert result.exit_code == 0, result.output
    command = seen["command"]
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command and "--standalone" in command
    assert command[command.index("-m", 3) + 1] == "tasks_mtl.distributed"
    assert seen["config"].training.log_every == 3  # the same configuration, overrides included
    assert seen["config"].model_dump(exclude={"root"}) == tiny_cfg.model_copy(
        update={"training": tiny_cfg.training.model_copy(update={"log_every": 3})}).model_dump(exclude={"root"})
    assert "checkpoint -> " in result.output
    assert not list(tiny_cfg.path(tiny_cfg.training.output_dir).glob(".launch-*"))  # the config file is removed


@pytest.mark.parametrize("method", ["pcgrad", "cagrad", "imtl_g", "nash_mtl", "gradnorm"])
def test_gradient_weightings_combine_the_global_batch_across_ranks(method):
    """Two ranks emulated in one process: rank 1's backward runs first and records what it averages; rank 0's
    then averages with it. The shared update must be the method's update on the two ranks' mean per-task
    gradients (what one process with both ranks' data would compute), not the mean of two local updates."""
    from tasks_mtl.weighting import build_weighting

    torch.manual_seed(0)
    shared = [torch.nn.Parameter(0.1 * torch.randn(4, 3))]
    xs = [torch.randn(8, 4) for _ in range(2)]  # each rank's batch

    def losses(x):  # two tasks that pull the shared weights apart (their gradients conflict)
        y = x @ shared[0]
        return {"a": ((y - x[:, :3]) ** 2).mean(), "b": ((y + x[:, 1:] + 1) ** 2).mean()}

    def rank_update(x, mean_over_ranks):
        weighting = build_weighting(method, ["a", "b"])
        weighting.mean_over_ranks = mean_over_ranks
        shared[0].grad = None
        weighting.backward(losses(x), shared, [])
        own = [p.grad.reshape(-1) for p in weighting.parameters() if p.grad is not None]  # GradNorm's weights
        return torch.cat([shared[0].grad.reshape(-1), *own])

    sent = []
    local_1 = rank_update(xs[1], lambda v: sent.append(v.detach().clone()) or v)  # rank 1, recording
    received = iter(sent)
    synced_0 = rank_update(xs[0], lambda v: (v + next(received)) / 2)  # rank 0, averaging with rank 1
    local_0 = rank_update(xs[0], None)

    # the reference: per-task gradients of both ranks averaged, then the method's combination, in one process
    def combined(grads_by_rank):
        mean = [(a + b) / 2 for a, b in zip(*grads_by_rank)]
        weighting = build_weighting(method, ["a", "b"])
        stacked = torch.stack([g.reshape(-1) for g in mean])
        weighting.mean_over_ranks = lambda v: stacked if v.dim() == 2 else v
        shared[0].grad = None
        weighting.backward(losses(xs[0]), shared, [])
        return shared[0].grad.reshape(-1)

    per_task = [[torch.autograd.grad(l, shared, retain_graph=True)[0] for l in losses(x).values()] for x in xs]
    if method != "gradnorm":  # (GradNorm's shared update is linear; the gradient of its weights is not)
        assert torch.allclose(synced_0, combined(per_task), atol=1e-5)
    assert not torch.allclose(synced_0, (local_0 + local_1) / 2, atol=1e-4)  # so the sync is what makes it right
    assert len(sent) == 2  # the per-task gradients and the losses went through the ranks' mean
