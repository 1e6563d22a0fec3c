"""A run's training time: the seconds spent in training steps over all the sessions of a run
(evaluations are not counted). A time budget (`max_time`) spends it: the cosine schedule then
follows the elapsed fraction of the budget, the last evaluation comes when the time is up, and
under torchrun the processes agree on the elapsed time (the largest of theirs) every
`log_interval` steps, so that they share the schedule and the last step."""

from __future__ import annotations

import time

import torch

from chargpt.training.distributed import World, all_reduce


class TrainingClock:
    """Training seconds so far (`train_time`), and the same as the processes agree on it
    (`elapsed`): under torchrun they take their largest every `agree_every` steps and keep it in
    between, so that they follow one schedule and stop at one step."""

    def __init__(self, world: World, limit: float, agree_every: int, tokens_per_step: int):
        self.world, self.limit, self.agree_every = world, limit, agree_every
        self.tokens_per_step = tokens_per_step
        self.train_time = 0.0  # up to the last `stop`
        self.elapsed = 0.0  # when the last step ended, agreed by the processes
        self.start()

    def start(self) -> None:
        """Count training seconds (and steps, for the throughput) from now."""
        self.window_start = self.window_end = time.perf_counter()
        self.window_steps = 0

    def stop(self) -> float:
        """Add the seconds from `start` to the end of the last step since to `train_time`;
        returns their tokens per second."""
        tokens_per_s = self.tokens_per_second()
        self.train_time += self.window_end - self.window_start
        return tokens_per_s

    def tokens_per_second(self) -> float:
        seconds = self.window_end - self.window_start
        return self.window_steps * self.tokens_per_step / seconds if self.window_steps else 0.0

    def step_done(self, step: int) -> None:
        """Count the step that just ended, and update `elapsed` (in one process, it is then the
        `train_time` that `stop` will add up, to the bit)."""
        self.window_steps += 1
        self.window_end = time.perf_counter()
        now = self.train_time + (self.window_end - self.window_start)
        if not self.world.distributed:
            self.elapsed = now
        elif step % self.agree_every == 0:
            self.elapsed = all_reduce(torch.tensor([now]), self.world, op="max").item()

    def charge(self, seconds: float) -> None:
        """Count `seconds` spent for training outside the steps (compiling the model)."""
        self.train_time += seconds
        self.elapsed += seconds

    def set(self, train_time: float) -> None:
        """Go on from a saved run's `train_time`."""
        self.train_time = self.elapsed = train_time

    @property
    def progress(self) -> float:
        """The elapsed fraction of the time budget."""
        return self.elapsed / self.limit

    def out_of_time(self) -> bool:
        return self.elapsed >= self.limit
