"""Dynamic weight average (DWA).

Liu, Johns and Davison (2019), "End-to-End Multi-Task Learning with Attention", CVPR 2019.

w_i = K * softmax_i(r_i / temperature), r_i = L_i(t-1) / L_i(t-2): a task whose loss fell least
over the last period gets the largest weight. The paper's L_i(t) is the average loss of epoch t;
since the trainer samples tasks per step, a period here is a window of `window` optimizer steps
and L_i(t) is the mean of the losses task i reported during that window. Until two windows have
completed, every task gets weight 1. A task that was not sampled in a window carries its previous
average forward (ratio 1).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting


class DynamicWeightAverage(LossWeighting):
    """Weights from the ratio of the last two windows' mean losses."""

    def __init__(self, tasks: list[str], temperature: float = 2.0, window: int = 50) -> None:
        super().__init__(tasks)
        if window < 1 or temperature <= 0:
            raise ValueError("dwa: window must be >= 1 and temperature > 0")
        self.temperature = float(temperature)  # the paper's T = 2
        self.window = int(window)  # optimizer steps per period; 50 steps see each task many times
        k = len(tasks)
        self.register_buffer("loss_sum", torch.zeros(k))  # [K] current window
        self.register_buffer("loss_count", torch.zeros(k))  # [K]
        self.register_buffer("last", torch.zeros(k))  # [K] L(t-1)
        self.register_buffer("before_last", torch.zeros(k))  # [K] L(t-2)
        self.register_buffer("steps_in_window", torch.zeros((), dtype=torch.long))
        self.register_buffer("windows_done", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor:
        """Current weight of every configured task: [K]."""
        if int(self.windows_done) < 2:
            return torch.ones_like(self.last)
        ratio = torch.where(self.before_last > 0, self.last / self.before_last.clamp_min(1e-12), 1.0)
        return len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)  # [K]

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        idx = self.positions(names, self.loss_sum)
        task_losses = torch.stack([losses[n] for n in names])  # [t]
        self.loss_sum.index_add_(0, idx, task_losses.detach().to(self.loss_sum))
        self.loss_count.index_add_(0, idx, torch.ones_like(self.loss_sum[idx]))
        w = self.weights()[idx]  # [t]
        (w.to(task_losses) * task_losses).sum().backward()
        return {n: float(x) for n, x in zip(names, w.tolist())}

    def after_step(self) -> None:
        self.steps_in_window += 1
        if int(self.steps_in_window) < self.window:
            return
        self.loss_sum.copy_(self.sync(self.loss_sum))  # several processes: the window over all of them
        self.loss_count.copy_(self.sync(self.loss_count))
        seen = self.loss_count > 0
        mean = torch.where(seen, self.loss_sum / self.loss_count.clamp_min(1), self.last)
        self.before_last.copy_(self.last)
        self.last.copy_(mean)
        self.windows_done += 1
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.steps_in_window.zero_()
