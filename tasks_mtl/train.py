"""Staged multi-task training: one function per stage, readable top to bottom.

A stage starts from the previous stage's checkpoint (or a fresh encoder), trains the configured
tasks with its own freezing, learning rates, loss weighting and task sampler, and writes a
checkpoint directory plus `done.json`. Calling a finished stage again returns at once; a stage
that was interrupted resumes from its last `<dir>.resume/` save with optimizer, scheduler,
sampler, batch order, RNG and weighting state, so the result matches an uninterrupted run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tasks_mtl.checkpoint import load_checkpoint, load_state, save_checkpoint, save_state
from tasks_mtl.config import Config, StageConfig
from tasks_mtl.model import MultiTaskModel, new_encoder
from tasks_mtl.sampling import AllTasks, BatchOrder, build_sampler
from tasks_mtl.weighting import build_weighting

LogFn = Callable[[dict[str, float], int], None]


def resolve_device(cfg: Config) -> torch.device:
    if cfg.training.device != "auto":
        return torch.device(cfg.training.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stage_dir(cfg: Config, index: int) -> Path:
    return cfg.path(cfg.training.output_dir) / f"{index + 1}-{cfg.training.stages[index].name}"


def stage_key(cfg: Config, index: int) -> str:
    """Hash of everything the stage's result depends on (config of this and earlier stages, data, seed)."""
    meta = cfg.path(cfg.data.tokenized_dir) / "meta.json"
    parts = {
        "tokenized": json.loads(meta.read_text()).get("inputs") if meta.exists() else None,
        "seed": cfg.seed,
        "encoder": cfg.encoder.model_dump(mode="json"),
        "tasks": {n: t.model_dump(mode="json") for n, t in cfg.tasks.items()},
        "training": cfg.training.model_dump(mode="json", exclude={"stages", "output_dir", "log_every", "save_every",
                                                                  "threads", "device"}),
        "stages": [s.model_dump(mode="json") for s in cfg.training.stages[: index + 1]],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def is_done(cfg: Config, index: int) -> bool:
    marker = stage_dir(cfg, index) / "done.json"
    return marker.exists() and json.loads(marker.read_text()).get("key") == stage_key(cfg, index)


class TaskData:
    """A task's tokenized train split, its collator and its endless, resumable batch order."""

    def __init__(self, task, features: list[dict], tokenizer, batch_size: int, seed: int):
        self.features = features
        self.collate = task.collator(tokenizer)
        self.order = BatchOrder([len(f["input_ids"]) for f in features], batch_size, seed)

    def next_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        rows = [dict(self.features[i]) for i in self.order.next()]
        return {k: v.to(device) for k, v in self.collate(rows).items()}


def load_features(cfg: Config, task: str, split: str = "train") -> list[dict]:
    from datasets import load_from_disk

    path = cfg.path(cfg.data.tokenized_dir) / task / split
    if not path.exists():
        raise FileNotFoundError(f"no tokenized data at {path}; run `mtl tokenize` first")
    return load_from_disk(str(path)).to_list()


def stage_steps(cfg: Config, stage: StageConfig, sizes: dict[str, int]) -> int:
    if stage.steps is not None:
        return stage.steps
    per_step = cfg.training.batch_size * cfg.training.grad_accum
    return max(1, math.ceil(stage.epochs * max(sizes.values()) / per_step))


def train_sizes(cfg: Config, stage: StageConfig) -> dict[str, int]:
    """Tokenized train features per task of a stage, from the tokenize step's meta.json."""
    features = json.loads((cfg.path(cfg.data.tokenized_dir) / "meta.json").read_text())["features"]
    return {t: features[t]["train"] for t in stage.tasks or cfg.tasks}


def param_groups(model: MultiTaskModel, stage: StageConfig, weight_decay: float) -> list[dict]:
    """Encoder parameters by depth (layer-wise LR decay from the top), then heads and soft layers."""
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.bert.named_parameters():
        if not p.requires_grad:
            continue
        lr = stage.encoder_lr * stage.layer_decay ** (model.depth - model.encoder_layer_of(name))
        decay = 0.0 if p.ndim == 1 else weight_decay  # no decay on biases and LayerNorm
        groups.setdefault((lr, decay), []).append(p)
    for p in model.private_parameters():
        groups.setdefault((stage.head_lr, 0.0 if p.ndim == 1 else weight_decay), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def linear_schedule(total: int, warmup: float) -> Callable[[int], float]:
    warm = int(total * warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def train_stage(cfg: Config, index: int, log: LogFn | None = None, stop_after: int | None = None) -> Path:
    """Run stage `index` (0-based) and return its checkpoint directory.

    `stop_after` ends the stage early after that many steps with its resume state saved (tests use it
    to simulate an interruption).
    """
    stage = cfg.training.stages[index]
    out = stage_dir(cfg, index)
    if is_done(cfg, index):
        return out
    resume_dir = out.with_name(out.name + ".resume")
    device = resolve_device(cfg)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.seed + index)

    # -- model: previous stage's checkpoint, or a fresh encoder with a corpus tokenizer --------------
    if resume_dir.exists():
        model, tokenizer, _ = load_checkpoint(resume_dir, cfg.tasks, device)
    elif index > 0:
        previous = stage_dir(cfg, index - 1)
        if not is_done(cfg, index - 1):
            raise RuntimeError(f"stage {index} needs the finished stage before it at {previous}")
        model, tokenizer, _ = load_checkpoint(previous, cfg.tasks, device)
    else:
        from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

        tokenizer = load_tokenizer(cfg.path(cfg.data.tokenized_dir) / TOKENIZER_DIR)
        model = MultiTaskModel(new_encoder(cfg, len(tokenizer), tokenizer.pad_token_id), cfg.tasks).to(device)
    model.freeze(stage.freeze_layers)
    model.train()

    # -- data, sampler, weighting, optimizer ------------------------------------------------------------
    tasks = stage.tasks or list(cfg.tasks)
    data = {t: TaskData(model.task_types[t], load_features(cfg, t), tokenizer, cfg.training.batch_size,
                        seed=cfg.seed + 1000 * index + i) for i, t in enumerate(tasks)}
    sizes = {t: len(d.features) for t, d in data.items()}
    total = stage_steps(cfg, stage, sizes)
    weighting = build_weighting(stage.weighting, tasks, **stage.weighting_args).to(device)
    if weighting.requires_all_tasks:
        sampler = AllTasks(tasks, sizes, total, cfg.seed)
    else:
        sampler = build_sampler(stage.sampler, tasks, sizes, total, cfg.seed + index, **stage.sampler_args)
    shared = model.shared_parameters()
    private = model.private_parameters() + [p for p in weighting.parameters() if p.requires_grad]
    groups = param_groups(model, stage, cfg.training.weight_decay)
    if any(p.requires_grad for p in weighting.parameters()):
        groups.append({"params": [p for p in weighting.parameters() if p.requires_grad], "lr": stage.head_lr,
                       "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total, stage.warmup))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.training.bf16 else nullcontext()

    step = 0
    if resume_dir.exists():
        state = load_state(resume_dir)
        step = state["step"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        weighting.load_state_dict(state["weighting"])
        for t, order in state["batches"].items():
            data[t].order.load_state_dict(order)
        torch.set_rng_state(state["rng"])

    # -- the loop --------------------------------------------------------------------------------------
    log_file = out.with_name(out.name + ".log.csv")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if step == 0 and log_file.exists():
        log_file.unlink()
    window: dict[str, list[float]] = {}
    started, tokens = time.perf_counter(), 0
    offset = sum(stage_steps(cfg, s, train_sizes(cfg, s)) for s in cfg.training.stages[:index])  # global step
    while step < total:
        weights: dict[str, float] = {}
        for _ in range(cfg.training.grad_accum):
            losses = {}
            for task in sampler.next():
                batch = data[task].next_batch(device)
                tokens += int(batch["attention_mask"].sum())
                with autocast:
                    loss, _ = model(task, batch)
                losses[task] = loss / cfg.training.grad_accum
                window.setdefault(task, []).append(loss.item())
            weights.update(weighting.backward(losses, shared, private))
        if cfg.training.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(shared + private, cfg.training.clip_norm)
        optimizer.step()
        scheduler.step()
        weighting.after_step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.training.log_every == 0 or step == total:
            metrics = {f"loss/{t}": float(np.mean(v)) for t, v in window.items()}
            metrics |= {f"weight/{t}": w for t, w in weights.items()}
            metrics |= {"lr/encoder": scheduler.get_last_lr()[0], "tokens_per_s": tokens / (time.perf_counter() - started)}
            _append_log(log_file, offset + step, stage.name, metrics)
            if log:
                log(metrics, offset + step)
            window = {}
        if cfg.training.save_every and step % cfg.training.save_every == 0 and step < total or step == stop_after:
            save_checkpoint(model, tokenizer, resume_dir, cfg.encoder.max_length)
            save_state({
                "step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "sampler": sampler.state_dict(), "weighting": weighting.state_dict(),
                "batches": {t: d.order.state_dict() for t, d in data.items()}, "rng": torch.get_rng_state(),
            }, resume_dir)
            if step == stop_after:
                return resume_dir

    save_checkpoint(model, tokenizer, out, cfg.encoder.max_length)
    (out / "done.json").write_text(json.dumps({"key": stage_key(cfg, index), "steps": total,
                                               "seconds": round(time.perf_counter() - started, 1)}))
    shutil.rmtree(resume_dir, ignore_errors=True)
    return out


def _append_log(path: Path, step: int, stage: str, metrics: dict[str, float]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh)
        if new:
            writer.writerow(["step", "stage", "metric", "value"])
        for key, value in sorted(metrics.items()):
            writer.writerow([step, stage, key, f"{value:.6g}"])


def write_loss_report(cfg: Config) -> Path:
    """Collect every stage's loss log into reports/losses/<task>.csv (step,loss) for `dvc plots`."""
    out = cfg.path(cfg.reports_dir) / "losses"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows: dict[str, list[tuple[int, str, str]]] = {}
    for index in range(len(cfg.training.stages)):
        log_file = stage_dir(cfg, index).with_name(stage_dir(cfg, index).name + ".log.csv")
        if not log_file.exists():
            continue
        with log_file.open() as fh:
            for row in csv.DictReader(fh):
                if row["metric"].startswith("loss/"):
                    rows.setdefault(row["metric"][5:], []).append((int(row["step"]), row["stage"], row["value"]))
    for task, values in rows.items():
        with (out / f"{task}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "stage", "loss"])
            writer.writerows(values)
    return out


def train_all(cfg: Config, log: LogFn | None = None) -> Path:
    """Every stage in order; returns the last stage's checkpoint."""
    out = None
    for index in range(len(cfg.training.stages)):
        out = train_stage(cfg, index, log)
    write_loss_report(cfg)
    return out


def train_stage_by_name(cfg: Config, name: str, log: LogFn | None = None) -> Path:
    names = [s.name for s in cfg.training.stages]
    if name not in names:
        raise ValueError(f"unknown stage {name!r}; stages: {names}")
    return train_stage(cfg, names.index(name), log)
