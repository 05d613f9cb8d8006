"""Static weighting: a fixed, hand-chosen weight per task (the linear-combination baseline).

Weights come from the stage's `weighting_args: {weights: {task: alpha}}`; tasks left out get 1.
"""

from __future__ import annotations

from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting


class Static(LossWeighting):
    """sum_i alpha_i * L_i with constant alpha_i."""

    def __init__(self, tasks: list[str], weights: dict[str, float] | None = None) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        unknown = set(weights) - set(tasks)
        if unknown:
            raise ValueError(f"static weights for unknown task(s) {sorted(unknown)}; tasks: {tasks}")
        self.alpha = {t: float(weights.get(t, 1.0)) for t in tasks}  # config, not state

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        sum(self.alpha[n] * losses[n] for n in names).backward()
        return {n: self.alpha[n] for n in names}
