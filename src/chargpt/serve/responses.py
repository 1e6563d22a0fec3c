"""From engine events to OpenAI's completion objects: one JSON response, or server-sent events.

JSON is written by pydantic-core a choice at a time, and large answers are built in a worker
thread, so that no answer holds the event loop (and `/health`) for long."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic_core import to_json
from starlette.types import Receive, Scope, Send

from chargpt.serve.encoding import json_list
from chargpt.serve.engine import Failure, Finish, Piece, Submission
from chargpt.serve.errors import APIError
from chargpt.serve.schemas import Choice, Completion, Logprobs, Usage
from chargpt.serve.scoring import TokenLogprob

CLIENT_CLOSED = 499  # the status access logs use for a client that left before the answer
# characters (with their logprobs entries) past which an answer is built in a worker thread
LARGE = 4096
T = TypeVar("T")
LOGPROBS = list(Logprobs.model_fields)  # tokens, token_logprobs, top_logprobs, text_offset


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
        return Logprobs.model_construct(  # our own values: no validation of every entry
            tokens=[e.token for e in entries],
            token_logprobs=[e.logprob for e in entries],
            top_logprobs=[e.top for e in entries],
            text_offset=[e.offset for e in entries],
        )


def failure_error(failure: Failure) -> APIError:
    return APIError(failure.status, failure.message, "server_error")


async def complete(submission: Submission, reply: Reply) -> bytes:
    """The whole response as JSON, once every choice has finished."""
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

    def render() -> bytes:
        choices = [
            Choice(
                text="".join(texts[i]),
                index=i,
                logprobs=reply.logprobs_of(entries[i]),
                finish_reason=reasons[i],  # type: ignore[arg-type]
            )
            for i in range(count)
        ]
        return completion_json(reply.completion(choices, reply.usage(completion_tokens)))

    size = sum(len(t) for choice in texts for t in choice) + sum(map(len, entries))
    return await off_the_loop(render) if size > LARGE else render()


async def off_the_loop(work: Callable[[], T]) -> T:
    """Run `work` in a worker thread, leaving the event loop to answer other requests."""
    return await asyncio.get_running_loop().run_in_executor(None, work)


def completion_json(completion: Completion, exclude: set[str] | None = None) -> bytes:
    """`completion` as JSON, written in pieces (`chargpt.serve.encoding`): a choice at a time,
    its logprobs lists a few thousand entries at a time."""
    head = to_json(completion.model_dump(exclude={"choices", *(exclude or ())}))
    choices = b",".join(choice_json(choice) for choice in completion.choices)
    return head[:-1] + b',"choices":[' + choices + b"]}"


def choice_json(choice: Choice) -> bytes:
    if choice.logprobs is None:
        return to_json(choice)
    head = to_json(choice.model_dump(exclude={"logprobs"}))
    lists = (to_json(name) + b":" + json_list(getattr(choice.logprobs, name)) for name in LOGPROBS)
    return head[:-1] + b',"logprobs":{' + b",".join(lists) + b"}}"


async def complete_unless_gone(
    submission: Submission, reply: Reply, request: Request
) -> bytes | None:
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
) -> AsyncIterator[bytes]:
    """Completion chunks as server-sent events, a chunk per piece of text and per finished
    choice, then (if asked) the usage with no choices, then [DONE]."""
    completion_tokens = 0
    exclude = None if include_usage else {"usage"}  # with include_usage every chunk has `usage`
    async for event in submission.events():
        if isinstance(event, Failure):
            yield sse(to_json(failure_error(event).body()))
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
        large = isinstance(event, Piece) and len(event.text) > LARGE  # an echoed prompt
        render = partial(completion_json, reply.completion([choice]), exclude)
        yield sse(await off_the_loop(render) if large else render())
    if include_usage:
        yield sse(completion_json(reply.completion([], reply.usage(completion_tokens))))
    yield b"data: [DONE]\n\n"


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


class EventStream(StreamingResponse):
    """A text/event-stream response that calls `on_close` however it ends: finished, failed, or
    cut short by a client that went away."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()
