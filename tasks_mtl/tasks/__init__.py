"""Task types: one file each, registered here by name. A task type knows how to encode its rows,
collate a batch, build its head and compute its loss; the trainer only calls that interface."""

from __future__ import annotations

from tasks_mtl.config import TaskConfig
from tasks_mtl.tasks.classification import ClassificationTask, PairClassificationTask
from tasks_mtl.tasks.mlm import MaskedLMTask
from tasks_mtl.tasks.token_classification import TokenClassificationTask

TASK_TYPES = {
    "classification": ClassificationTask,
    "pair_classification": PairClassificationTask,
    "token_classification": TokenClassificationTask,
    "mlm": MaskedLMTask,
}


def build_task(name: str, cfg: TaskConfig):
    """The task-type object for a configured task."""
    return TASK_TYPES[cfg.type](name, cfg)
