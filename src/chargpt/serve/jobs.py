"""What a request asks the engine for (a `Job`), and what it gets back: a `Submission` whose
events (`Piece`, `Finish`, `Failure`) arrive from the scheduler thread on an asyncio queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from chargpt.config import SampleConfig
from chargpt.serve.scoring import TokenLogprob


@dataclass(frozen=True)
class Piece:
    """New text of one choice (with its logprobs entries when they were asked for)."""

    choice: int
    text: str
    logprobs: list[TokenLogprob] | None


@dataclass(frozen=True)
class Finish:
    choice: int
    reason: str  # "stop" or "length"
    completion_tokens: int  # characters sampled, those of a stop string included


@dataclass(frozen=True)
class Failure:
    message: str
    status: int = 500  # 503: the engine has ended


Event = Piece | Finish | Failure


@dataclass(frozen=True)
class Job:
    """What a request asks the engine for."""

    prompts: list[list[int]]  # token ids of each prompt, as the model reads it
    config: SampleConfig  # num_samples choices per prompt, max_new_tokens each, ...
    logprobs: int | None = None  # how many of the likeliest characters to report (None: none)
    echo: bool = False  # send the prompt first (scored, with logprobs)
    echoed: list[str] | None = None  # each prompt's text as echoed ("" for an empty prompt)

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.config.num_samples


class QueueFull(Exception):
    """The queue cannot take a request's sequences now."""


class ShuttingDown(Exception):
    """The engine takes no more requests: it was stopped, or its thread ended after an error
    (the message says which)."""


class Submission:
    """A request inside the engine; its events arrive in order, per choice, on an asyncio queue."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop):
        self.job = job
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False  # set by the client's side; the engine drops it at the next step
        self.arrived = time.monotonic()

    def cancel(self) -> None:
        self.cancelled = True

    def post(self, event: Event) -> None:
        """Called from the scheduler thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """Every event until each choice has finished, or the first failure."""
        finished = 0
        while finished < self.job.choices:
            event = await self.queue.get()
            yield event
            if isinstance(event, Failure):
                return
            if isinstance(event, Finish):
                finished += 1
