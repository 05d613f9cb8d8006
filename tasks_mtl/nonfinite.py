"""Training steps whose loss or gradient is NaN or infinite: skipped, counted, stopped past a limit.

A skipped step moves no weight (no optimizer step, the weighting's state put back) but still advances
the step count, the schedule and the data, so the run stays aligned with its plan. More than
`training.max_nonfinite_steps` of them in one stage stop it with NonFiniteLossError: the stage never
finishes, so nothing downstream (evaluation, registry, champion) sees its model.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many steps of a stage had a NaN or infinite loss or gradient."""


class NonFiniteSteps:
    """The skipped steps of one stage (`count` carries over a resume)."""

    def __init__(self, stage: str, limit: int, count: int = 0):
        self.stage, self.limit, self.count = stage, limit, count

    def skip(self, step: int, cause: str) -> None:
        """Count step `step` (1-based, within the stage) as skipped for `cause`; raise past the limit."""
        self.count += 1
        if self.count > self.limit:
            raise NonFiniteLossError(
                f"stage {self.stage!r} stopped at step {step}: {cause}. That is {self.count} steps with a "
                f"non-finite loss or gradient, more than training.max_nonfinite_steps = {self.limit}. Check "
                "that task's data and labels, or lower its learning rate.")
        logger.warning("stage %r, step %d: %s; the step is skipped (%d of at most %d)",
                       self.stage, step, cause, self.count, self.limit)
