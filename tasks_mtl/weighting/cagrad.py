"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone and Liu (2021), "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021.

The update d maximises the worst task improvement min_i g_i . d within a ball around the average
gradient, ||d - g0|| <= c ||g0||. Its dual is a small problem over the task simplex,
    min_w  g_w . g0 + c ||g0|| ||g_w||,   g_w = sum_i w_i g_i,
solved on the T x T Gram matrix with SLSQP (scipy, a dependency already pulled in by seqeval's
scikit-learn), and then d = g0 + c ||g0|| g_w / ||g_w||, divided by 1 + c^2 as the authors' code
does by default (`rescale`) so that larger c does not simply mean a larger step. The task heads get
their plain gradients: the weights shape the shared update only. The paper's update is on the scale
of the mean gradient; it is multiplied by the number of tasks here so that c = 0 is exactly `equal`
(the sum of gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tasks_mtl.weighting.base import GradientWeighting


def solve_simplex_dual(gram: Tensor, c: float) -> Tensor:
    """argmin over the simplex of w.M1/T + c ||g0|| sqrt(w.Mw) for Gram matrix M [T, T] -> w [T]."""
    import numpy as np
    from scipy.optimize import minimize

    m = gram.detach().double().cpu().numpy()
    m = m / max(float(np.mean(np.diag(m))), np.finfo(np.float64).tiny)  # scale-free problem
    t = m.shape[0]
    mean_row = m.mean(axis=1)  # [T] M 1 / T
    radius = c * np.sqrt(max(float(m.mean()), 0.0))  # c ||g0||

    def objective(w: np.ndarray) -> float:
        return float(w @ mean_row + radius * np.sqrt(max(float(w @ m @ w), 0.0) + 1e-30))

    def gradient(w: np.ndarray) -> np.ndarray:
        return mean_row + radius * (m @ w) / np.sqrt(max(float(w @ m @ w), 0.0) + 1e-30)

    start = np.full(t, 1.0 / t)
    found = minimize(objective, start, jac=gradient, method="SLSQP", bounds=[(0.0, 1.0)] * t,
                     constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(t)},),
                     options={"ftol": 1e-15, "maxiter": 1000})
    w = np.clip(found.x, 0.0, None) if np.all(np.isfinite(found.x)) else start
    w = w / w.sum() if w.sum() > 0 else start
    if objective(w) > objective(start):  # never worse than where the solver began
        w = start
    return torch.as_tensor(w, dtype=gram.dtype, device=gram.device)  # [T]


def cagrad_weights(grads: Tensor, c: float, rescale: bool = True) -> Tensor:
    """Task weights alpha [T] with d = alpha @ grads the CAGrad update, on the sum scale."""
    t = grads.shape[0]
    work = grads.to(torch.promote_types(grads.dtype, torch.float32))
    gram = work @ work.T  # [T, T]
    alpha = torch.ones(t, dtype=gram.dtype, device=gram.device)
    if c == 0:
        return alpha
    w = solve_simplex_dual(gram, c)  # [T]
    g0_norm = gram.mean().clamp_min(0).sqrt()  # ||g0||
    gw_norm = (w @ gram @ w).clamp_min(0).sqrt()  # ||g_w||
    tiny = torch.finfo(gram.dtype).eps * gram.diagonal().max().sqrt()
    lam = torch.where(gw_norm > tiny, c * g0_norm / gw_norm.clamp_min(tiny), 0.0)  # undefined if g_w = 0
    alpha = alpha + t * lam * w  # [T] t * (1/t + lam w)
    return alpha / (1 + c**2) if rescale else alpha


class CAGrad(GradientWeighting):
    """Average gradient, bent within a ball of radius c ||g0|| towards the worst-off task; heads unweighted."""

    weights_heads = False

    def __init__(self, tasks: list[str], c: float = 0.4, rescale: bool = True) -> None:
        super().__init__(tasks)
        if not 0 <= c < 1:
            raise ValueError("cagrad: c must be in [0, 1) (c >= 1 loses the guarantee d . g0 >= 0)")
        self.c = float(c)  # the paper's default for multi-task supervised learning
        self.rescale = bool(rescale)

    def combine(self, grads: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        alpha = cagrad_weights(grads, self.c, self.rescale)  # [T]
        return alpha.to(grads) @ grads, alpha
