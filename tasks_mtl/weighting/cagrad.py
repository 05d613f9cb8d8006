"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone and Liu (2021), "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021.

The update d maximises the worst task improvement min_i g_i . d within a ball around the average
gradient, ||d - g0|| <= c ||g0||. Its dual is a small problem over the task simplex,
    min_w  g_w . g0 + c ||g0|| ||g_w||,   g_w = sum_i w_i g_i,
solved here by exponentiated-gradient (mirror) descent on the T x T Gram matrix, and then
d = g0 + c ||g0|| g_w / ||g_w||. The paper's update is on the scale of the mean gradient; it is
multiplied by the number of tasks here so that c = 0 is exactly `equal` (the sum of gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks_mtl.weighting.base import GradientWeighting


def solve_simplex_dual(gram: Tensor, c: float, iters: int = 300) -> Tensor:
    """argmin over the simplex of w.M1/T + c ||g0|| sqrt(w.Mw) for Gram matrix M [T, T] -> w [T]."""
    t = gram.shape[0]
    m = gram / gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)  # scale-free problem
    mean_row = m.mean(dim=1)  # [T] M 1 / T
    radius = c * m.mean().clamp_min(0).sqrt()  # c ||g0||
    w = torch.full((t,), 1.0 / t, dtype=m.dtype, device=m.device)

    def objective(v: Tensor) -> Tensor:
        return v @ mean_row + radius * (v @ m @ v).clamp_min(0).sqrt()

    best, best_value = w, objective(w)
    for k in range(iters):
        norm = (w @ m @ w).clamp_min(1e-12).sqrt()
        grad = mean_row + radius * (m @ w) / norm  # [T]
        step = 1.0 / (k + 1) ** 0.5  # diminishing steps: the objective is convex but not smooth
        grad = grad / grad.abs().max().clamp_min(1e-12)  # unit sup-norm: the step size is scale-free
        w = torch.softmax(torch.log(w.clamp_min(1e-30)) - step * grad, dim=0)  # multiplicative update
        value = objective(w)
        better = value < best_value  # kept on device: no host sync inside the loop
        best = torch.where(better, w, best)
        best_value = torch.where(better, value, best_value)
    return best  # [T]


def cagrad_weights(grads: Tensor, c: float, iters: int = 300) -> Tensor:
    """Task weights alpha [T] with d = alpha @ grads the CAGrad update, on the sum scale."""
    t = grads.shape[0]
    work = grads.to(torch.promote_types(grads.dtype, torch.float32))
    gram = work @ work.T  # [T, T]
    alpha = torch.ones(t, dtype=gram.dtype, device=gram.device)
    if c == 0:
        return alpha
    w = solve_simplex_dual(gram, c, iters)  # [T]
    g0_norm = gram.mean().clamp_min(0).sqrt()  # ||g0||
    gw_norm = (w @ gram @ w).clamp_min(0).sqrt()  # ||g_w||
    tiny = torch.finfo(gram.dtype).eps * gram.diagonal().max().sqrt()
    lam = torch.where(gw_norm > tiny, c * g0_norm / gw_norm.clamp_min(tiny), 0.0)  # undefined if g_w = 0
    return alpha + t * lam * w  # [T] t * (1/t + lam w)


class CAGrad(GradientWeighting):
    """Average gradient, bent within a ball of radius c ||g0|| towards the worst-off task."""

    def __init__(self, tasks: list[str], c: float = 0.4, iters: int = 300) -> None:
        super().__init__(tasks)
        if not 0 <= c < 1:
            raise ValueError("cagrad: c must be in [0, 1) (c >= 1 loses the guarantee d . g0 >= 0)")
        self.c = float(c)  # the paper's default for multi-task supervised learning
        self.iters = int(iters)  # mirror-descent steps on a T-dim problem: microseconds each

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        alpha = cagrad_weights(grads, self.c, self.iters)  # [T]
        return alpha.to(grads) @ grads, alpha
