"""From engine events to OpenAI's completion objects: one JSON response, or server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from chargpt.serve.engine import Failure, Finish, Piece, Submission
from chargpt.serve.errors import APIError
from chargpt.serve.schemas import Choice, Completion, Logprobs, Usage
from chargpt.serve.scoring import TokenLogprob

CLIENT_CLOSED = 499  # the status access logs use for a client that left before the answer


@dataclass
class Reply:
    """What the response (or every chunk of the stream) of one request carries."""

    model: str
    prompt_tokens: int
    logprobs: bool  # whether the request asked for them
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def completion(self, choices: list[Choice], usage: Usage | None = None) -> Completion:
        return Completion(
            id=self.id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def usage(self, completion_tokens: int) -> Usage:
        total = self.prompt_tokens + completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=total,
        )

    def logprobs_of(self, entries: list[TokenLogprob] | None) -> Logprobs | None:
        if not self.logprobs:
            return None
        entries = entries or []
        return Logprobs(
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[e.top for e in entries],
            text_offset=[e.offset for e in entries],
        )


def failure_error(failure: Failure) -> APIError:
    return APIError(failure.status, failure.message, "server_error")


async def complete(submission: Submission, reply: Reply) -> Completion:
    """The whole response, once every choice has finished."""
    count = submission.job.choices
    texts: list[list[str]] = [[] for _ in range(count)]
    entries: list[list[TokenLogprob]] = [[] for _ in range(count)]
    reasons: list[str | None] = [None] * count
    completion_tokens = 0
    async for event in submission.events():
        if isinstance(event, Failure):
            raise failure_error(event)
        if isinstance(event, Piece):
            texts[event.choice].append(event.text)
            entries[event.choice] += event.logprobs or []
        elif isinstance(event, Finish):
            reasons[event.choice] = event.reason
            completion_tokens += event.completion_tokens
    choices = [
        Choice(
            text="".join(texts[i]),
            index=i,
            logprobs=reply.logprobs_of(entries[i]),
            finish_reason=reasons[i],  # type: ignore[arg-type]
        )
        for i in range(count)
    ]
    return reply.completion(choices, reply.usage(completion_tokens))


async def complete_unless_gone(
    submission: Submission, reply: Reply, request: Request
) -> Completion | None:
    """`complete`, or None as soon as the client disconnects (its sequences leave the batch)."""
    answer = asyncio.ensure_future(complete(submission, reply))
    gone = asyncio.ensure_future(disconnected(request))
    try:
        done, _ = await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request is cancelled (a shutdown's grace period ran out)
        answer.cancel()  # no-ops for a task that is done
        gone.cancel()
        submission.cancel()  # the engine drops whatever of it is left
    return answer.result() if answer in done else None


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def event_stream(
    submission: Submission, reply: Reply, include_usage: bool
) -> AsyncIterator[str]:
    """Completion chunks as server-sent events, a chunk per piece of text and per finished
    choice, then (if asked) the usage with no choices, then [DONE]."""
    completion_tokens = 0
    async for event in submission.events():
        if isinstance(event, Failure):
            yield sse(failure_error(event).body())
            return
        if isinstance(event, Piece):
            logprobs = reply.logprobs_of(event.logprobs)
            choice = Choice(
                text=event.text, index=event.choice, logprobs=logprobs, finish_reason=None
            )
        else:
            completion_tokens += event.completion_tokens
            logprobs = reply.logprobs_of([])
            choice = Choice(
                text="", index=event.choice, logprobs=logprobs, finish_reason=event.reason
            )
        yield sse(chunk(reply.completion([choice]), include_usage))
    if include_usage:
        yield sse(chunk(reply.completion([], reply.usage(completion_tokens)), True))
    yield "data: [DONE]\n\n"


def chunk(completion: Completion, include_usage: bool) -> dict:
    """With include_usage every chunk has `usage` (null but in the last); without, none has."""
    return completion.model_dump(exclude=None if include_usage else {"usage"})


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that calls `on_close` however it ends: finished, failed, or
    cut short by a client that went away."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
