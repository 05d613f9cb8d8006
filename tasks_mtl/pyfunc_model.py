"""The registered model's code (MLflow models-from-code): `log_model(python_model=<this file>)` stores this
file with the model, and loading the model runs it, so nothing is pickled. It needs `tasks_mtl` installed
where the model is loaded (the project's venv; `mlflow models serve --env-manager local`).

A DataFrame with `text` (and optional `text_pair`) in; the prediction records of `mtl predict` out, one dict
per row. The checkpoint directory is the model's `checkpoint` artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
import pandas as pd

CHECKPOINT_ARTIFACT = "checkpoint"


def plain(value: Any) -> Any:
    """numpy scalars and tuples -> JSON types, so `mlflow models serve` can serialise records."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        return value.item()
    return value


class MtlPyfuncModel(mlflow.pyfunc.PythonModel):
    """pyfunc face of a checkpoint directory."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from tasks_mtl import registry  # looked up at load time: tests point its loader at a fake

        self._predictor = registry._load_predictor(Path(context.artifacts[CHECKPOINT_ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "text" not in frame.columns:
            raise ValueError(f"input needs a `text` column; got columns {list(frame.columns)}")
        texts = [str(t) for t in frame["text"].tolist()]
        pairs = None
        if "text_pair" in frame.columns:
            pairs = [None if p is None or (isinstance(p, float) and p != p) else str(p) for p in frame["text_pair"].tolist()]
            if all(p is None for p in pairs):
                pairs = None
        return plain(self._predictor.predict(texts, pairs))


mlflow.models.set_model(MtlPyfuncModel())
