"""The HTTP API: OpenAI's completions endpoints over one run and its batching engine.

`create_app` stores what routes need on `app.state`: `run` (the loaded `Run`), `engine`,
`settings` (the `ServeConfig`), `metrics` and `model_id`; every router in `api_routers()` is
included, so a new page or endpoint is one more entry there.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from chargpt import __version__
from chargpt.config import SampleConfig, ServeConfig
from chargpt.data.tokenizer import CharTokenizer, UnknownCharactersError
from chargpt.generation.generate import encode_prompt
from chargpt.generation.precision import forward_dtype
from chargpt.runs.directory import WEIGHTS, Run
from chargpt.serve.engine import Engine
from chargpt.serve.errors import APIError, install_error_handlers, json_body
from chargpt.serve.jobs import Job, QueueFull, ShuttingDown, Submission
from chargpt.serve.metrics import ServeMetrics
from chargpt.serve.middleware import (
    AllowHosts,
    CountRequests,
    LimitBodySize,
    RequireAPIKey,
    is_loopback,
)
from chargpt.serve.playground import router as playground_router
from chargpt.serve.responses import (
    CLIENT_CLOSED,
    EventStream,
    Reply,
    complete_unless_gone,
    event_stream,
)
from chargpt.serve.schemas import Completion, CompletionRequest, ModelCard, ModelList

router = APIRouter()
REQUEST_SCHEMA = CompletionRequest.model_json_schema()  # for /docs: the body is parsed by hand


def api_routers() -> list[APIRouter]:
    """Every router the server includes."""
    return [router, playground_router]


def create_app(run: Run, run_dir: Path, settings: ServeConfig) -> FastAPI:
    """The server for one loaded run; its engine starts and stops with the app's lifespan."""
    metrics = ServeMetrics(settings.max_batch)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine.start()
        yield
        app.state.engine.stop(timeout=10)

    app = FastAPI(title="chargpt", version=__version__, lifespan=lifespan)
    app.state.run = run
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.model_id = Path(run_dir).resolve().name
    app.state.created = int((Path(run_dir) / WEIGHTS).stat().st_mtime)
    dtype = forward_dtype(run.model, settings.dtype, next(run.model.parameters()).device)
    app.state.engine = Engine(
        run.model, run.tokenizer, settings.max_batch, settings.max_queue, metrics, dtype
    )
    install_error_handlers(app)
    routers = api_routers()
    for api in routers:
        app.include_router(api)
    paths = {getattr(route, "path", "") for api in routers for route in api.routes}
    app.add_middleware(LimitBodySize, max_bytes=settings.max_body_bytes)
    if settings.api_key:
        app.add_middleware(RequireAPIKey, api_key=settings.api_key)
    if is_loopback(settings.host) or settings.allowed_host:
        app.add_middleware(AllowHosts, hosts=settings.allowed_host)
    app.add_middleware(CountRequests, metrics=metrics, paths=paths)
    return app


@router.get("/health")
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


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    metrics: ServeMetrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=metrics.content_type)


@router.get("/v1/models")
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(request)])


@router.get("/v1/models/{model_id}")
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


def check_model(model_id: str, request: Request) -> None:
    served = request.app.state.model_id
    if model_id != served:
        raise APIError(
            404,
            f"The model '{model_id}' does not exist: this server serves '{served}'",
            param="model",
            code="model_not_found",
        )


@router.post(
    "/v1/completions",
    response_model=None,
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": REQUEST_SCHEMA}}}},
)
async def create_completion(request: Request) -> Completion | Response:
    body = await json_body(request, CompletionRequest)
    state = request.app.state
    check_model(body.model, request)
    job = build_job(body, state.run.tokenizer, state.settings)
    submission = submit(state.engine, job, state.settings)
    prompt_tokens = sum(len(ids) for ids in job.prompts)
    reply = Reply(state.model_id, prompt_tokens, logprobs=body.logprobs is not None)
    if body.stream:
        events = event_stream(submission, reply, body.include_usage)
        return EventStream(events, on_close=submission.cancel)
    completion = await complete_unless_gone(submission, reply, request)
    return completion if completion is not None else Response(status_code=CLIENT_CLOSED)


@router.post("/v1/chat/completions")
async def chat_completions() -> None:
    raise APIError(
        404,
        "Chat completions are not supported: this is a character model trained on plain text, "
        "not a chat model; send a prompt to POST /v1/completions instead",
        code="unsupported_endpoint",
    )


def build_job(body: CompletionRequest, tokenizer: CharTokenizer, settings: ServeConfig) -> Job:
    """The engine's job for a valid request, after the server's limits and the vocabulary."""
    config = body.sample_config()
    prompts = body.prompts
    check_prompt_length(sum(map(len, prompts)), settings)
    if config.on_unknown == "error":
        for i, text in enumerate(prompts):
            check_known(
                text, "prompt" if isinstance(body.prompt, str) else f"prompt[{i}]", tokenizer
            )
    check_size(len(prompts), config, settings)
    ids = [encode_prompt(tokenizer, text, config.on_unknown) for text in prompts]
    return Job(ids, config, body.logprobs, bool(body.echo))


def check_prompt_length(length: int, settings: ServeConfig) -> None:
    """All of a request's prompts together: scoring them with `echo` keeps an entry per
    character until the answer is sent."""
    if length > settings.max_prompt_chars:
        raise APIError(
            400,
            f"the prompt has {length} characters, more than this server's limit of "
            f"{settings.max_prompt_chars} (--max-prompt-chars): send a shorter prompt",
            param="prompt",
            code="prompt_too_long",
        )


def check_known(text: str, where: str, tokenizer: CharTokenizer) -> None:
    try:
        tokenizer.check_known(text)
    except UnknownCharactersError as err:
        raise APIError(
            400,
            f'{where} has {err}: remove them, or send "on_unknown": "skip" to drop them',
            param="prompt",
            code="unknown_characters",
        ) from None


def check_size(prompts: int, config: SampleConfig, settings: ServeConfig) -> None:
    """A request's choices must fit the queue, and their characters the per-request limit."""
    choices = prompts * config.num_samples
    if choices > settings.max_queue:
        raise APIError(
            400,
            f"this request asks for {choices} choices (prompts x n), more than this server's "
            f"queue holds ({settings.max_queue}, --max-queue): lower n or send fewer prompts",
            param="n",
        )
    total = choices * config.max_new_tokens
    limit = settings.max_tokens_limit
    if total > limit and choices == 1:
        raise APIError(
            400,
            f"max_tokens is {total}, more than this server's limit of {limit} characters per "
            "request (--max-tokens-limit): lower max_tokens",
            param="max_tokens",
        )
    if total > limit:
        raise APIError(
            400,
            f"this request asks for {choices} choices (prompts x n) x max_tokens "
            f"{config.max_new_tokens} = {total} characters, more than this server's limit of "
            f"{limit} (--max-tokens-limit): lower max_tokens or n, or send fewer prompts",
            param="max_tokens",
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
