"""Training progress a person can watch: per stage, step/total, per-task loss, tokens/s and the time left.

On a terminal, one live rich line per stage; elsewhere (a pipe, a CI log, a Prefect flow's log), a plain
line at most every `every_s` seconds and at the end of each stage. The trainer calls a `ProgressFn` at
each logging step; this module turns those calls into lines and knows nothing of the trainer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

ProgressFn = Callable[[str, int, int, dict[str, float]], None]  # stage, step, total, logged metrics


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def describe(metrics: dict[str, float]) -> str:
    """'loss ner 0.312 cws 0.101 | 7.9k tok/s' from a logged metrics dict."""
    losses = " ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in sorted(metrics.items()) if k.startswith("loss/"))
    speed = metrics.get("tokens_per_s")
    return f"loss {losses}" + (f" | {speed / 1000:.1f}k tok/s" if speed else "")


class StageProgress:
    """A `ProgressFn`: a live line per stage when `stream` is a terminal, else plain lines via `emit`
    (default: print to `stream`, stderr unless given) every `every_s` seconds and at each stage's end."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 30.0,
                 emit: Callable[[str], None] | None = None, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.emit = emit or (lambda line: print(line, file=self.stream, flush=True))
        self.live = (emit is None and self.stream.isatty()) if live is None else live
        self._stage: str | None = None
        self._start = (0.0, 0)  # time and step at the stage's first call
        self._last = 0.0
        self._bar = None
        self._task = None

    def __call__(self, stage: str, step: int, total: int, metrics: dict[str, float]) -> None:
        now = time.monotonic()
        if stage != self._stage:
            self._new_stage(stage, total, now, step)
        rate = (step - self._start[1]) / max(now - self._start[0], 1e-9)
        left = (total - step) / rate if rate > 0 else 0.0
        text = describe(metrics)
        if self.live:
            self._bar.update(self._task, completed=step, total=total, info=text)
            if step >= total:
                self._bar.stop()
            return
        if step >= total or now - self._last >= self.every_s:
            self._last = now
            eta = "done" if step >= total else f"ETA {_duration(left)}"
            self.emit(f"{stage} {step}/{total} ({100 * step // max(total, 1)}%) | {text} | {eta}")

    def _new_stage(self, stage: str, total: int, now: float, step: int) -> None:
        if self._bar is not None:
            self._bar.stop()
        self._stage, self._start, self._last = stage, (now, step), now
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn(f"[bold]{stage}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(stage, total=total, completed=step, info="")
            self._bar.start()
