"""The contract every loss-weighting method fulfils, and the gradient plumbing they share.

A method receives this step's per-task losses and writes gradients into `.grad` of the
parameters it is given; the trainer only reads `requires_all_tasks` and calls `backward` and
`after_step`, so it never needs to know which method runs.

Scale convention: every method's update is on the scale of the plain sum of task losses
(`equal`), so one learning rate means the same thing whichever method a stage uses. Methods whose
paper normalises the task weights to sum to 1 are multiplied by the number of tasks here.

All state (loss history, RNG state, learnable weights) lives in buffers or parameters, so
`state_dict()` is all tensors and a resumed run continues exactly.

Under several processes (tasks_mtl/distributed.py) the trainer averages every gradient over the ranks
after `backward`, which is right for methods linear in the task losses. A method that reads loss values or
combines per-task gradients non-linearly passes them through `sync` first (the mean over the ranks, set by
the trainer as `mean_over_ranks`; the identity in one process), so it decides on the global batch and its
state stays identical on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
from torch import Tensor, nn


class LossWeighting(nn.Module):
    """Base class: turn this step's task losses into accumulated gradients."""

    requires_all_tasks: ClassVar[bool] = False  # True: every step must carry a loss for every task
    lr: float | None = None  # learnable weights: None = trained with the heads; else their own Adam at this rate
    accumulation: int = 1  # micro-batches per optimizer step (the trainer sets it); losses arrive divided by it
    mean_over_ranks: Callable[[Tensor], Tensor] | None = None  # several processes: their mean (the trainer sets it)

    def __init__(self, tasks: list[str]) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("a loss weighting needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"duplicate task names in {tasks}")
        self.tasks = list(tasks)

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        """Accumulate gradients of `losses` into `.grad` of `shared` and `private` params.

        `losses` holds one scalar per task sampled this step (all tasks when
        `requires_all_tasks`). Returns the weight applied to each task's loss, for logging.
        """
        raise NotImplementedError

    def after_step(self) -> None:
        """Called after optimizer.step(); stateful methods update themselves here."""

    def sync(self, value: Tensor) -> Tensor:
        """`value` (same shape on every rank) averaged over the training processes; itself in one process."""
        return value if self.mean_over_ranks is None else self.mean_over_ranks(value)

    # -- helpers for subclasses ---------------------------------------------------------------

    def present(self, losses: dict[str, Tensor]) -> list[str]:
        """Tasks of `losses` in configured order; unknown names (and, if required, gaps) are errors."""
        unknown = set(losses) - set(self.tasks)
        if unknown:
            raise ValueError(f"losses for unknown task(s) {sorted(unknown)}; configured: {self.tasks}")
        if not losses:
            raise ValueError("backward() needs at least one task loss")
        if self.requires_all_tasks and len(losses) != len(self.tasks):
            missing = [t for t in self.tasks if t not in losses]
            raise ValueError(
                f"{type(self).__name__} needs a loss for every task each step; missing {missing}"
            )
        return [t for t in self.tasks if t in losses]

    def positions(self, names: list[str], like: Tensor) -> Tensor:
        """Indices of `names` in `self.tasks`, on the device of `like`."""
        return torch.tensor([self.tasks.index(n) for n in names], dtype=torch.long, device=like.device)


class GradientWeighting(LossWeighting):
    """Base for methods that combine per-task gradients of the shared parameters.

    Subclasses implement `combine`; the shared parameters receive the combined vector, and the
    private ones (heads) the gradient of the losses weighted by `combine`'s task weights, or of the
    plain losses when the method sets `weights_heads = False`.
    """

    requires_all_tasks: ClassVar[bool] = True
    weights_heads: ClassVar[bool] = True  # False: heads get their plain gradients, as in IMTL and CAGrad

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """grads [T, P], losses [T] (detached) -> (update [P], task weights [T] for the private part)."""
        raise NotImplementedError

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        loss_list = [losses[n] for n in names]
        weights = torch.ones(len(names), dtype=loss_list[0].dtype, device=loss_list[0].device)  # [T]
        grads = self.sync(task_gradients(loss_list, shared)) if shared else None  # [T, P], global batch's
        if grads is not None and bool(grads.any()):  # else nothing shared to arbitrate (frozen, or zero)
            update, weights = self.combine(grads, self.sync(torch.stack([l.detach() for l in loss_list])))
            add_flat_grad(shared, update)
        head_weights = weights if self.weights_heads else torch.ones_like(weights)
        backward_weighted(loss_list, head_weights, private)
        return {n: float(w) for n, w in zip(names, weights.tolist())}


def task_gradients(losses: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    """One flattened gradient row per loss over `params` (unused params count as zeros): [T, P]."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)
        ]))
    return torch.stack(rows)  # [T, P]


def add_flat_grad(params: list[nn.Parameter], flat: Tensor) -> None:
    """Accumulate the flat vector `flat` [P] into `.grad` of `params`, in order."""
    offset = 0
    for p in params:
        n = p.numel()
        piece = flat[offset : offset + n].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.add_(piece)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"gradient vector has {flat.numel()} entries, parameters {offset}")


def backward_weighted(losses: list[Tensor], weights: Tensor, params: list[nn.Parameter]) -> None:
    """Accumulate the gradient of sum_i weights_i * losses_i into `params` only (weights are constants)."""
    if not params:
        return
    weights = weights.detach()
    total = sum(w * l for w, l in zip(weights.unbind(), losses))
    torch.autograd.backward(total, inputs=list(params))


def new_rng_state(seed: int) -> Tensor:
    """The state of a CPU torch.Generator seeded with `seed`, as a uint8 tensor (store it in a buffer)."""
    gen = torch.Generator()
    gen.manual_seed(int(seed))
    return gen.get_state()


def generator_from(state: Tensor) -> torch.Generator:
    """A CPU generator continuing from `state` (a buffer written by `new_rng_state` or `save_rng`)."""
    gen = torch.Generator()
    gen.set_state(state.detach().cpu())
    return gen


def save_rng(buffer: Tensor, gen: torch.Generator) -> None:
    """Write the generator's state back into its buffer, so state_dict carries it."""
    buffer.copy_(gen.get_state().to(buffer.device))
