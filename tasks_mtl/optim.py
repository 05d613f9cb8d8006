"""The optimizers of a stage: parameter groups by encoder depth (layer-wise LR decay), heads and n-gram
tables at their own rates, AdamW for the dense groups and SparseAdam for the n-gram tables, and the linear
warm-up and decay schedule."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tasks_mtl.config import StageConfig
from tasks_mtl.model import MultiTaskModel
from tasks_mtl.ngrams import sparse_parameters

NGRAM_MODULES = (".bag.", ".lexical.", ".tfidf.", ".neighbours.")  # head parts that are n-gram models


def param_groups(model: MultiTaskModel, stage: StageConfig, weight_decay: float) -> list[dict]:
    """Encoder parameters by depth (layer-wise LR decay from the top; bigram embeddings sit with the
    embeddings), then heads and soft layers, with n-gram bags and window features at their own rate. The encoder's groups
    come first, so group 0 carries the encoder's top learning rate when the encoder trains."""
    groups: dict[tuple[str, float, float], list] = {}
    sparse = {id(p) for p in sparse_parameters(model)}

    def add(kind: str, lr: float, p: torch.nn.Parameter) -> None:
        if p.requires_grad:
            if id(p) in sparse:
                kind, decay = "sparse", 0.0  # SparseAdam: no weight decay
            else:
                decay = 0.0 if p.ndim == 1 else weight_decay  # no decay on biases and LayerNorm
            groups.setdefault((kind, lr, decay), []).append(p)

    for name, p in model.bert.named_parameters():
        add("encoder", stage.encoder_lr * stage.layer_decay ** (model.depth - model.encoder_layer_of(name)), p)
    if model.bigrams is not None:
        for p in model.bigrams.parameters():
            add("encoder", stage.encoder_lr * stage.layer_decay ** model.depth, p)
    for name, p in [*model.heads.named_parameters(), *model.private.named_parameters()]:
        ngram = any(part in f".{name}" for part in NGRAM_MODULES)  # n-gram models: their own rate
        add("heads", stage.ngram_lr if ngram else stage.head_lr, p)
    for p in model.window.parameters() if model.window is not None else []:
        add("heads", stage.ngram_lr, p)
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != "encoder", item[0][0], -item[0][1]))
    return [{"params": ps, "lr": lr, "weight_decay": wd, "name": kind} for (kind, lr, wd), ps in ordered]


def make_optimizers(groups: list[dict]) -> list[torch.optim.Optimizer]:
    """AdamW for the dense groups, plus SparseAdam for the n-gram tables (only the rows a batch touches move)."""
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW([g for g in groups if g["name"] != "sparse"])]
    if any(g["name"] == "sparse" for g in groups):
        optimizers.append(torch.optim.SparseAdam([g for g in groups if g["name"] == "sparse"]))
    return optimizers


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current top rate of the encoder (absent while it is frozen) and of the heads."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        kind = group.get("name")
        if kind in ("encoder", "heads"):
            rates[f"lr/{kind}"] = max(rates.get(f"lr/{kind}", 0.0), float(group["lr"]))
    return rates


def linear_schedule(total: int, warmup: float) -> Callable[[int], float]:
    warm = int(total * warmup)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    return factor
