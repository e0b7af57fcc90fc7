"""The routes: parse (schemas) -> normalize (requests) -> submit (runner) -> format. Nothing else."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from pydantic_core import to_json

from hstu_opt.errors import HstuOptError
from hstu_opt.serve import middleware, requests
from hstu_opt.serve.metrics import ServeMetrics
from hstu_opt.serve.retrieval import ItemIndex
from hstu_opt.serve.runners.base import RankInput, RankOutput, Runner, Unavailable
from hstu_opt.serve.schemas import (BINARY_FIELDS, BINARY_HEADER, ErrorBody, Health, ModelInfo, ModelRef,
                                    RankRequest, RankResponse, Readiness, ResultsLayout, RetrievedItem,
                                    RetrieveRequest, RetrieveResponse, openapi_with_limits)
from hstu_opt.serve.served_bundle import ServedBundle

ERRORS = {413: {"model": ErrorBody, "description": "Body over the server's limit"},
          422: {"model": ErrorBody, "description": "A field is invalid (`field` names it)"},
          500: {"model": ErrorBody, "description": "The engine failed on this request (see the server log)"},
          503: {"model": ErrorBody, "description": "Queue full, loading or shutting down (see Retry-After)"}}

RANK_ERRORS = {**ERRORS, 409: {"model": ErrorBody, "description": "history_ref names a history the cache no longer holds "
                                                                  "(send the history)"}}


def create_app(runner: Runner, bundle: ServedBundle, items: ItemIndex, metrics: ServeMetrics,
               max_body_bytes: int) -> FastAPI:
    limits, tasks = bundle.limits, list(bundle.cfg.ranking_tasks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            await runner.start()
        except HstuOptError as exc:  # the server reports it as one line (server.serve)
            app.state.start_error = exc
            raise
        yield
        await runner.stop()  # (uvicorn has already let every in-flight request finish)

    app = FastAPI(title="hstu-opt serve", version="1", lifespan=lifespan,
                  description=f"Ranking and retrieval with the bundle {bundle.name} {bundle.version}.")

    def model_ref() -> ModelRef:
        return ModelRef(name=bundle.name, version=bundle.version, engine=runner.engine)

    def check_ready() -> None:
        if not runner.ready():
            raise Unavailable("the engine is not ready (loading, or the server is shutting down)")

    @app.post("/v1/rank", response_model=RankResponse, responses=RANK_ERRORS, openapi_extra=json_body(RankRequest))
    async def rank(request: Request) -> Response:
        """Task probabilities for every candidate, best first."""
        t0 = time.perf_counter()
        body, binary = parse_body(RankRequest, await request.body(), request.headers.get(BINARY_HEADER))
        check_ready()
        inp = requests.rank_input(body, limits, runner.history_refs(), binary)
        t_in = time.perf_counter()
        out = await runner.rank(inp)
        return rank_response(inp, out, tasks, model_ref(), t0, t_in, time.perf_counter(), body.results_layout)

    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS,
              openapi_extra=json_body(RetrieveRequest))
    async def retrieve(request: Request) -> RetrieveResponse:
        """The k items of the bundle's item table closest to the user's query embedding."""
        t0 = time.perf_counter()
        body, binary = parse_body(RetrieveRequest, await request.body(), request.headers.get(BINARY_HEADER))
        check_ready()
        inp = requests.retrieve_input(body, limits, binary)
        query = await runner.retrieve(inp)  # [D]
        ids, scores = items.top_k(query, body.k, inp.item_ids if body.exclude_seen else None)
        results = [RetrievedItem(item_id=int(i), score=float(s)) for i, s in zip(ids, scores)]
        return RetrieveResponse(results=results, model=model_ref(), truncated=inp.truncated,
                                timing_ms={"total": elapsed_ms(t0)})

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The process is up (says nothing about the engine: see /readyz)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
    async def readyz(response: Response) -> Readiness:
        """200 once the engine is loaded and warmed; 503 before that and while draining for shutdown."""
        if not runner.ready():
            response.status_code = 503
            response.headers["Retry-After"] = "1"
        return Readiness(ready=runner.ready(), engine=runner.engine)

    @app.get("/v1/model", response_model=ModelInfo)
    async def model() -> ModelInfo:
        """The bundle's summary, its limits, and which engine serves it and why."""
        m = bundle.manifest
        return ModelInfo(name=bundle.name, version=bundle.version, created_utc=m.get("created_utc", ""),
                         recipe_sha256=m.get("recipe_sha256", ""), tasks=tasks,
                         limits=limits, runner=runner.describe())

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    middleware.install(app, metrics, max_body_bytes)
    default_openapi = app.openapi

    def bundle_openapi() -> dict:  # (FastAPI caches the result in app.openapi_schema)
        if app.openapi_schema is None:
            doc = default_openapi()
            for model in (RankRequest, RetrieveRequest):  # the bodies the routes parse themselves
                schema = model.model_json_schema(ref_template=f"{SCHEMAS}{{model}}")
                doc.setdefault("components", {}).setdefault("schemas", {}).update(
                    {**schema.pop("$defs", {}), model.__name__: schema})
            app.openapi_schema = openapi_with_limits(doc, limits)
        return app.openapi_schema

    app.openapi = bundle_openapi
    return app


SCHEMAS = "#/components/schemas/"


def json_body(model: type[BaseModel]) -> dict:
    """The OpenAPI request body of a route that parses its own body (parse_body): JSON, or (with the
    BINARY_HEADER) JSON followed by the arrays its binary fields name."""
    return {"parameters": [{
        "name": BINARY_HEADER, "in": "header", "required": False, "schema": {"type": "integer", "minimum": 1},
        "description": "Binary body (Triton's binary data extension): the body starts with this many bytes of "
                       "the JSON request, in which any of " + ", ".join(BINARY_FIELDS) + " may be "
                       "{\"binary_data_size\": bytes}; those arrays follow the JSON back to back, little-endian "
                       "int64, in that order. Omit it for an all-JSON body."}],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"{SCHEMAS}{model.__name__}"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


def parse_body(model: type[BaseModel], body: bytes, binary_header: str | None = None):
    """-> (the request, its body's binary section or None). Validates the raw JSON in one pass (pydantic's
    JSON parser: a 4096-row history in about half the time of json.loads followed by validation, which
    FastAPI's own body parameter does); with the binary_header (Inference-Header-Content-Length) the JSON is
    only the body's first that many bytes. Errors go to the same 422 handler as FastAPI's own."""
    text, binary = requests.split_binary(body, binary_header)
    try:
        return model.model_validate_json(text), binary
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


def elapsed_ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)


def item_results(ids: np.ndarray, probs: np.ndarray, tasks: list[str]) -> dict:
    """results_layout "items": one {item_id, scores} object per candidate. Filled column by column: half
    the time of dict(zip(tasks, row)) per candidate. ids [M], probs [M, T], in the response's order."""
    per_item = [{} for _ in range(len(ids))]
    for task, column in zip(tasks, probs.T.tolist()):
        for item_scores, p in zip(per_item, column):
            item_scores[task] = p
    return {"results": [{"item_id": i, "scores": s} for i, s in zip(ids.tolist(), per_item)]}


def column_results(ids: np.ndarray, probs: np.ndarray, tasks: list[str]) -> dict:
    """results_layout "columns": one list per field (no per-candidate Python)."""
    return {"columns": {"item_id": ids.tolist(), "scores": dict(zip(tasks, probs.T.tolist()))}}


def packed_results(ids: np.ndarray, probs: np.ndarray, tasks: list[str]) -> dict:
    """results_layout "packed": the columns as base64 (int64 ids, float32 scores: no float formatting)."""
    scores = {t: requests.pack(probs[:, j], "<f4") for j, t in enumerate(tasks)}
    return {"packed": {"item_id": requests.pack(ids, "<i8"), "scores": scores}}


RESULTS_LAYOUTS = {"items": item_results, "columns": column_results, "packed": packed_results}  # -> its builder


def rank_response(inp: RankInput, out: RankOutput, tasks: list[str], model: ModelRef, t0: float,
                  t_in: float, t_back: float, layout: ResultsLayout = "items") -> Response:
    """The RankResponse in the request's results_layout, serialized directly (pydantic-core's JSON writer on
    plain lists and dicts): building 256 ScoredItem models and FastAPI's validate-then-encode of them took
    10x longer. timing_ms: input (body read, parsed, checked), the runner's phases, reply (from the runner's
    thread finishing to this route resuming: the hand-back to the event loop), response (building the
    results, before serializing them), total (up to the same point)."""
    order = np.argsort(-out.probs[:, 0], kind="stable")  # by the first task, highest first
    results = RESULTS_LAYOUTS[layout](inp.candidates[order], out.probs[order], tasks)  # [M], [M, T]
    reply = {"reply": round((t_back - out.finished) * 1e3, 3)} if out.finished else {}
    timing = {"input": round((t_in - t0) * 1e3, 3), **out.timing_ms, **reply, "response": elapsed_ms(t_back),
              "total": elapsed_ms(t0)}
    body = {**results, "model": model.model_dump(), "cache": out.cache, "truncated": inp.truncated,
            **({"history_ref": out.history_ref} if out.history_ref else {}), "timing_ms": timing}
    return Response(to_json(body), media_type="application/json")
