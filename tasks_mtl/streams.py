"""The training data of a stage: its streams (a task, or token tasks that label the same texts and so train
from one forward pass), their collators and endless, resumable batch orders; under several processes each
rank keeps its shard of every stream (tasks_mtl/distributed.py)."""

from __future__ import annotations

import torch

from tasks_mtl.config import Config, StageConfig
from tasks_mtl.model import MultiTaskModel
from tasks_mtl.sampling import BatchOrder


def stage_batch_tokens(cfg: Config, stage: StageConfig) -> int | None:
    """The stage's token budget per batch (None: `batch_size` rows)."""
    return stage.batch_tokens if stage.batch_tokens is not None else cfg.training.batch_tokens


class StreamData:
    """The train features of one stream (a task, or co-labelled tasks sharing texts), its collator and its
    endless, resumable batch order.

    `shard` = (rank, world size): under several processes each keeps every world-th row from its rank on
    (its share of the task's data); `size` stays the whole stream's, so samplers and step counts agree on
    every rank."""

    def __init__(self, tasks: list[str], features: list[dict], collate, cfg: Config, seed: int,
                 max_tokens: int | None, shard: tuple[int, int] = (0, 1)):
        rank, world = shard
        if len(features) < world:
            raise ValueError(f"stream {'+'.join(tasks)!r} has {len(features)} train rows, fewer than the "
                             f"{world} processes sharing it")
        self.size = len(features)  # rows of the whole stream, on every rank
        self.tasks, self.features, self.collate = tasks, features[rank::world], collate
        self.order = BatchOrder([len(f["input_ids"]) for f in self.features], cfg.training.batch_size, seed,
                                max_tokens=max_tokens)

    def next_batch(self, device: torch.device) -> dict[str, torch.Tensor]:
        rows = [dict(self.features[i]) for i in self.order.next()]
        return {k: v.to(device) for k, v in self.collate(rows).items()}


def load_features(cfg: Config, task: str, split: str = "train") -> list[dict]:
    from datasets import load_from_disk

    path = cfg.path(cfg.data.tokenized_dir) / task / split
    if not path.exists():
        raise FileNotFoundError(f"no tokenized data at {path}; run `mtl tokenize` first")
    return load_from_disk(str(path)).to_list()


def co_labelled_groups(cfg: Config, tasks: list[str], features: dict[str, list[dict]]) -> list[list[str]]:
    """Streams of a stage: token tasks whose train texts coincide (most windows of the smaller task occur
    in the other) form one stream, trained from one forward pass; every other task is its own stream."""
    streams: list[list[str]] = []
    seen: dict[str, set] = {}
    for task in tasks:
        if not cfg.training.co_label or cfg.tasks[task].type != "token_classification":
            streams.append([task])
            continue
        seen[task] = {tuple(f["input_ids"]) for f in features[task]}
        for stream in streams:
            first = stream[0]
            if first in seen and len(seen[first] & seen[task]) >= 0.5 * min(len(seen[first]), len(seen[task])):
                stream.append(task)
                break
        else:
            streams.append([task])
    return streams


def merge_features(tasks: list[str], features: dict[str, list[dict]]) -> list[dict]:
    """One row per distinct window of the tasks' texts, carrying `labels/<task>` for each task (IGNORE
    for a task that does not label that text)."""
    from tasks_mtl.tasks.token_classification import IGNORE

    rows: dict[tuple, dict] = {}
    for task in tasks:
        for f in features[task]:
            key = tuple(f["input_ids"])
            row = rows.setdefault(key, {k: v for k, v in f.items() if k != "labels"})
            row.setdefault(f"labels/{task}", f["labels"])
    for row in rows.values():
        for task in tasks:
            row.setdefault(f"labels/{task}", [IGNORE] * len(row["input_ids"]))
    return list(rows.values())


def co_labelled_collator(tokenizer, tasks: list[str]):
    """Pad the inputs with the tokenizer and every `labels/<task>` column with IGNORE."""
    from tasks_mtl.tasks.token_classification import IGNORE

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        inputs = [{k: v for k, v in r.items() if not k.startswith("labels/")} for r in rows]
        batch = dict(tokenizer.pad(inputs, return_tensors="pt"))
        width = batch["input_ids"].shape[1]
        for task in tasks:
            key = f"labels/{task}"
            batch[key] = torch.tensor([r[key] + [IGNORE] * (width - len(r[key])) for r in rows], dtype=torch.long)
        return batch

    return collate


def stream_data(cfg: Config, model: MultiTaskModel, tokenizer, tasks: list[str], index: int,
                shard: tuple[int, int] = (0, 1)) -> dict[str, StreamData]:
    """The stage's streams by name ("ner+cws+pos" for co-labelled tasks), each with its data (this rank's
    `shard` of it: every rank groups the whole data the same way, then keeps its share)."""
    features = {t: load_features(cfg, t) for t in tasks}
    budget = stage_batch_tokens(cfg, cfg.training.stages[index])
    data = {}
    for i, stream in enumerate(co_labelled_groups(cfg, tasks, features)):
        seed = cfg.seed + 1000 * index + i
        if len(stream) == 1:
            task = stream[0]
            data[task] = StreamData(stream, features[task], model.task_types[task].collator(tokenizer), cfg, seed,
                                    budget, shard)
        else:
            data["+".join(stream)] = StreamData(stream, merge_features(stream, features),
                                                co_labelled_collator(tokenizer, stream), cfg, seed, budget, shard)
    return data
