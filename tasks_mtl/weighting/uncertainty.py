"""Homoscedastic uncertainty weighting.

Kendall, Gal and Cipolla (2018), "Multi-Task Learning Using Uncertainty to Weigh Losses for
Scene Geometry and Semantics", CVPR 2018.

Each task has a learnable log-variance s_i = log sigma_i^2. The paper's objective for a
classification likelihood is sum_i exp(-s_i) L_i + log sigma_i = sum_i exp(-s_i) L_i + s_i / 2
(its regression form halves the first term too); every bundled task is a classification, so that
form is used. At the optimum exp(-s_i) = 1 / (2 L_i): a task whose loss stays large gets a small
weight. With gradient accumulation over k micro-batches the losses arrive divided by k and so does
the s_i / 2 term: the whole objective is divided, and the learned weights do not depend on k.
The s_i are trained by the trainer's optimizer with the heads (without weight decay).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting


class Uncertainty(LossWeighting):
    """sum_i exp(-s_i) L_i + s_i / 2 with learnable log-variances s."""

    def __init__(self, tasks: list[str], init: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.full((len(tasks),), float(init)))  # [T]

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        s = self.log_vars[self.positions(names, self.log_vars)]  # [t]
        task_losses = torch.stack([losses[n] for n in names])  # [t]
        (torch.exp(-s) * task_losses + s / (2 * self.accumulation)).sum().backward()
        return {n: float(w) for n, w in zip(names, torch.exp(-s).tolist())}
