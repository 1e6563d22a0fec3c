"""The HTTP API: OpenAI's completions endpoints over one run and its batching engine.

`create_app` stores what routes need on `app.state`: `run` (the loaded `Run`), `engine`,
`settings` (the `ServeConfig`), `metrics` and `model_id`; every router in `api_routers()` is
included, so a new page or endpoint is one more entry there.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse

from chargpt import __version__
from chargpt.config import ServeConfig
from chargpt.model.precision import forward_dtype
from chargpt.runs.directory import WEIGHTS, Run
from chargpt.serve.engine import Engine
from chargpt.serve.errors import APIError, install_error_handlers, require_json
from chargpt.serve.jobs import Job, QueueFull, ShuttingDown, Submission
from chargpt.serve.limits import check_model
from chargpt.serve.metrics import ServeMetrics
from chargpt.serve.middleware import (
    AllowHosts,
    CountRequests,
    LimitBodySize,
    RequireAPIKey,
    is_loopback,
)
from chargpt.serve.openapi import BODY_ERRORS, errors, install_openapi
from chargpt.serve.playground import INSPECT_CONCURRENCY, INSPECT_WAITING, Turns
from chargpt.serve.playground import router as playground_router
from chargpt.serve.responses import (
    CLIENT_CLOSED,
    EventStream,
    Reply,
    complete_unless_gone,
    event_stream,
)
from chargpt.serve.schemas import Completion, CompletionRequest, Health, ModelCard, ModelList
from chargpt.serve.tokens import router as tokens_router

router = APIRouter()


def api_routers() -> list[APIRouter]:
    """Every router the server includes."""
    return [router, playground_router, tokens_router]


def create_app(run: Run, run_dir: Path, settings: ServeConfig) -> FastAPI:
    """The server for one loaded run; its engine starts and stops with the app's lifespan."""
    metrics = ServeMetrics(settings.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine.start()
        gc.freeze()  # what start-up made lives on: full collections no longer walk it (pauses)
        yield
        app.state.engine.stop(timeout=10)

    app = FastAPI(title="chargpt", version=__version__, lifespan=lifespan)
    app.state.run = run
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.inspecting = Turns(INSPECT_CONCURRENCY, INSPECT_WAITING)
    app.state.model_id = Path(run_dir).resolve().name
    app.state.created = int((Path(run_dir) / WEIGHTS).stat().st_mtime)
    dtype = forward_dtype(run.model, settings.dtype, next(run.model.parameters()).device)
    app.state.engine = Engine(
        run.model,
        run.tokenizer,
        settings.max_batch,
        settings.max_queue,
        metrics,
        dtype,
        deterministic=settings.deterministic,
    )
    install_error_handlers(app)
    install_openapi(app)
    routers = api_routers()
    for api in routers:
        app.include_router(api)
    paths = {getattr(route, "path", "") for api in routers for route in api.routes}
    app.add_middleware(LimitBodySize, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(RequireAPIKey, api_key=settings.api_key)
    if is_loopback(settings.host) or settings.allowed_host:
        app.add_middleware(AllowHosts, listening=settings.host, hosts=settings.allowed_host)
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
    return app


@router.get(
    "/health",
    response_model=Health,
    responses={503: {"model": Health, "description": "The engine has stopped"}, **errors(400)},
)
async def health(request: Request) -> JSONResponse:
    """200 while the engine runs; 503 once its thread has ended after an error (restart)."""
    engine: Engine = request.app.state.engine
    body = {
        "status": "error" if engine.broken else "ok",
        "model": request.app.state.model_id,
        "queued": engine.queued,
        "running": len(engine.running),
    }
    return JSONResponse(body, 503 if engine.broken else 200)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus' text format"}, **errors(400)},
)
async def prometheus_metrics(request: Request) -> Response:
    metrics: ServeMetrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=metrics.content_type)


@router.get("/v1/models", responses=errors(400, 401))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(request)])


@router.get("/v1/models/{model_id}", responses=errors(400, 401, 404))
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    check_model(model_id, request)
    return model_card(request)


def model_card(request: Request) -> ModelCard:
    state = request.app.state
    run: Run = state.run
    return ModelCard(
        id=state.model_id,
        created=state.created,
        context_length=run.model.context_length,
        vocab_size=run.tokenizer.vocab_size,
        parameters=run.model.num_parameters(),
        best_val_loss=run.meta.get("best_val_loss"),
    )


@router.post(
    "/v1/completions",
    response_model=None,
    responses={
        200: {
            "model": Completion,
            "description": "The completion; with `stream`, server-sent events of its chunks",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **errors(*BODY_ERRORS, 429, 503),
    },
    dependencies=[Depends(require_json)],
)
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state = request.app.state
    check_model(body.model, request)
    job = body.job(state.run.tokenizer, state.settings)
    submission = submit(state.engine, job, state.settings)
    prompt_tokens = sum(len(ids) for ids in job.prompts)
    reply = Reply(state.model_id, prompt_tokens, logprobs=body.logprobs is not None)
    if body.stream:
        events = event_stream(submission, reply, body.include_usage)
        return EventStream(events, on_close=submission.cancel)
    answer = await complete_unless_gone(submission, reply, request)
    if answer is None:
        return Response(status_code=CLIENT_CLOSED)
    return Response(answer, media_type="application/json")


@router.post("/v1/chat/completions", status_code=404, responses=errors(400, 401, 404, 413))
async def chat_completions() -> None:
    raise APIError(
        404,
        "Chat completions are not supported: this is a character model trained on plain text, "
        "not a chat model; send a prompt to POST /v1/completions instead",
        code="unsupported_endpoint",
    )


def submit(engine: Engine, job: Job, settings: ServeConfig) -> Submission:
    try:
        return engine.submit(job)
    except QueueFull:
        raise APIError(
            429,
            f"The server is busy: its queue of {settings.max_queue} sequences is full; "
            "retry in a moment",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": "1"},
        ) from None
    except ShuttingDown as err:
        raise APIError(503, str(err), "server_error") from None
