"""GradNorm: balance tasks by equalising their gradient norms.

Chen, Badrinarayanan, Lee and Rabinovich (2018), "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018.

Learnable weights w_i scale the task losses. With G_i = ||grad_W w_i L_i|| over the probed shared
parameters W (the paper probes the last shared layer; here all `shared` params, or the last
`last_params` of them), r_i = (L_i / L_i(0)) / mean_j(L_j / L_j(0)) and the constant target
G_avg * r_i^alpha, the GradNorm loss sum_i |G_i - target_i| sends gradient to w only; the model
itself trains on sum_i w_i L_i with w held constant. after_step renormalises sum(w) = K.
The weights are trained by the trainer's optimizer: give this module's parameters to it.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting, add_flat_grad, backward_weighted, task_gradients


class GradNorm(LossWeighting):
    """Loss weights learnt so that each task's gradient norm tracks its relative training rate."""

    requires_all_tasks: ClassVar[bool] = True

    def __init__(self, tasks: list[str], alpha: float = 1.5, last_params: int | None = None) -> None:
        super().__init__(tasks)
        self.alpha = float(alpha)  # the paper's asymmetry; 1.5 in its NYUv2 experiments
        self.last_params = last_params  # probe only the last k shared params (None = all of them)
        self.loss_weights = nn.Parameter(torch.ones(len(tasks)))  # [K] w_i
        self.register_buffer("initial_losses", torch.zeros(len(tasks)))  # [K] L_i(0)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        loss_list = [losses[n] for n in names]
        task_losses = self.sync(torch.stack([l.detach() for l in loss_list]).to(self.initial_losses))  # [K]
        if not bool(self.initialised):
            self.initial_losses.copy_(task_losses)
            self.initialised.fill_(True)
        w = self.loss_weights  # [K]
        w_const = w.detach()
        probe = shared[-self.last_params :] if self.last_params else shared
        if not probe:  # no trainable shared parameters: nothing to balance
            backward_weighted(loss_list, w_const, private)
            return {n: float(x) for n, x in zip(names, w_const.tolist())}

        grads = self.sync(task_gradients(loss_list, probe))  # [K, P], of the global batch under several processes
        norms = grads.norm(dim=1).detach().to(w)  # [K] ||grad_W L_i||
        g = w * norms  # [K] ||grad_W w_i L_i||
        rate = task_losses / self.initial_losses.clamp_min(1e-12)  # [K] inverse training rate
        target = (g.mean().detach() * (rate / rate.mean()).to(w) ** self.alpha).detach()  # [K]
        (w_grad,) = torch.autograd.grad((g - target).abs().sum(), w)
        if w.grad is None:
            w.grad = w_grad
        else:
            w.grad.add_(w_grad)

        if len(probe) == len(shared):  # reuse the per-task gradients for the shared update
            add_flat_grad(shared, w_const.to(grads) @ grads)
            backward_weighted(loss_list, w_const, private)
        else:
            backward_weighted(loss_list, w_const, [*shared, *private])
        return {n: float(x) for n, x in zip(names, w_const.tolist())}

    @torch.no_grad()
    def after_step(self) -> None:
        w = self.loss_weights
        w.clamp_(min=1e-4)  # an overshooting optimizer step must not flip a task's sign
        w.mul_(len(self.tasks) / w.sum())
