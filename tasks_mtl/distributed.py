"""Data-parallel training over several processes: torchrun starts them, `Ranks` keeps them in step.

`mtl train --nproc N` (or `training.nproc: N`, which the flow's training step honours) writes the resolved
configuration to a file and starts `python -m torch.distributed.run --standalone --nproc-per-node N -m
tasks_mtl.distributed --config FILE` (`launch`). A process started by torchrun some other way (`torchrun ...
--no-python mtl train`, as infra/k8s/train/train-multinode.yaml does across nodes) is recognised by its
environment and joins the group the same way (`process_group`). The backend is gloo on a CPU and NCCL on
CUDA, each rank on `cuda:<LOCAL_RANK>`; the device type comes from `training.device`.

What the trainer (tasks_mtl/train.py) does with `Ranks`, all of it a no-op in one process:
- every rank starts from rank 0's weights (`broadcast`), and draws the same task at each step: the task
  sampler is seeded from the run seed alone, and every rank counts the same whole-stream sizes;
- data within a task is sharded, each rank keeping every world-th row (tasks_mtl/streams.py), so the
  global batch is `nproc` times the configured `batch_tokens` (or `batch_size`): that is per process;
- after the backward passes of a step the gradients of every trainable parameter (the weighting's own
  included) are averaged over the ranks in one flat all-reduce (`average_gradients`), sparse n-gram tables
  through a sparse all-reduce on gloo (densified on NCCL, which has none), before clipping and the
  optimizer step, so the weights stay identical on every rank. This is done by hand rather than by wrapping
  the model in DistributedDataParallel: DDP reduces during one `backward()` of `forward()`'s output, while
  the loss weightings call `torch.autograd.grad` per task and several partial backwards per step
  (tasks_mtl/weighting/base.py), which DDP's hooks would miss or count twice;
- the gradient-based weightings (PCGrad, CAGrad, IMTL-G, Nash-MTL, GradNorm) combine per-task gradients
  non-linearly, so averaging their local results would not be their update on the global batch. They
  average the per-task gradient matrix [T, P] and the task losses over the ranks first
  (`LossWeighting.sync`, set to `Ranks.mean`), then combine: every rank computes the same update of the
  global batch. Loss-driven state (DWA's windows, FAMO's loss history, GradNorm's initial losses) is built
  from the ranks' mean losses, so the weighting's state is identical on every rank too;
- a NaN/inf on any rank skips the step on all (`agree`); logged losses and tokens/s are over all ranks;
- only rank 0 writes: the stage log, resume saves, the conflict probe, checkpoints and `done.json` (which
  records every rank's weight digest, `rank_digests`); the others wait at a barrier. Registration happens in
  the flow's own process after training, so once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tasks_mtl.config import Config


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and a world size)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def configured_device(cfg: Config) -> torch.device:
    """`training.device` ("auto": cuda when present, else cpu)."""
    if cfg.training.device != "auto":
        return torch.device(cfg.training.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def process_group(cfg: Config) -> Iterator[None]:
    """Join the torchrun group for the duration (gloo on cpu, NCCL on cuda); nothing outside torchrun or in a
    world of one, or when a group is already running."""
    if not under_torchrun() or int(os.environ["WORLD_SIZE"]) < 2 or dist.is_initialized():
        yield
        return
    device = configured_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


class Ranks:
    """This process's place among the training processes, and the few collectives the trainer needs.
    With one process every method returns its input or does nothing."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @classmethod
    def current(cls) -> Ranks:
        if not dist.is_available() or not dist.is_initialized():
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self) -> tuple[int, int]:
        return self.rank, self.world

    def device(self, device: torch.device) -> torch.device:
        """The configured device, on this rank's own GPU when it is CUDA without an index."""
        if self.world > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    # -- collectives ------------------------------------------------------------------------------------

    def broadcast(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers to every rank (as DDP does when it wraps a model)."""
        if self.world > 1:
            with torch.no_grad():
                for tensor in [*module.parameters(), *module.buffers()]:
                    dist.broadcast(tensor.data, src=0)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of `value` over the ranks (a new tensor; every rank must call it with the same shape)."""
        if self.world == 1:
            return value
        out = value.detach().clone()
        dist.all_reduce(out)
        return out / self.world

    def sums(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sums of `values` over the ranks."""
        if self.world == 1:
            return list(values)
        out = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(out)
        return out.tolist()

    def agree(self, reason: str | None, device: torch.device) -> str | None:
        """A reason to skip this step if any rank has one (this rank's own, else a note that another had one)."""
        if self.world == 1:
            return reason
        flag = torch.tensor([0.0 if reason is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return reason or ("another process had a non-finite loss" if flag.item() > 0 else None)

    def any(self, flag: bool, device: torch.device) -> bool:
        return self.agree("yes" if flag else None, device) is not None

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def window_means(self, window: dict[str, list[float]], keys: list[str], device: torch.device) -> dict[str, float]:
        """The mean of each key's values over every rank (keys in the same order on every rank)."""
        flat = [x for k in keys for x in (sum(window.get(k, [])), len(window.get(k, [])))]
        totals = self.sums(flat, device)
        return {k: totals[2 * i] / totals[2 * i + 1] for i, k in enumerate(keys) if totals[2 * i + 1] > 0}

    def average_gradients(self, params: list[torch.nn.Parameter], sparse: set[int]) -> None:
        """Average `.grad` over the ranks. A parameter no rank has a gradient for keeps none (AdamW must not
        see a zero gradient for a head that did not run); where only some ranks have one, the others count
        zeros. Dense gradients go in one flat all-reduce; `sparse` (ids of n-gram tables) one each."""
        if self.world == 1 or not params:
            return
        device = params[0].device
        present = torch.tensor([float(p.grad is not None) for p in params], device=device)
        dist.all_reduce(present)
        used = [p for p, n in zip(params, present.tolist()) if n > 0]
        dense = [p for p in used if id(p) not in sparse]
        if dense:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                              for p in dense])
            dist.all_reduce(flat)
            flat /= self.world
            offset = 0
            for p in dense:
                p.grad = flat[offset:offset + p.numel()].view_as(p).to(p.dtype).clone()
                offset += p.numel()
        for p in used:
            if id(p) in sparse:
                p.grad = self._sparse_mean(p)

    def _sparse_mean(self, p: torch.nn.Parameter) -> torch.Tensor:
        grad = p.grad if p.grad is not None else torch.sparse_coo_tensor(
            torch.empty((1, 0), dtype=torch.long, device=p.device), torch.empty((0, *p.shape[1:]), device=p.device),
            p.shape)
        if dist.get_backend() == "gloo":  # gloo reduces sparse tensors (in place)
            grad = grad.coalesce()
            dist.all_reduce(grad)
            return (grad / self.world).coalesce()
        dense = grad.to_dense()  # NCCL has no sparse all-reduce
        dist.all_reduce(dense)
        return (dense / self.world).to_sparse(sparse_dim=1)

    def digests(self, module: torch.nn.Module) -> list[str]:
        """sha256 of every rank's weights (state_dict), in rank order: equal when the ranks stayed in step."""
        return self.gather(state_digest(module))

    def decorrelate(self, seed: int) -> None:
        """Give ranks above 0 a dropout RNG stream of their own (rank 0 keeps the single-process one)."""
        if self.rank > 0:
            torch.manual_seed(hash((seed, self.rank)) % (2**63))


def state_digest(module: torch.nn.Module) -> str:
    """sha256 over the names and bytes of the module's state_dict."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# -- launching -------------------------------------------------------------------------------------------

def torchrun_command(config_file: Path, nproc: int, stage: str | None = None) -> list[str]:
    """The torchrun command line that trains the configuration in `config_file` with `nproc` processes on this
    machine (a free rendezvous port of its own: --standalone)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "tasks_mtl.distributed", "--config", str(config_file)]
    return command + (["--stage", stage] if stage else [])


def launch(cfg: Config, nproc: int, stage: str | None = None) -> Path:
    """Train `cfg` (every stage, or `stage`) in `nproc` processes under torchrun and wait; returns the last
    trained stage's checkpoint directory. A failing rank fails the whole run (torchrun stops the rest) and
    raises here."""
    from tasks_mtl.runlog import stage_dir

    out = cfg.path(cfg.training.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = cfg.model_dump(mode="json")
    resolved["root"] = str(cfg.root.resolve())
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix=".launch-", dir=out, delete=False) as fh:
        json.dump(resolved, fh)
    env = dict(os.environ)
    if cfg.training.threads:  # torchrun would set 1 thread per process otherwise
        env.setdefault("OMP_NUM_THREADS", str(cfg.training.threads))
    try:
        result = subprocess.run(torchrun_command(Path(fh.name), nproc, stage), env=env, check=False)
    finally:
        Path(fh.name).unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"distributed training with {nproc} processes failed (torchrun exit code "
                           f"{result.returncode}); the first failing rank's error is above")
    names = [s.name for s in cfg.training.stages]
    return stage_dir(cfg, names.index(stage) if stage else len(names) - 1)


def main(argv: list[str] | None = None) -> None:
    """The torchrun entry (`-m tasks_mtl.distributed --config FILE [--stage NAME]`): one rank's training."""
    import argparse

    from tasks_mtl.progress import StageProgress
    from tasks_mtl.train import train_all, train_stage_by_name

    parser = argparse.ArgumentParser(prog="python -m tasks_mtl.distributed")
    parser.add_argument("--config", type=Path, required=True, help="resolved configuration (JSON)")
    parser.add_argument("--stage", default=None, help="train only this stage")
    args = parser.parse_args(argv)
    cfg = Config.model_validate(json.loads(args.config.read_text(encoding="utf-8")))
    with process_group(cfg):
        progress = StageProgress() if Ranks.current().is_main else None
        out = train_stage_by_name(cfg, args.stage, progress=progress) if args.stage else train_all(cfg, progress=progress)
        if Ranks.current().is_main:
            print(f"checkpoint -> {out}", flush=True)


if __name__ == "__main__":
    main()
