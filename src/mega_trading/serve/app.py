"""HTTP: the FastAPI app (routes, error mapping, body-size limit, answer tracking), the
OpenAPI document, and serving with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mega_trading import __version__
from mega_trading.core.errors import MegaTradingError
from mega_trading.core.lineage import write_text_atomic
from mega_trading.serve.schemas import (
    API_TITLE,
    ErrorResponse,
    Health,
    ModelCard,
    RolloutRequest,
    RolloutResponse,
    ServeError,
    ServeSettings,
)
from mega_trading.serve.service import RolloutService

log = logging.getLogger("mega_trading.serve")


# --- HTTP ----------------------------------------------------------------------------------

class BodySizeLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, before anything parses it.

    A declared Content-Length is checked first; otherwise (chunked) the body is read up to
    the limit and then handed on to the app unchanged.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.max_bytes:
            await self._reject(int(declared), scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client gone
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._reject(size, scope, receive, send, at_least=True)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, size: int, scope, receive, send, at_least: bool = False) -> None:
        over = "over " if at_least else ""
        response = JSONResponse({"detail": f"request body is {over}{size} bytes; this server "
                                           f"accepts at most {self.max_bytes} bytes"},
                                status_code=413)
        await response(scope, receive, send)


class AnswerTracking:
    """ASGI middleware: what a request enters on ``scope[KEY]`` (an ExitStack) is left
    when its response has been sent, or the client has gone: the batcher counts answers
    up to their last byte (``Batcher.writing_answer``)."""

    KEY = "mega_trading.answer"

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with contextlib.ExitStack() as stack:
            scope[self.KEY] = stack
            await self.app(scope, receive, send)


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {413: "body too large (checked before parsing)",
            422: "invalid request: schema, vocabulary or limits",
            503: "queue full or queue timeout", 504: "generation timeout"}
    return {code: {"model": ErrorResponse, "description": text[code]} for code in codes}


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    clean = [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
              "type": str(e.get("type", ""))} for e in errors]
    if not clean:
        return "invalid request", clean
    first = clean[0]
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    more = f" (and {len(clean) - 1} more)" if len(clean) > 1 else ""
    return f"{where}: {first['msg']}{more}", clean


def build_app(service: RolloutService | None, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The FastAPI app around a service (None builds the routes only, for the schema)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if service is not None:
            service.start()
        try:
            yield
        finally:
            if service is not None:
                await service.stop()

    app = FastAPI(title=API_TITLE, version=__version__, lifespan=lifespan,
                  description="Synthetic Binance order flow sampled from a trained Mega-Trading "
                              "decoder. Same request and seed, same rollouts.")
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(AnswerTracking)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _validation_message(list(exc.errors()))
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # FastAPI answers 400 for a body it cannot decode at all (not UTF-8) but 422 for
        # malformed JSON; both are one kind of client error here: 422.
        status = 422 if exc.status_code == 400 else exc.status_code
        detail = ("the body is not valid UTF-8 JSON" if exc.status_code == 400 else exc.detail)
        return JSONResponse({"detail": str(detail)}, status_code=status,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(MegaTradingError)
    async def on_refused(request: Request, exc: MegaTradingError) -> JSONResponse:
        status = getattr(exc, "status_code", 422)
        return JSONResponse({"detail": str(exc)}, status_code=status,
                            headers=getattr(exc, "headers", None))

    def running() -> RolloutService:
        if service is None:
            raise ServeError("no run is loaded", 503)
        return service

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness and batching counters."""
        svc = running()
        return {"status": "ok", "queued": svc.batcher.queued,
                **dataclasses.asdict(svc.batcher.stats)}

    @app.get("/v1/model", response_model=ModelCard, tags=["model"])
    async def model_card() -> dict[str, Any]:
        """The model card: config, size, hashes, training data, backtest headline, limits."""
        return running().model_card()

    @app.post("/v1/rollouts", response_model=RolloutResponse, tags=["rollouts"],
              responses=_error_responses(413, 422, 503, 504))
    async def rollouts(body: RolloutRequest, request: Request) -> Response:
        """Sample `n` rollouts of `length` tokens continuing one prompt."""
        svc = running()
        if body.tokens is not None:  # checked in microseconds: no thread hop
            job, anchor = svc.build_job(body)
        else:  # events to encode, or a window or segment start to read from the shards
            job, anchor = await asyncio.to_thread(svc.build_job, body)
        client = request.scope.get("client")  # (host, port); a list from some servers
        job.client = tuple(client) if client else None
        new_tokens = await svc.batcher.submit(job)
        request.scope[AnswerTracking.KEY].enter_context(svc.batcher.writing_answer(job.client))
        # already JSON, to the response model's schema: FastAPI passes a Response through
        return Response(await svc.answer(job, anchor, new_tokens), media_type="application/json")

    return app


def create_app(run_dir: str | Path, data_dir: str | Path | None = None,
               settings: ServeSettings = ServeSettings()) -> FastAPI:
    """Load a run (and optionally its prepared data) and build the app serving it."""
    return build_app(RolloutService(run_dir, data_dir, settings), settings)


def openapi_document() -> dict[str, Any]:
    """The served OpenAPI schema (it does not depend on the run)."""
    return build_app(None).openapi()


def write_openapi(path: str | Path) -> Path:
    import json


    return write_text_atomic(path, json.dumps(openapi_document(), indent=2) + "\n")


def serve_forever(app: FastAPI, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


