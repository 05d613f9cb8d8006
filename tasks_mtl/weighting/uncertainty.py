"""Homoscedastic uncertainty weighting.

Kendall, Gal and Cipolla (2018), "Multi-Task Learning Using Uncertainty to Weigh Losses for
Scene Geometry and Semantics", CVPR 2018.

Each task has a learnable log-variance s_i = log sigma_i^2; the objective is
sum_i exp(-s_i) * L_i + s_i (the paper's classification form; the 1/2 factor of its regression
form is dropped so that all tasks are treated alike). A task whose loss stays large learns a large
s_i, i.e. a small weight exp(-s_i). The s_i are trained by the trainer's optimizer, so pass this
module's parameters among `private` and to the optimizer (without weight decay).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting


class Uncertainty(LossWeighting):
    """sum_i exp(-s_i) L_i + s_i with learnable log-variances s."""

    def __init__(self, tasks: list[str], init: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(tasks),), float(init)))  # [T]

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        s = self.log_vars[self.positions(names, self.log_vars)]  # [t]
        task_losses = torch.stack([losses[n] for n in names])  # [t]
        (torch.exp(-s) * task_losses + s).sum().backward()
        return {n: float(w) for n, w in zip(names, torch.exp(-s).tolist())}
