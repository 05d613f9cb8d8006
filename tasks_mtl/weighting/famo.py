"""FAMO: fast adaptive multitask optimization.

Liu, Feng, Stone and Liu (2023), "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

Task weights z = softmax(xi) over learnable logits xi. The model descends sum_i c z_i log L_i with
c = 1 / sum_j (z_j / L_j) held constant, i.e. the loss-weighted sum with weights
alpha_i = z_i / (L_i sum_j z_j / L_j) (times the number of tasks here, for the sum scale). After
each step the logits descend J_z^T delta + gamma xi, where delta_i = log L_i(before) - log L_i(after)
is how much task i improved: tasks that improve least gain weight. No per-task gradients are
needed. The logits have their own Adam at a constant `lr` (0.025, the paper's), outside the model's
warm-up and decay: the trainer builds it from `self.lr`.

One departure from the paper: there, delta compares the losses of the same batch before and after
the update (one extra forward pass per step). Here delta is taken between the mean losses of
consecutive optimizer steps, which are different batches: no extra forward pass, but batch noise
enters delta. Its gradient reaches xi.grad at the next step's first backward.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting


class FAMO(LossWeighting):
    """Loss weights from logits that learn which task's log-loss decreases least."""

    requires_all_tasks: ClassVar[bool] = True

    def __init__(self, tasks: list[str], gamma: float = 0.001, min_loss: float = 0.0, lr: float = 0.025) -> None:
        super().__init__(tasks)
        self.lr = float(lr)  # the logits' own Adam (the trainer builds it)
        self.gamma = float(gamma)  # the paper's decay of the logits towards equal weights
        self.min_loss = float(min_loss)  # L_i*: a lower bound of every loss (0 for cross-entropy)
        k = len(tasks)
        self.logits = nn.Parameter(torch.zeros(k))  # [K] xi
        self.register_buffer("step_sum", torch.zeros(k))  # [K] losses seen in the current step
        self.register_buffer("step_count", torch.zeros(()))
        self.register_buffer("previous", torch.zeros(k))  # [K] mean loss of the previous step
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool))
        self.register_buffer("delta", torch.zeros(k))  # [K] log-loss improvement not yet applied
        self.register_buffer("has_delta", torch.zeros((), dtype=torch.bool))

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        task_losses = torch.stack([losses[n] for n in names])  # [K]
        xi = self.logits
        if bool(self.has_delta):
            z = torch.softmax(xi.detach(), dim=0)  # [K]
            delta = self.delta.to(z)
            logit_grad = z * (delta - z @ delta) + self.gamma * xi.detach()  # J_z^T delta + gamma xi
            if xi.grad is None:
                xi.grad = logit_grad
            else:
                xi.grad.add_(logit_grad)
            self.has_delta.fill_(False)
        z = torch.softmax(xi.detach(), dim=0)  # [K]
        shifted = (self.sync(task_losses.detach()) - self.min_loss).clamp_min(1e-8).to(z)  # [K] L_i - L_i*
        alpha = len(names) * (z / shifted) / (z / shifted).sum()  # [K]
        (alpha.to(task_losses) * task_losses).sum().backward()
        self.step_sum.add_(shifted.to(self.step_sum))
        self.step_count.add_(1)
        return {n: float(a) for n, a in zip(names, alpha.tolist())}

    @torch.no_grad()
    def after_step(self) -> None:
        if float(self.step_count) == 0:
            return
        current = self.step_sum / self.step_count  # [K]
        if bool(self.has_previous):
            self.delta.copy_(self.previous.log() - current.log())
            self.has_delta.fill_(True)
        self.previous.copy_(current)
        self.has_previous.fill_(True)
        self.step_sum.zero_()
        self.step_count.zero_()
