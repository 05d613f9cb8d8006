"""Staged multi-task training: one function per stage, readable top to bottom.

A stage starts from the previous stage's checkpoint (or a fresh encoder), trains the configured
tasks with its own freezing, learning rates, loss weighting and task sampler, and writes a
checkpoint directory plus `done.json`. Calling a finished stage again returns at once; a stage
that was interrupted resumes from its last `<dir>.resume/` save with optimizer, scheduler,
sampler, batch order, RNG and weighting state, so the result matches an uninterrupted run (a broken
or stale save is skipped: tasks_mtl/resume.py). A step with a NaN or infinite loss or gradient moves
nothing and is counted; too many stop the stage (tasks_mtl/nonfinite.py). Under torchrun the same loop
runs on every rank, kept in step by tasks_mtl/distributed.py (sharded data, averaged gradients, rank 0 writes);
the data streams live in tasks_mtl/streams.py, the optimizers in tasks_mtl/optim.py.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from tasks_mtl.checkpoint import load_checkpoint, save_checkpoint
from tasks_mtl.config import Config, StageConfig
from tasks_mtl.conflict import ConflictProbe, write_conflict_report
from tasks_mtl.crf_fit import fit_window_crfs
from tasks_mtl.distributed import Ranks, configured_device
from tasks_mtl.fingerprint import fingerprint
from tasks_mtl.heap import keep_freed_memory
from tasks_mtl.model import MultiTaskModel, bf16_fast, new_model
from tasks_mtl.ngrams import sparse_parameters
from tasks_mtl.nonfinite import NonFiniteSteps
from tasks_mtl.optim import (NGRAM_MODULES, LossScale, learning_rates, linear_schedule,  # noqa: F401
                             make_optimizers, param_groups)
from tasks_mtl.progress import ProgressFn
from tasks_mtl.resume import discard_resume, find_resume, rank_part, restore, training_state, trim_log
from tasks_mtl.runlog import append_log, read_logs, stage_dir, stage_log, stage_timing
from tasks_mtl.sampling import AllTasks, build_sampler
from tasks_mtl.streams import (StreamData, co_labelled_collator, co_labelled_groups, load_features,  # noqa: F401
                               merge_features, stage_batch_tokens, stream_data)
from tasks_mtl.tfidf import choose_own_weights, fit_tfidf_heads
from tasks_mtl.weighting import build_weighting

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float], int], None]


def resolve_device(cfg: Config) -> torch.device:
    """This process's device: `training.device` (auto: cuda when present), its own GPU under torchrun."""
    return Ranks.current().device(configured_device(cfg))


def use_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.training.bf16 if cfg.training.bf16 is not None else bf16_fast(device)


def stage_key(cfg: Config, index: int) -> str:
    """Fingerprint of everything the stage's result depends on: config of this and earlier stages, the
    tokenized data, seed, and the package source (tasks_mtl/fingerprint.py), so a code edit retrains."""
    meta = cfg.path(cfg.data.tokenized_dir) / "meta.json"
    return fingerprint(
        json.loads(meta.read_text()).get("inputs") if meta.exists() else None,
        seed=cfg.seed,
        encoder=cfg.encoder,
        tasks=dict(cfg.tasks),
        training=cfg.training.model_dump(mode="json", exclude={"stages", "output_dir", "log_every", "save_every",
                                                               "threads", "device", "max_nonfinite_steps",
                                                               "conflict_every", "nproc"}),
        stages=cfg.training.stages[: index + 1],
    )


def is_done(cfg: Config, index: int) -> bool:
    marker = stage_dir(cfg, index) / "done.json"
    return marker.exists() and json.loads(marker.read_text()).get("key") == stage_key(cfg, index)


def stage_steps(cfg: Config, stage: StageConfig, sizes: dict[str, int]) -> int:
    """Optimizer steps of a stage: given, or `epochs` over the largest task at `batch_size` rows per batch
    (with a token budget, rows per batch are estimated at batch_tokens / 48, a People's Daily sentence)."""
    if stage.steps is not None:
        return stage.steps
    budget = stage_batch_tokens(cfg, stage)
    rows = cfg.training.batch_size if budget is None else max(1, budget // 48)
    return max(1, math.ceil(stage.epochs * max(sizes.values()) / (rows * cfg.training.grad_accum)))


def train_sizes(cfg: Config, stage: StageConfig) -> dict[str, int]:
    """Tokenized train features per task of a stage, from the tokenize step's meta.json."""
    features = json.loads((cfg.path(cfg.data.tokenized_dir) / "meta.json").read_text())["features"]
    return {t: features[t]["train"] for t in stage.task_names(cfg.tasks)}


def train_stage(cfg: Config, index: int, log: LogFn | None = None, stop_after: int | None = None,
                progress: ProgressFn | None = None, deadline: float | None = None) -> Path:
    """Run stage `index` (0-based) and return its checkpoint directory. `log` gets the metrics of each
    logging step (MLflow), `progress` the stage's name, step and total as well (a person watching).

    `stop_after` ends the stage early after that many steps with its resume state saved (tests use it
    to simulate an interruption); so does passing `deadline` (a `time.time()`), at the first step after it
    (a time budget: tasks_mtl/leaderboard.py). Under torchrun every rank calls it; `log` and `progress` are
    called on rank 0 only, with the metrics of all ranks.
    """
    keep_freed_memory()  # no page faults for the memory each step allocates again (tasks_mtl/heap.py)
    stage = cfg.training.stages[index]
    out = stage_dir(cfg, index)
    if is_done(cfg, index):
        return out
    resume_dir = out.with_name(out.name + ".resume")
    key = stage_key(cfg, index)
    resume = find_resume(resume_dir, key)  # (directory, state) of the last good save of this stage, or None
    ranks = Ranks.current()  # one process, or this rank of a torchrun group (tasks_mtl/distributed.py)
    device = resolve_device(cfg)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    torch.manual_seed(cfg.seed + index)

    # -- model: previous stage's checkpoint, or a fresh encoder with a corpus tokenizer --------------
    if resume is not None:
        model, tokenizer, _ = load_checkpoint(resume[0], cfg.tasks, device)
    elif index > 0:
        previous = stage_dir(cfg, index - 1)
        if not is_done(cfg, index - 1):
            raise RuntimeError(f"stage {index} needs the finished stage before it at {previous}")
        model, tokenizer, _ = load_checkpoint(previous, cfg.tasks, device)
    else:
        from tasks_mtl.ngrams import NgramTables
        from tasks_mtl.tokenization import TOKENIZER_DIR, load_tokenizer

        tokenized = cfg.path(cfg.data.tokenized_dir)
        tokenizer = load_tokenizer(tokenized / TOKENIZER_DIR)
        model = new_model(cfg, tokenizer, NgramTables.load(tokenized)).to(device)
    model.freeze("all" if stage.features_only else stage.freeze_layers)
    if stage.features_only:  # the encoder is not run: its input's bigram embeddings get no gradient either
        for p in model.bigrams.parameters() if model.bigrams is not None else []:
            p.requires_grad = False
    model.train()

    # -- data, sampler, weighting, optimizer ------------------------------------------------------------
    tasks = stage.task_names(cfg.tasks)
    if stage.features_only:  # heads fitted by convex solvers get it first (a resume save holds it already)
        fitted = [t for t in tasks if cfg.tasks[t].fitted()]
        if resume is None and ranks.is_main:  # the others receive the result with the weights below
            fit_window_crfs(cfg, model, fitted, load_features)
            fit_tfidf_heads(cfg, model, fitted, load_features)
        tasks = [t for t in tasks if t not in fitted]
        if not tasks:  # nothing left for SGD
            ranks.broadcast(model)
            return finish_stage(cfg, index, model, tokenizer, {"key": key, "steps": 0, "nonfinite_steps": 0}, ranks)
    ranks.broadcast(model)  # every rank starts from rank 0's weights
    data = stream_data(cfg, model, tokenizer, tasks, index, ranks.shard)  # this rank's share of each stream
    sizes = {name: d.size for name, d in data.items()}  # whole streams: the same sampler and steps on every rank
    total = stage_steps(cfg, stage, sizes)
    weighting = build_weighting(stage.weighting, tasks, **stage.weighting_args).to(device)
    weighting.accumulation = cfg.training.grad_accum
    weighting.mean_over_ranks = ranks.mean if ranks.world > 1 else None  # combine the global batch's gradients
    draws = total * cfg.training.grad_accum  # the sampler is asked once per micro-batch
    if weighting.requires_all_tasks:
        if stage.sampler != "all":
            logger.warning("stage %r: %s needs every task's loss each step, so the %r sampler is replaced by "
                           "'all'", stage.name, stage.weighting, stage.sampler)
        sampler = AllTasks(list(data), sizes, draws, cfg.seed)
    else:
        sampler = build_sampler(stage.sampler, list(data), sizes, draws, cfg.seed + index, **stage.sampler_args)
    shared = model.shared_parameters()
    weighting_params = [p for p in weighting.parameters() if p.requires_grad]
    private = model.private_parameters() + weighting_params
    groups = param_groups(model, stage, cfg.training.weight_decay)
    if weighting_params and weighting.lr is None:  # learnt with the heads, on their schedule
        groups.append({"params": weighting_params, "lr": stage.head_lr, "weight_decay": 0.0, "name": "weighting"})
    optimizers = make_optimizers(groups)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, linear_schedule(total, stage.warmup)) for o in optimizers]
    if weighting_params and weighting.lr is not None:  # the method's own optimizer and constant rate (FAMO)
        optimizers.append(torch.optim.Adam(weighting_params, lr=weighting.lr))
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(optimizers[-1], lambda _: 1.0))
    sparse_ids = {id(p) for p in sparse_parameters(model)}
    clipped = [p for p in model.parameters() if p.requires_grad and id(p) not in sparse_ids]
    synced = [p for p in model.parameters() if p.requires_grad] + weighting_params  # averaged over the ranks
    bf16 = use_bf16(cfg, device) and not cfg.training.fp16
    half = torch.float16 if cfg.training.fp16 else torch.bfloat16 if bf16 else None
    autocast = torch.autocast(device.type, dtype=half) if half is not None else nullcontext()
    loss_scale = LossScale(cfg.training.fp16, device)

    step, nonfinite, overflows = 0, NonFiniteSteps(stage.name, cfg.training.max_nonfinite_steps), 0
    if resume is not None:
        step, nonfinite.count = resume[1]["step"], resume[1]["nonfinite"]
        restore(resume[1], optimizers, schedulers, sampler, weighting, data, ranks.rank)
        loss_scale.load_state_dict(resume[1].get("loss_scale", {}))
        logger.warning("stage %r resumes at step %d of %d from %s", stage.name, step, total, resume[0])
    else:  # dropout: a stream per rank (rank 0's is the one-process one); a resumed rank restored its own
        ranks.decorrelate(cfg.seed + index)

    # -- the loop --------------------------------------------------------------------------------------
    log_file = stage_log(cfg, index)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    offset = sum(stage_steps(cfg, s, train_sizes(cfg, s)) for s in cfg.training.stages[:index])  # global step
    if ranks.is_main:
        trim_log(log_file, offset + step)  # rows an interrupted run wrote after its last save (all, from step 0)
    probe = ConflictProbe.for_stage(cfg, index, data, device, offset + step) if ranks.is_main else None
    window: dict[str, list[float]] = {}
    started, tokens = time.perf_counter(), 0
    weight_window: dict[str, list[float]] = {}
    while step < total:
        weighting_before = {k: v.clone() for k, v in weighting.state_dict().items()}  # put back if skipped
        bad = None  # why this step is skipped: the first NaN/inf loss, or gradient norm
        for _ in range(cfg.training.grad_accum):
            losses = {}
            for stream in sampler.next():
                batch = data[stream].next_batch(device)
                tokens += int(batch["attention_mask"].sum())
                with autocast:
                    outputs = model.forward_tasks(data[stream].tasks, batch, stage.features_only)
                for task, (loss, _) in outputs.items():
                    losses[task] = loss_scale.scaled(loss / cfg.training.grad_accum)
                    value = loss.item()
                    if math.isfinite(value):
                        window.setdefault(task, []).append(value)
                    elif bad is None:
                        bad = f"task {task!r} has a loss of {value}"
            bad = ranks.agree(bad, device)  # a NaN on any rank skips the step on all
            if bad is None:
                for task, w in weighting.backward(losses, shared, private).items():
                    weight_window.setdefault(task, []).append(w)
        overflow = False  # fp16: the scaled gradients overflowed; the scaler skips the step and lowers its scale
        if bad is None:
            ranks.average_gradients(synced, sparse_ids)
            overflow = not loss_scale.unscale(optimizers)
        if bad is None and not overflow and cfg.training.clip_norm > 0:  # dense model parameters: not the
            norm = torch.nn.utils.clip_grad_norm_(clipped, cfg.training.clip_norm)  # weighting's or sparse tables
            if not torch.isfinite(norm):
                bad = f"the gradient norm is {float(norm)} (tasks {', '.join(sorted(losses))})"
        if bad is None:
            loss_scale.step(optimizers)
            if overflow:
                overflows += 1
                weighting.load_state_dict(weighting_before)
            else:
                weighting.after_step()
        else:  # nothing moves; past the limit the stage stops here
            nonfinite.skip(step + 1, bad)
            weighting.load_state_dict(weighting_before)
        for scheduler in schedulers:
            scheduler.step()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        step += 1

        if step % cfg.training.log_every == 0 or step == total:  # means over every rank; rank 0 writes them
            metrics = {f"loss/{t}": v for t, v in ranks.window_means(window, tasks, device).items()}
            metrics |= {f"weight/{t}": v for t, v in ranks.window_means(weight_window, tasks, device).items()}
            metrics |= learning_rates(optimizers[0])
            metrics |= {"tokens_per_s": ranks.sums([tokens], device)[0] / (time.perf_counter() - started),
                        "bf16": float(bf16)}
            if loss_scale.enabled:
                metrics |= {"fp16_loss_scale": loss_scale.scale, "fp16_overflow_steps": float(overflows)}
            if nonfinite.count:
                metrics["nonfinite_steps"] = float(nonfinite.count)
            if ranks.is_main:
                append_log(log_file, offset + step, stage.name, metrics)
                if log:
                    log(metrics, offset + step)
                if progress:
                    progress(stage.name, step, total, metrics)
            window, weight_window = {}, {}
        if probe and probe.due(step, total):  # task-gradient cosines on fixed batches; changes nothing
            probe.record(model, offset + step, log)
        if deadline is not None and ranks.any(time.time() >= deadline, device) and step < total:
            stop_after = step
        if cfg.training.save_every and step % cfg.training.save_every == 0 and step < total or step == stop_after:
            parts = ranks.gather(rank_part(data))  # each rank's batch orders (own shard) and dropout RNG
            if ranks.is_main:
                state = training_state(step, key, optimizers, schedulers, sampler, weighting, data, nonfinite.count,
                                       parts if ranks.world > 1 else None)
                state["loss_scale"] = loss_scale.state_dict()
                save_checkpoint(model, tokenizer, resume_dir, cfg.encoder.max_length, state=state)
            ranks.barrier()
            if step == stop_after:
                return resume_dir

    out = finish_stage(cfg, index, model, tokenizer, {"key": key, "steps": total, "nonfinite_steps": nonfinite.count},
                       ranks)
    if ranks.is_main:  # not in done.json: the checkpoint of a run is the same file by file each time
        stage_timing(cfg, index).write_text(json.dumps({"seconds": round(time.perf_counter() - started, 1)}))
    return out


def finish_stage(cfg: Config, index: int, model: MultiTaskModel, tokenizer, done: dict,
                 ranks: Ranks | None = None) -> Path:
    """Save the stage's checkpoint, mark it done (`done`: its key and figures) and drop its resume saves. Under
    several processes rank 0 does it, after recording every rank's weight digest in `done` (`rank_digests`:
    all equal unless the ranks drifted apart, which stops the stage), while the others wait. After the last stage
    it first sets the TF-IDF heads' mix on validation (tasks_mtl.tfidf.choose_own_weights; figures in `done`)."""
    ranks = ranks or Ranks()
    out = stage_dir(cfg, index)
    if ranks.world > 1:
        digests = ranks.digests(model)
        if len(set(digests)) != 1:
            raise RuntimeError(f"stage {index}: the weights differ between the {ranks.world} processes after training")
        done = done | {"processes": ranks.world, "rank_digests": digests}
    if ranks.is_main:
        if index == len(cfg.training.stages) - 1:  # the model that ships: its TF-IDF heads' mix, on validation
            done = done | {"own_weight": choose_own_weights(cfg, model, tokenizer)}
        save_checkpoint(model, tokenizer, out, cfg.encoder.max_length, trained=cfg.trained_tasks(index))
        (out / "done.json").write_text(json.dumps(done))
        discard_resume(out.with_name(out.name + ".resume"))
    ranks.barrier()
    return out


def write_loss_report(cfg: Config) -> Path:
    """Collect every stage's loss log into reports/losses/<task>.csv (step,loss) for `dvc plots`, and the
    task-conflict samples, if any, into reports/conflict.{json,html}."""
    out = cfg.path(cfg.reports_dir) / "losses"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    rows: dict[str, list[tuple[int, str, str]]] = {}
    for step, stage, metric, value in read_logs(cfg):
        if metric.startswith("loss/"):
            rows.setdefault(metric[5:], []).append((step, stage, f"{value:.6g}"))
    for task, values in rows.items():
        with (out / f"{task}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["step", "stage", "loss"])
            writer.writerows(values)
    write_conflict_report(cfg)
    return out


def train_all(cfg: Config, log: LogFn | None = None, progress: ProgressFn | None = None) -> Path:
    """Every stage in order; returns the last stage's checkpoint."""
    out = None
    for index in range(len(cfg.training.stages)):
        out = train_stage(cfg, index, log, progress=progress)
    if Ranks.current().is_main:
        write_loss_report(cfg)
    return out


def train_stage_by_name(cfg: Config, name: str, log: LogFn | None = None,
                        progress: ProgressFn | None = None) -> Path:
    names = [s.name for s in cfg.training.stages]
    if name not in names:
        raise ValueError(f"unknown stage {name!r}; stages: {names}")
    return train_stage(cfg, names.index(name), log, progress=progress)
