"""Nash-MTL: multi-task learning as a bargaining game.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya (2022), "Multi-Task Learning as
a Bargaining Game", ICML 2022.

The update d = sum_i alpha_i g_i is the Nash bargaining solution, characterised by
G G^T alpha = 1 / alpha (elementwise), alpha > 0. Those are exactly the stationarity conditions
of the strictly convex problem min_alpha 1/2 alpha^T M alpha - sum_i log alpha_i (M = G G^T), so
a few damped Newton steps on the T x T Gram matrix solve it without a convex-programming library
(the paper uses sequential convex programs with cvxpy). As in the paper, d . g_i = 1 / alpha_i
and ||d||^2 = T whatever the loss scale: the update is not on the scale of summed gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks_mtl.weighting.base import GradientWeighting


def nash_weights(grads: Tensor, iters: int = 30, ridge: float | None = None) -> Tensor:
    """grads [T, P] -> alpha [T] > 0 with (G G^T alpha)_i = 1 / alpha_i (up to a small ridge)."""
    work = grads.to(torch.promote_types(grads.dtype, torch.float32))
    gram = work @ work.T  # [T, T]
    scale = gram.diagonal().mean().clamp_min(torch.finfo(gram.dtype).tiny)
    ridge = 10 * torch.finfo(gram.dtype).eps if ridge is None else ridge  # at the precision of gram
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    m = gram / scale + ridge * eye  # [T, T]; ridge keeps alpha finite if a task's gradient vanishes

    def objective(a: Tensor) -> Tensor:
        return 0.5 * a @ m @ a - torch.log(a).sum()

    alpha = m.diagonal().rsqrt()  # [T] exact when the gradients are orthogonal
    for _ in range(iters):
        grad = m @ alpha - 1 / alpha  # [T]
        step = torch.linalg.solve(m + torch.diag(alpha.pow(-2)), grad)  # Newton direction
        decrement = float(grad @ step)
        if decrement < 1e-14:
            break
        t, f0 = 1.0, float(objective(alpha))
        while t > 1e-10:  # backtracking keeps alpha > 0 and the objective decreasing
            candidate = alpha - t * step
            if bool((candidate > 0).all()) and float(objective(candidate)) <= f0 - 0.25 * t * decrement:
                break
            t *= 0.5
        alpha = candidate
    return alpha / scale.sqrt()  # undo the normalisation: M = gram / scale


class NashMTL(GradientWeighting):
    """Bargaining-solution weights: every task's gradient times its weight meets the update equally."""

    def __init__(self, tasks: list[str], iters: int = 30) -> None:
        super().__init__(tasks)
        self.iters = int(iters)  # Newton converges quadratically; 30 is a ceiling, not a count

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        alpha = nash_weights(grads, self.iters)  # [T]
        return alpha.to(grads) @ grads, alpha
