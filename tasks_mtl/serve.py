"""`mtl serve`: the model kept warm behind a small HTTP API of this project's own (FastAPI).

Why not only `mlflow models serve`: its scoring server takes any dataframe, so a `null`, a number or an
empty string reached the model (as the text "None", "123", or a stack trace in the body). Here the
request has a schema (published at `/openapi.json`, browsable at `/docs`), checked before the model
sees anything: every record names its problem in a 422 answer, nothing ever returns a traceback, and
one bad record never takes the server down. `mlflow models serve` keeps working for users of MLflow's
tooling (README).

    POST /predict  {"records": [{"text": "...", "text_pair": "..."?, ...}]}  ->  {"predictions": [...]}
    GET  /health   ->  {"status": "ok", "model": "<where the model came from>",
                        "precision": "bf16" | "fp32" | "int8", "tasks": [...]}

A prediction record is the record of `mtl predict`: the input fields (extra ones such as an `id` come
back unchanged) plus one key per task.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

MAX_TEXT_CHARS = 5000  # as data.max_chars: the longest bundled review is 2,876 characters
MAX_RECORDS = 256  # per request; larger jobs go through `mtl predict`


class Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # an `id` or other field comes back unchanged

    text: StrictStr = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    text_pair: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)

    @field_validator("text", "text_pair")
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must contain a non-whitespace character")
        return value


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    records: list[Record] = Field(min_length=1, max_length=MAX_RECORDS)


class PredictResponse(BaseModel):
    predictions: list[dict[str, Any]]


def _problems(err: RequestValidationError) -> list[dict[str, Any]]:
    """Each problem as {record, field, problem}: `record` is the index in `records` (None for the body)."""
    out = []
    for e in err.errors():
        loc = [part for part in e.get("loc", ()) if part != "body"]
        record = loc[1] if len(loc) > 1 and loc[0] == "records" and isinstance(loc[1], int) else None
        field = ".".join(str(p) for p in (loc[2:] if record is not None else loc)) or None
        out.append({"record": record, "field": field, "problem": e.get("msg", "invalid")})
    return out


class ModelThread:
    """One thread that owns the model: it loads it, warms it up and runs every prediction, one at a time.

    torch starts a pool of compute threads per calling thread. A model loaded in one thread and called from
    a server's worker threads had two pools spinning on the same cores: a People's Daily sentence took 12.7 ms
    instead of 6.3 ms on this project's 2-core host. A single owner keeps one pool, and the event loop stays
    free to answer /health while a prediction runs."""

    def __init__(self, load: Callable[[], Any]):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.predictor = self._pool.submit(load).result()
        self._pool.submit(self.predictor.predict, ["预热模型"]).result()  # allocator and kernels ready

    async def predict(self, texts: list[str], pairs: list[str | None] | None) -> list[dict[str, Any]]:
        return await asyncio.wrap_future(self._pool.submit(self.predictor.predict, texts, pairs))


def create_app(model: ModelThread, source: str) -> FastAPI:
    """The API around a `tasks_mtl.predict.Predictor` that `model` holds (kept in memory between requests)."""
    predictor = model.predictor
    app = FastAPI(title="mtl-zh", summary="Chinese multi-task predictions from one shared encoder",
                  version="1")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = _problems(err)
        first = problems[0] if problems else {"record": None, "field": None, "problem": "invalid request"}
        where = f"record {first['record']}" if first["record"] is not None else "request"
        what = f"`{first['field']}` " if first["field"] else ""
        return JSONResponse(status_code=422, content={"detail": f"{where}: {what}{first['problem']}",
                                                      "problems": problems})

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:  # never a traceback in the body
        return JSONResponse(status_code=500, content={"detail": f"prediction failed: {type(err).__name__}"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "model": source, "precision": predictor.precision, "tasks": sorted(predictor.tasks)}

    @app.post("/predict", response_model=PredictResponse)
    async def predict(request: PredictRequest) -> PredictResponse:
        texts = [r.text for r in request.records]
        pairs = [r.text_pair for r in request.records]
        predicted = await model.predict(texts, pairs if any(p is not None for p in pairs) else None)
        extras = [r.model_extra or {} for r in request.records]
        return PredictResponse(predictions=[extra | record for extra, record in zip(extras, predicted)])

    return app


def serve(model_dir: Path, source: str, host: str, port: int, batch_size: int = 32, quantize: bool = False,
          precision: str = "auto") -> None:
    """Load the model once (with int8 Linear layers when `quantize`, its encoder layers in `precision`) and serve
    it until interrupted."""
    import uvicorn

    from tasks_mtl.predict import Predictor

    model = ModelThread(lambda: Predictor.from_dir(model_dir, batch_size=batch_size, quantize=quantize,
                                                   precision=precision))
    app = create_app(model, source)
    uvicorn.run(app, host=host, port=port, log_level="info")
