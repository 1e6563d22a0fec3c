"""The batching engine: one model, one scheduler thread, continuous batching.

A request becomes one sequence per prompt and choice, queued (boundedly) for a slot in the batch.
The scheduler thread repeats one iteration:

1. admit: queued sequences take free slots, and each one's prompt is read alone (a prefill);
   prompts whose log-probabilities `echo` asked for are scored first, a few windows at a time;
2. sample: every running sequence draws its next character from its own logits with its own
   `torch.Generator` (the decoder's `choose`); its text goes through a `StopFilter` to its
   request's events, which the event loop gets together when the iteration ends (`Outbox`); a
   sequence that is done leaves the batch and frees its slot;
3. decode: one forward pass gives every continuing sequence its next logits.

Requests join and leave between iterations. The engine decodes through the package's decoder
interface (`chargpt.generation.decoders`): the fused GPT decodes all running sequences in one
pass (`SlotDecoder`: each sequence at its own position; `GraphDecoder`'s CUDA graphs on a GPU).
A step runs the span of busy slots over the keys they need; a sequence takes the lowest free
slot, which keeps that span short. With `deterministic`, every step runs all slots over all keys
instead, so that a sequence's numbers never depend on the others. Bigram and
`reference`-attention runs get the lab's loop (`LoopDecoder`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from chargpt.config import SampleConfig
from chargpt.data.tokenizer import CharTokenizer
from chargpt.generation.decoders import new_decoder
from chargpt.generation.generate import StopFilter, resolve_seed
from chargpt.generation.sampling import Controls
from chargpt.model import LanguageModel
from chargpt.model.precision import autocast
from chargpt.serve.jobs import (
    Event,
    Failure,
    Finish,
    Job,
    Piece,
    QueueFull,
    ShuttingDown,
    Submission,
)
from chargpt.serve.metrics import ServeMetrics
from chargpt.serve.scoring import PromptScore, TokenLogprob, token_logprobs

log = logging.getLogger("chargpt.serve")
FAILED = "The server had an error while generating this completion"
STOPPED = "The server is shutting down"
ENDED = "The server's engine stopped after an internal error: restart the server"


@dataclass(eq=False)
class Prompt:
    """One prompt of a request, shared by its choices."""

    ids: list[int]
    text: str  # as echo sends it back
    score: PromptScore | None  # echo with logprobs: the prompt's own log-probabilities


class Outbox:
    """The events an iteration posts, handed to the event loop together once it ends: one
    wake-up of the loop (a write to its self-pipe, a system call) per iteration rather than per
    character. Each request's events keep their order."""

    def __init__(self) -> None:
        self.events: list[tuple[Submission, Event]] = []

    def post(self, submission: Submission, event: Event) -> None:
        self.events.append((submission, event))

    def flush(self) -> None:
        events, self.events = self.events, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Submission, Event]]] = {}
        for submission, event in events:
            by_loop.setdefault(submission.loop, []).append((submission, event))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, batch)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                for submission, _ in batch:
                    submission.cancel()


def deliver(batch: list[tuple[Submission, Event]]) -> None:
    """In the event loop: each event to its request's queue."""
    for submission, event in batch:
        submission.queue.put_nowait(event)


@dataclass(eq=False)
class Sequence:
    """One choice of one prompt, from the queue to its last character."""

    submission: Submission
    prompt: Prompt
    choice: int
    generator: torch.Generator
    stop: StopFilter
    held: list[TokenLogprob] = field(default_factory=list)  # logprobs of text held back
    produced: int = 0  # characters sampled
    slot: int = -1
    last_time: float = 0.0

    @property
    def config(self) -> SampleConfig:
        return self.submission.job.config


class Engine:
    """Runs every request's sequences on one model, in one scheduler thread."""

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: CharTokenizer,
        max_batch: int,
        max_queue: int,
        metrics: ServeMetrics,
        dtype: torch.dtype = torch.float32,
        deterministic: bool = False,
    ):
        self.model, self.tokenizer, self.metrics = model.eval(), tokenizer, metrics
        self.max_queue = max_queue
        self.device = next(model.parameters()).device
        self.dtype = dtype  # autocast's and the cache's, as `forward_dtype` picks it
        defaults = SampleConfig()  # the window rule of `chargpt sample`
        # made as the engine's thread runs it: CUDA graphs are captured under its autocast
        with torch.inference_mode(), autocast(self.device, dtype):
            self.decoder = new_decoder(
                model, max_batch, window_keep=defaults.window_keep, dtype=dtype,
                deterministic=deterministic,
            )  # fmt: skip
        self.free_slots = list(range(max_batch))  # a heap: the lowest free slot first
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.queue: deque[Sequence] = deque()  # the scheduler's own
        self.queued = 0  # len(self.queue), readable from any thread
        self.lock = threading.Condition()  # guards incoming and stopping
        self.incoming: list[Sequence] = []
        self.stopping = False
        self.admitting: Sequence | None = None  # the queued sequence being started
        self.max_batch = max_batch
        self.ended = False  # the scheduler thread has finished: stopped or broken
        self.outbox = Outbox()  # the scheduler thread's events, sent once per iteration
        self.thread = threading.Thread(target=self.run, name="chargpt-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def broken(self) -> bool:
        """The scheduler thread ended without being asked to: nothing will be generated."""
        return self.ended and not self.stopping

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking requests; requests still in the engine get a Failure."""
        with self.lock:
            self.stopping = True
            self.lock.notify()
        self.thread.join(timeout)

    def submit(self, job: Job) -> Submission:
        """Queue a request (from the event loop). Raises QueueFull or ShuttingDown."""
        submission = Submission(job, asyncio.get_running_loop())
        seed = resolve_seed(job.config.seed)  # choice i of each prompt uses seed + i
        sequences = []
        for p, ids in enumerate(job.prompts):
            prompt = self.prompt(ids, job.echoed[p] if job.echoed else None, job)
            for i in range(job.config.num_samples):
                generator = torch.Generator(device=self.device).manual_seed(seed + i)
                choice = p * job.config.num_samples + i
                stop = StopFilter(job.config.stop)
                sequences.append(Sequence(submission, prompt, choice, generator, stop))
        with self.lock:
            if self.stopping or self.ended:
                raise ShuttingDown(ENDED if self.broken else STOPPED)
            if len(self.incoming) + self.queued + len(sequences) > self.max_queue:
                raise QueueFull
            self.incoming += sequences
            self.metrics.queue_depth.set(len(self.incoming) + self.queued)
            self.lock.notify()
        return submission

    def prompt(self, ids: list[int], echoed: str | None, job: Job) -> Prompt:
        """`echoed`: the text echo sends back (None: the text the ids spell)."""
        text = self.tokenizer.decode(ids) if echoed is None else echoed
        score = None
        if job.echo and job.logprobs is not None and text:
            context = self.model.context_length
            score = PromptScore(ids, context, job.logprobs, self.tokenizer.itos)
        return Prompt(ids, text, score)

    def run(self) -> None:
        try:
            with torch.inference_mode(), autocast(self.device, self.dtype):
                while self.wait_for_work():
                    try:
                        self.iterate()
                    except Exception:  # a bug or an out-of-memory: fail these, keep serving
                        log.exception("engine step failed")
                        self.recover()
                    self.outbox.flush()  # after what broke it, its errors
        except Exception:  # outside any request: the server must say it can no longer serve
            log.exception("the engine's thread ended after an error")
        finally:  # stopped, or (a bug outside any request) broken: nobody is left waiting
            with self.lock:
                self.ended = True
            ending = Failure(STOPPED) if self.stopping else Failure(ENDED, 503)
            for seq in [*self.running.values(), *self.queue, *self.incoming]:
                self.outbox.post(seq.submission, ending)
            self.outbox.flush()

    def recover(self) -> None:
        """Fail what the broken iteration was working on; if that breaks too, forget every
        running sequence (their requests still get their error) so the engine goes on."""
        try:
            self.fail_current()
        except Exception:
            log.exception("engine recovery failed: resetting the batch")
            for seq in self.running.values():
                self.outbox.post(seq.submission, Failure(FAILED))
            self.running.clear()
            self.free_slots = list(range(self.max_batch))  # sorted: a valid heap
            self.admitting = None

    def fail_current(self) -> None:
        """Fail the sequences an iteration was working on when it broke."""
        broken = list(self.running.values())
        if self.admitting is not None and self.admitting in self.queue:
            self.queue.remove(self.admitting)
            self.queued = len(self.queue)
            broken.append(self.admitting)
        self.admitting = None
        for seq in broken:
            self.fail(seq, FAILED)

    def wait_for_work(self) -> bool:
        with self.lock:
            while not (self.incoming or self.queue or self.running or self.stopping):
                self.lock.wait()
            self.queue += self.incoming
            self.incoming.clear()
            self.queued = len(self.queue)
            return not self.stopping

    def iterate(self) -> None:
        self.drop_cancelled()
        self.admit()
        next_ids = self.sample() if self.running else {}
        if next_ids:
            self.decoder.append(next_ids)
        self.metrics.queue_depth.set(self.queued + len(self.incoming))
        self.metrics.running.set(len(self.running))

    def drop_cancelled(self) -> None:
        """Sequences whose client went away leave the queue and the batch."""
        if any(seq.submission.cancelled for seq in self.queue):
            self.queue = deque(seq for seq in self.queue if not seq.submission.cancelled)
            self.queued = len(self.queue)
        for seq in list(self.running.values()):
            if seq.submission.cancelled:
                self.release(seq)

    def admit(self) -> None:
        """Start queued sequences while slots are free, reading at most about one block of
        prompt positions per iteration (at least one sequence), so running ones keep going.
        `admitting` names the sequence being started while it is: a sequence left waiting for a
        slot is no part of a step that breaks."""
        budget = self.model.context_length
        while self.queue and budget > 0:
            seq = self.admitting = self.queue[0]
            if seq.prompt.score is not None and not seq.prompt.score.done:
                budget -= seq.prompt.score.run(self.model, budget)
                continue
            if seq.config.max_new_tokens > 0 and not self.free_slots:
                break
            self.queue.popleft()
            self.queued = len(self.queue)
            budget -= self.begin(seq)
        self.admitting = None

    def begin(self, seq: Sequence) -> int:
        """Echo the prompt, then start generating (unless max_tokens is 0); return the number of
        positions read."""
        job, prompt = seq.submission.job, seq.prompt
        if job.echo:
            entries = prompt.score.entries if prompt.score is not None else None
            seq.submission.post(Piece(seq.choice, prompt.text, entries))
        seq.last_time = seq.submission.arrived
        if job.config.max_new_tokens == 0:
            seq.submission.post(Finish(seq.choice, "length", 0))
            return 1
        seq.slot = heapq.heappop(self.free_slots)
        self.running[seq.slot] = seq
        self.decoder.start(seq.slot, prompt.ids)
        return min(len(prompt.ids), self.model.context_length)

    def sample(self) -> dict[int, int]:
        """Every running sequence samples its next character; return those that go on."""
        groups: dict[Controls, list[Sequence]] = {}
        for seq in self.running.values():
            c = seq.config
            groups.setdefault(Controls(c.temperature, c.top_k, c.top_p), []).append(seq)
        self.metrics.batch_size.observe(len(self.running))
        next_ids = {}
        for controls, seqs in groups.items():
            slots = [seq.slot for seq in seqs]
            chosen = self.decoder.choose(slots, controls, [seq.generator for seq in seqs])
            log_probs = None
            if any(seq.submission.job.logprobs is not None for seq in seqs):
                # (R, V): the model's own distribution, for `logprobs`
                log_probs = F.log_softmax(self.decoder.logits(slots).float(), dim=-1)
            for i, (seq, token) in enumerate(zip(seqs, chosen[:, 0].tolist(), strict=True)):
                if self.emit(seq, token, None if log_probs is None else log_probs[i : i + 1]):
                    next_ids[seq.slot] = token
        return next_ids

    def emit(self, seq: Sequence, token: int, log_probs: torch.Tensor | None) -> bool:
        """Pass one sampled character on (`log_probs`: its (1, V) distribution, unchanged by
        temperature or filters, where the request asked for `logprobs`); return whether the
        sequence goes on."""
        now = time.monotonic()
        if seq.produced == 0:
            self.metrics.time_to_first_character.observe(now - seq.last_time)
        else:
            self.metrics.character_latency.observe(now - seq.last_time)
        self.metrics.characters.inc()
        seq.last_time = now
        job = seq.submission.job
        if job.logprobs is not None and log_probs is not None:
            offset = len(seq.prompt.ids) + seq.produced  # counted from the prompt's start
            itos = self.tokenizer.itos
            seq.held += token_logprobs(log_probs, [token], job.logprobs, itos, offset)
        seq.produced += 1
        text = seq.stop.feed(self.tokenizer.itos[token])
        reason = "stop" if seq.stop.done else None
        if reason is None and seq.produced == job.config.max_new_tokens:
            text, reason = text + seq.stop.flush(), "length"
        entries = None
        if job.logprobs is not None:
            entries, seq.held = seq.held[: len(text)], seq.held[len(text) :]
        if text:
            self.outbox.post(seq.submission, Piece(seq.choice, text, entries))
        if reason is None:
            return True
        self.outbox.post(seq.submission, Finish(seq.choice, reason, seq.produced))
        self.release(seq)
        return False

    def release(self, seq: Sequence) -> None:
        """Take a sequence out of the batch (nothing if it is not in it); its slot is free
        before the decoder forgets it, so that a failing `free` loses no slot."""
        if self.running.get(seq.slot) is not seq:
            return
        del self.running[seq.slot]
        heapq.heappush(self.free_slots, seq.slot)
        self.decoder.free(seq.slot)

    def fail(self, seq: Sequence, message: str) -> None:
        """Its request gets the error first, then the sequence (and its request's others, at the
        next step) leaves."""
        self.outbox.post(seq.submission, Failure(message))
        seq.submission.cancel()
        self.release(seq)
