"""Random loss weighting (RLW).

Lin, Ye, Zhang and Tsang (2022), "Reasonable Effectiveness of Random Weighting: A Litmus Test
for Multi-Task Learning", Transactions on Machine Learning Research (TMLR) 2022.

Every step draws fresh weights K softmax(z), z ~ N(0, I_K), over all K configured tasks (so they
sum to K, as `equal`'s do) and applies those of the tasks present. Under a one-task-per-step sampler
the task's weight then still varies from step to step; a softmax over the present task alone would
always be 1, i.e. `equal`. The generator is seeded
from `seed` and its state is kept in a buffer, so a resumed run draws the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting, generator_from, new_rng_state, save_rng


class RandomLossWeighting(LossWeighting):
    """sum_i w_i L_i with w = K softmax(N(0, I_K)) redrawn every step, indexed by the tasks present."""

    def __init__(self, tasks: list[str], seed: int = 0) -> None:
        super().__init__(tasks)
        self.register_buffer("rng_state", new_rng_state(seed))  # [5056] uint8, CPU generator state

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        gen = generator_from(self.rng_state)
        z = torch.randn(len(self.tasks), generator=gen, dtype=torch.float64)  # [K], drawn on CPU
        save_rng(self.rng_state, gen)
        every = len(self.tasks) * torch.softmax(z, dim=0)  # [K]
        weights = [float(every[self.tasks.index(n)]) for n in names]
        sum(w * losses[n] for w, n in zip(weights, names)).backward()
        return dict(zip(names, weights))
