"""The optimizers of a stage: parameter groups by encoder depth (layer-wise LR decay), heads and n-gram
tables at their own rates, AdamW for the dense groups and SparseAdam for the n-gram tables, the linear
warm-up and decay schedule, and fp16's loss scaling."""

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
    optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW([g for g in groups if g["name"] != "sparse"], fused=True)]
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


class LossScale:
    """fp16's dynamic loss scaling (torch.amp.GradScaler), or nothing. `scaled(loss)` keeps the loss's value (the
    weighting reads true losses) and multiplies every gradient that flows back through it by the scale S;
    `unscale` divides the optimizers' gradients by S and says whether they are finite; `step` steps them
    unless they are not, and updates S (halved after an overflow, which fp16 expects now and then: not a
    non-finite step to count; doubled after 2,000 clean steps)."""

    def __init__(self, enabled: bool, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type) if enabled else None

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        if self.scaler is None:
            return loss
        factor = self.scaler.scale(torch.ones((), device=loss.device)) - 1.0  # S - 1 (and the scaler's first S)
        return loss + factor.to(loss.dtype) * (loss - loss.detach())  # value: loss; gradient: S times the loss's

    @property
    def enabled(self) -> bool:
        return self.scaler is not None

    def unscale(self, optimizers: list[torch.optim.Optimizer]) -> bool:
        if self.scaler is None:
            return True
        for optimizer in optimizers:
            self.scaler.unscale_(optimizer)
        grads = [p.grad for o in optimizers for g in o.param_groups for p in g["params"] if p.grad is not None]
        return all(bool(torch.isfinite(g.coalesce().values() if g.is_sparse else g).all()) for g in grads)

    @property
    def scale(self) -> float:
        return self.scaler.get_scale() if self.scaler is not None else 1.0

    def step(self, optimizers: list[torch.optim.Optimizer]) -> None:
        if self.scaler is None:
            for optimizer in optimizers:
                optimizer.step()
            return
        for optimizer in optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)
