"""Equal weighting: the plain sum of the task losses (the usual multi-task baseline)."""

from __future__ import annotations

from torch import Tensor, nn

from tasks_mtl.weighting.base import LossWeighting


class Equal(LossWeighting):
    """Every sampled task's loss with weight 1."""

    def __init__(self, tasks: list[str]) -> None:
        super().__init__(tasks)

    def backward(
        self, losses: dict[str, Tensor], shared: list[nn.Parameter], private: list[nn.Parameter]
    ) -> dict[str, float]:
        names = self.present(losses)
        sum(losses[n] for n in names).backward()
        return {n: 1.0 for n in names}
