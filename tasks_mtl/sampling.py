"""Task samplers (which tasks train at each step) and per-task batch order.

Both are seeded and deterministic, and their state round-trips through JSON so a resumed stage
continues exactly where it stopped.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class TaskSampler:
    """Base: picks the task(s) of each step from a seeded generator."""

    def __init__(self, tasks: list[str], sizes: dict[str, int], total_steps: int, seed: int):
        self.tasks, self.sizes, self.total_steps = list(tasks), sizes, max(total_steps, 1)
        self.step = 0
        self.rng = np.random.default_rng(seed)

    def probabilities(self) -> np.ndarray:  # (num_tasks,)
        raise NotImplementedError

    def next(self) -> list[str]:
        p = self.probabilities()
        self.step += 1
        return [self.tasks[int(self.rng.choice(len(self.tasks), p=p))]]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "rng": self.rng.bit_generator.state, "progress": self.step / self.total_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.rng.bit_generator.state = state["rng"]


class RoundRobin(TaskSampler):
    """Each task in turn."""

    def next(self) -> list[str]:
        task = self.tasks[self.step % len(self.tasks)]
        self.step += 1
        return [task]


class AllTasks(TaskSampler):
    """Every task at every step (gradient methods such as PCGrad or GradNorm need this)."""

    def next(self) -> list[str]:
        self.step += 1
        return list(self.tasks)


class Temperature(TaskSampler):
    """p_i proportional to n_i^(1/T): T=1 proportional, T->inf uniform (Arivazhagan et al. 2019)."""

    def __init__(self, tasks, sizes, total_steps, seed, temperature: float = 2.0):
        super().__init__(tasks, sizes, total_steps, seed)
        self.temperature = temperature

    def probabilities(self) -> np.ndarray:
        weights = np.array([self.sizes[t] for t in self.tasks], dtype=np.float64) ** (1.0 / self.temperature)
        return weights / weights.sum()


class Proportional(Temperature):
    """p_i proportional to the task's number of training examples."""

    def __init__(self, tasks, sizes, total_steps, seed):
        super().__init__(tasks, sizes, total_steps, seed, temperature=1.0)


class Fixed(TaskSampler):
    """p_i from configured shares (`weights: {task: share}`), normalised; a task without a share gets the
    mean share of the others. A co-labelled stream (several tasks, one name "a+b") draws the sum of its
    tasks' shares."""

    def __init__(self, tasks, sizes, total_steps, seed, weights: dict[str, float] | None = None):
        super().__init__(tasks, sizes, total_steps, seed)
        shares = dict(weights or {})
        fallback = float(np.mean(list(shares.values()))) if shares else 1.0
        raw = np.array([sum(shares.get(t, fallback) for t in stream.split("+")) for stream in self.tasks])
        if (raw < 0).any() or raw.sum() <= 0:
            raise ValueError(f"fixed sampler: shares must be >= 0 with a positive sum, got {weights}")
        self.p = raw / raw.sum()

    def probabilities(self) -> np.ndarray:
        return self.p


class Annealed(TaskSampler):
    """p_i ~ n_i^alpha with alpha moving linearly from `start` to `end` over the stage: from proportional
    toward uniform (annealed sampling, Stickland & Murray 2019)."""

    def __init__(self, tasks, sizes, total_steps, seed, start: float = 1.0, end: float = 0.2):
        super().__init__(tasks, sizes, total_steps, seed)
        self.start, self.end = start, end

    def probabilities(self) -> np.ndarray:
        alpha = self.start + (self.end - self.start) * min(self.step / self.total_steps, 1.0)
        weights = np.array([self.sizes[t] for t in self.tasks], dtype=np.float64) ** alpha
        return weights / weights.sum()


SAMPLERS: dict[str, type[TaskSampler]] = {
    "round_robin": RoundRobin,
    "proportional": Proportional,
    "temperature": Temperature,
    "annealed": Annealed,
    "fixed": Fixed,
    "all": AllTasks,
}


def build_sampler(name: str, tasks: list[str], sizes: dict[str, int], total_steps: int, seed: int,
                  **args: Any) -> TaskSampler:
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[name](tasks, sizes, total_steps, seed, **args)


def length_batches(indices: np.ndarray, lengths: np.ndarray, batch_size: int,
                   max_tokens: int | None = None) -> list[np.ndarray]:
    """Cut `indices` (already sorted by length) into consecutive batches: `batch_size` rows each, or, with a
    token budget, as many rows as fit `rows x longest row <= max_tokens` (padding counted; a row longer than
    the budget goes alone). Train, evaluation and prediction all batch through this one helper."""
    if max_tokens is None:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    batches, start = [], 0
    while start < len(indices):
        end, longest = start + 1, int(lengths[indices[start]])
        while end < len(indices):
            longest_next = max(longest, int(lengths[indices[end]]))
            if (end - start + 1) * longest_next > max_tokens:
                break
            end, longest = end + 1, longest_next
        batches.append(indices[start:end])
        start = end
    return batches


class BatchOrder:
    """Endless, resumable batches of example indices for one task, grouped by length.

    Each epoch shuffles the examples with a seed of its own, sorts chunks of about `group` batches by
    length (so a batch holds similar lengths and little padding), cuts them by row count or token
    budget, and shuffles the batch order.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 50,
                 max_tokens: int | None = None):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.group, self.max_tokens = batch_size, seed, group, max_tokens
        self.epoch, self.cursor = 0, 0
        self._batches = self._epoch_batches(0)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        rows = self.batch_size
        if self.max_tokens is not None and len(self.lengths):
            rows = max(1, self.max_tokens // max(1, int(np.mean(self.lengths))))  # rows per batch, roughly
        chunk = rows * self.group
        batches = []
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += length_batches(part, self.lengths, self.batch_size, self.max_tokens)
        return [batches[i] for i in rng.permutation(len(batches))]

    def __len__(self) -> int:
        """Batches in the current epoch."""
        return len(self._batches)

    def next(self) -> np.ndarray:
        if self.cursor >= len(self._batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._batches = self._epoch_batches(self.epoch)
        batch = self._batches[self.cursor]
        self.cursor += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._batches = self._epoch_batches(self.epoch)
