"""HTTP plumbing around the routes: request ids, the body-size limit (413), metrics, and one JSON error
shape ({error, field, request_id}) for 422 / 503 / 500. A 500 never carries a traceback: the server
log has it, under the same request id."""

from __future__ import annotations

import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hstu_opt.serve.metrics import ServeMetrics
from hstu_opt.serve.requests import InvalidRequest
from hstu_opt.serve.runners.base import HistoryRefGone, QueueFull, Unavailable
from hstu_opt.serve.schemas import UNION_TAGS, ErrorBody

log = logging.getLogger("hstu_opt.serve")
REQUEST_ID = "x-request-id"


def error_response(status: int, message: str, request_id: str, field: str | None = None,
                   retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(retry_after_s)))} if retry_after_s is not None else None
    body = ErrorBody(error=message, field=field, request_id=request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def request_id(request: Request) -> str:
    return request.scope.get("state", {}).get("request_id", "-")


def field_path(loc: tuple) -> str:
    """FastAPI's error location ('body', 'history', 'item_ids', 3) -> 'history.item_ids[3]'."""
    parts = [p for p in loc if p != "body" and p not in UNION_TAGS] or ["body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out if not out.startswith("[") else f"body{out}"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = exc.errors()[0]
    # (a JSON syntax error's location is the character offset, not a field)
    field = "body" if err.get("type") == "json_invalid" else field_path(tuple(err.get("loc", ())))
    got = f" (got {err['input']!r:.60})" if err.get("type") not in ("missing", "json_invalid") and "input" in err else ""
    return error_response(422, f"{field}: {err.get('msg', 'invalid')}{got}", request_id(request), field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own HTTP errors in our shape; its 400 for a body it cannot decode (e.g. not UTF-8) is bad
    input like any other: 422 naming the body."""
    if exc.status_code == 400:
        return error_response(422, f"body: {exc.detail}: send a UTF-8 JSON object", request_id(request), "body")
    return error_response(exc.status_code, str(exc.detail), request_id(request))


async def _invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
    return error_response(422, str(exc), request_id(request), exc.field)


async def _history_ref_gone(request: Request, exc: HistoryRefGone) -> JSONResponse:
    return error_response(409, str(exc), request_id(request), "history_ref")


async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
    return error_response(503, f"{exc}: the server is at capacity", request_id(request), retry_after_s=exc.retry_after_s)


async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
    return error_response(503, f"{exc}: retry later", request_id(request), retry_after_s=exc.retry_after_s)


def install(app: FastAPI, metrics: ServeMetrics, max_body_bytes: int) -> None:
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(InvalidRequest, _invalid_request)
    app.add_exception_handler(HistoryRefGone, _history_ref_gone)
    app.add_exception_handler(QueueFull, _queue_full)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=max_body_bytes,
                       routes=frozenset(r.path for r in app.routes))


class RequestContext:
    """Pure ASGI: gives each request an id (X-Request-ID), enforces the body limit, records metrics, and
    turns anything unhandled into a JSON 500 with the request id."""

    def __init__(self, app, metrics: ServeMetrics, max_body_bytes: int, routes: frozenset[str]):
        self.app, self.metrics, self.max_body, self.routes = app, metrics, max_body_bytes, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid
        status = {"code": 500, "started": False}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
                # the whole request as the server saw it: body received, parsed, run, response encoded
                took = f"total;dur={(time.perf_counter() - t0) * 1e3:.3f}"
                message["headers"] = [*message.get("headers", []), (REQUEST_ID.encode(), rid.encode()),
                                      (b"server-timing", took.encode())]
            await send(message)

        t0 = time.perf_counter()
        self.metrics.in_progress.inc()
        self.metrics.active += 1
        try:
            await self._handle(scope, receive, send_with_id, rid)
        except Exception:
            log.exception("request %s (%s %s) failed", rid, scope.get("method"), scope.get("path"))
            if not status["started"]:
                await error_response(500, f"internal error while handling the request; the server log has its "
                                          f"traceback under request id {rid}", rid)(scope, receive, send_with_id)
        finally:
            self.metrics.in_progress.dec()
            self.metrics.active -= 1
            route = scope["path"] if scope["path"] in self.routes else "other"
            self.metrics.observe_request(route, status["code"], time.perf_counter() - t0)

    async def _handle(self, scope, receive, send, rid: str) -> None:
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        body = await self._read_body(receive)
        if body is None:
            msg = f"request body is over the server's limit of {self.max_body} bytes: send fewer rows, or raise --max-body-mb"
            return await error_response(413, msg, rid, "body")(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the rest is read and dropped, so the client
        sees the 413 instead of a broken connection)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks)
            size += len(message.get("body", b""))
            if size <= self.max_body:
                chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                return b"".join(chunks) if size <= self.max_body else None
