"""IMTL-G: impartial multi-task learning, gradient balance.

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang (2021), "Towards Impartial Multi-task Learning",
ICLR 2021.

Finds weights alpha with sum(alpha) = 1 such that the aggregated gradient g = sum_i alpha_i g_i
has the same projection onto every unit task gradient u_i = g_i / ||g_i||. In closed form, with
D = [g_1 - g_i]_{i>=2} and U = [u_1 - u_i]_{i>=2}: alpha_{2:T} = g_1 U^T (D U^T)^{-1} and
alpha_1 = 1 - sum(alpha_{2:T}). Everything is computed from the T x T Gram matrix. Only the
gradient part (IMTL-G) is implemented, not the loss-scale part (IMTL-L), so the method is registered
as `imtl_g`. The alpha shape the shared update only: task heads train on their raw losses, as in the
paper (alpha is unconstrained and may be negative, which would be gradient ascent on a head). A task
whose shared gradient is zero (e.g. its head reads a frozen layer) has no direction to balance: it is
left out of the solve (weight 0) instead of making the system singular. Weights are multiplied by the
number of balanced tasks to put the update on the scale of the summed gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks_mtl.weighting.base import GradientWeighting


def imtl_weights(grads: Tensor) -> Tensor:
    """grads [T, P] -> alpha [T]: zero for zero-gradient rows, the others summing to their count n, with
    equal projections of alpha @ grads on the unit gradients u_i of the nonzero rows."""
    work = grads.to(torch.promote_types(grads.dtype, torch.float32))
    alpha = torch.zeros(work.shape[0], dtype=work.dtype, device=work.device)  # [T]
    active = work.norm(dim=1) > 0  # [T]
    if bool(active.any()):
        alpha[active] = _balanced(work[active])
    return alpha


def _balanced(work: Tensor) -> Tensor:
    """The closed form on nonzero rows [n, P] -> alpha [n] summing to n."""
    t = work.shape[0]
    if t == 1:
        return torch.ones(1, dtype=work.dtype, device=work.device)
    gram = work @ work.T  # [T, T]
    norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).sqrt()  # [T]
    gu = gram / norms  # [T, T] gu[a, b] = g_a . u_b
    g1_u = gu[0, 0] - gu[0, 1:]  # [T-1] g_1 . (u_1 - u_j)
    d_u = gu[0, 0] - gu[0, 1:][None, :] - gu[1:, 0][:, None] + gu[1:, 1:]  # [T-1, T-1] (g_1-g_i).(u_1-u_j)
    rest = g1_u @ torch.linalg.pinv(d_u)  # [T-1]; pinv copes with parallel gradients
    alpha = torch.cat([(1 - rest.sum()).reshape(1), rest])  # [T]
    return t * alpha


class IMTLG(GradientWeighting):
    """Aggregated gradient with equal projections onto every task's gradient direction; heads unweighted."""

    weights_heads = False

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        alpha = imtl_weights(grads)  # [T]
        return alpha.to(grads) @ grads, alpha
