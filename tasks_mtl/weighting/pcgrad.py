"""PCGrad: projecting conflicting gradients ("gradient surgery").

Yu, Kumar, Gupta, Levine, Hausman and Finn (2020), "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020.

For each task i, visiting the other tasks j in a random order: if g_i . g_j < 0, remove from g_i
its component along g_j (g_i -= (g_i . g_j) / |g_j|^2 g_j, with g_j the original gradient). The
shared update is the sum of the projected gradients; heads get their ordinary gradients. The
random order comes from a generator seeded by `seed` whose state is kept in a buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks_mtl.weighting.base import GradientWeighting, generator_from, new_rng_state, save_rng


def project_conflicting(grads: Tensor, orders: list[list[int]]) -> Tensor:
    """grads [T, P]; orders[i] = the order in which task i visits the others -> projected [T, P]."""
    squared = (grads * grads).sum(dim=1).clamp_min(torch.finfo(grads.dtype).tiny)  # [T]
    projected = grads.clone()
    for i, order in enumerate(orders):
        g = grads[i]
        for j in order:
            if j != i:  # only a negative dot product is removed; no host sync needed
                g = g - (g @ grads[j]).clamp(max=0) / squared[j] * grads[j]
        projected[i] = g
    return projected  # [T, P]


class PCGrad(GradientWeighting):
    """Sum of task gradients after removing pairwise conflicts in random order."""

    def __init__(self, tasks: list[str], seed: int = 0) -> None:
        super().__init__(tasks)
        self.register_buffer("rng_state", new_rng_state(seed))  # [5056] uint8, CPU generator state

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        gen = generator_from(self.rng_state)
        orders = [torch.randperm(len(grads), generator=gen).tolist() for _ in range(len(grads))]
        save_rng(self.rng_state, gen)
        return project_conflicting(grads, orders).sum(dim=0), torch.ones_like(losses)
