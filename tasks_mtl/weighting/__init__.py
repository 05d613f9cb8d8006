"""Loss-weighting methods: one file each, registered here by name (the stage config's `weighting`).

Adding a method: write `tasks_mtl/weighting/<name>.py` with a `LossWeighting` subclass and add one
line to `WEIGHTINGS`. The trainer reads only `requires_all_tasks`, `backward` and `after_step`.
"""

from __future__ import annotations

import inspect
from typing import Any

from tasks_mtl.weighting.base import GradientWeighting, LossWeighting
from tasks_mtl.weighting.cagrad import CAGrad
from tasks_mtl.weighting.dwa import DynamicWeightAverage
from tasks_mtl.weighting.equal import Equal
from tasks_mtl.weighting.famo import FAMO
from tasks_mtl.weighting.gradnorm import GradNorm
from tasks_mtl.weighting.imtl import IMTLG
from tasks_mtl.weighting.nash_mtl import NashMTL
from tasks_mtl.weighting.pcgrad import PCGrad
from tasks_mtl.weighting.rlw import RandomLossWeighting
from tasks_mtl.weighting.static import Static
from tasks_mtl.weighting.uncertainty import Uncertainty

WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "equal": Equal,
    "static": Static,
    "uncertainty": Uncertainty,
    "dwa": DynamicWeightAverage,
    "rlw": RandomLossWeighting,
    "gradnorm": GradNorm,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl_g": IMTLG,
    "nash_mtl": NashMTL,
    "famo": FAMO,
}


def build_weighting(name: str, tasks: list[str], **args: Any) -> LossWeighting:
    """Instantiate the method registered as `name`; unknown names or arguments are a ValueError."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; known: {sorted(WEIGHTINGS)}")
    cls = WEIGHTINGS[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tasks")]
    unknown = set(args) - set(accepted)
    if unknown:
        raise ValueError(f"weighting {name!r} got unknown argument(s) {sorted(unknown)}; accepts {accepted}")
    return cls(list(tasks), **args)


__all__ = ["WEIGHTINGS", "GradientWeighting", "LossWeighting", "build_weighting"]
