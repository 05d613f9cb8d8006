"""A training process SIGKILLed in the middle of a stage (between steps, or in the middle of writing a resume
save) is run again: it resumes from the last complete save, not from step 0, and ends with the same weights,
bit for bit on CPU, as a run that was never interrupted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_project import TINY_STAGES, make_tiny_project

from tasks_mtl.runlog import stage_dir, stage_log
from tasks_mtl.tokenization import tokenize

JOINT_STEPS, SAVE_EVERY = 16, 4
STAGES = [s | {"steps": JOINT_STEPS} if s["name"] == "joint" else s for s in TINY_STAGES]
OFFSET = sum(s["steps"] for s in STAGES[:2])  # global steps before the joint stage

# Trains every stage, printing "<stage> <step>" after each step. Told a stage and step, it stops there (after
# that step, or inside the resume save written at that step) and waits to be killed.
TRAIN = r"""
import sys, time
import tasks_mtl.checkpoint as checkpoint
from tasks_mtl.config import load_config
from tasks_mtl.train import train_all

where, stage, step = sys.argv[2], sys.argv[3], int(sys.argv[4])
now = {"stage": None, "step": 0}

def progress(name, at, total, metrics):
    now.update(stage=name, step=at)
    print(name, at, flush=True)
    if where == "step" and (name, at) == (stage, step):
        time.sleep(300)

write_manifest = checkpoint.write_manifest

def manifest_last(directory):  # a save's files are written; its manifest and rename are still to come
    at = (now["stage"], now["step"]) == (stage, step)
    if where == "save" and at and directory.name.endswith(".resume.tmp"):
        print("inside the save", flush=True)
        time.sleep(300)
    return write_manifest(directory)

checkpoint.write_manifest = manifest_last
train_all(load_config(sys.argv[1]), progress=progress)
"""


def _train(root: Path, where: str = "nowhere", stage: str = "", step: int = 0):
    """Train the project at `root` in a new process; with `where`, SIGKILL it once it reports that point."""
    command = [sys.executable, "-c", TRAIN, str(root / "params.yaml"), where, stage, str(step)]
    if where == "nowhere":
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    wanted = "inside the save" if where == "save" else f"{stage} {step}"
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        try:
            for line in proc.stdout:
                if line.strip() == wanted:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL, "training ended before it could be killed"
    return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A tokenized tiny project (`base`) and its final checkpoint from one run that nothing interrupted."""
    root = tmp_path_factory.mktemp("crash")
    params = {"training": {"stages": STAGES, "save_every": SAVE_EVERY, "log_every": 1, "threads": 1}}
    tokenize(make_tiny_project(root / "base", params))
    shutil.copytree(root / "base", root / "straight")
    done = _train(root / "straight")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "base", root / "straight"


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    encoder = load_file(str(checkpoint / "encoder" / "model.safetensors"))
    return load_file(str(checkpoint / "heads.safetensors")) | encoder


@pytest.mark.slow
@pytest.mark.parametrize(("where", "step", "resumed_at"), [("step", 6, 4), ("save", 8, 4)])
def test_sigkill_mid_stage_then_rerun_resumes_and_matches_an_uninterrupted_run(uninterrupted, tmp_path, where,
                                                                                 step, resumed_at):
    from tasks_mtl.config import load_config

    base, straight = uninterrupted
    root = tmp_path / "run"
    shutil.copytree(base, root)
    cfg = load_config(root / "params.yaml")
    _train(root, where, "joint", step)

    joint = stage_dir(cfg, 2)
    resume = joint.with_name(joint.name + ".resume")
    assert (stage_dir(cfg, 1) / "done.json").exists() and not joint.exists()  # killed inside the joint stage
    assert (resume / "manifest.json").exists()
    if where == "save":  # the save being written when the process died: files without a manifest
        partial = joint.with_name(joint.name + ".resume.tmp")
        assert (partial / "heads.safetensors").exists() and not (partial / "manifest.json").exists()

    rerun = _train(root)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"stage 'joint' resumes at step {resumed_at} of {JOINT_STEPS}" in rerun.stderr
    assert rerun.stdout.split("\n")[0] == f"joint {resumed_at + 1}"  # finished stages are not run again

    final = stage_dir(cfg, len(STAGES) - 1)
    a, b = _weights(final), _weights(stage_dir(load_config(straight / "params.yaml"), len(STAGES) - 1))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []  # bitwise on CPU
    ja, jb = _weights(joint), _weights(stage_dir(load_config(straight / "params.yaml"), 2))
    assert [k for k in ja if not torch.equal(ja[k], jb[k])] == []

    def log(project: Path) -> list[list[str]]:  # the joint stage's rows, timings left out
        text = stage_log(load_config(project / "params.yaml"), 2).read_text()
        rows = [line.split(",") for line in text.splitlines()]
        return [row for row in rows[1:] if row[2] != "tokens_per_s"]

    rows = log(root)
    assert rows == log(straight)  # every step logged once (none twice from the killed run), same losses
    assert sorted({int(r[0]) for r in rows}) == list(range(OFFSET + 1, OFFSET + JOINT_STEPS + 1))
    leftovers = [p.name for p in final.parent.iterdir() if p.name.endswith((".resume", ".tmp", ".old"))]
    assert leftovers == []
