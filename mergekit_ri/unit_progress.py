"""A Ray merge's progress in bytes between finished units: each task reports the input bytes it
has merged so far to a small actor; the driver polls it and moves its bar as the tasks go, not
only when a unit ends (a 1 GiB unit can take a minute).

Only for units that take seconds (`FINE_PROGRESS`); smaller ones move the bar as each ends.
Apart from `distributed` (which imports torch) so that the actor's process imports nothing heavy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

REPORT_EVERY = 0.25  # seconds between a task's reports: a few small messages a second per task
# Units reading at least this much take seconds each: worth the actor, whose process costs ~1 s
# of a small cluster's CPU to start (a Ray merge of 16 small units: 0.4-0.5 s without, 1.3-2.4 s with)
FINE_PROGRESS = 512 * 2**20


class UnitProgress:
    """The actor: per unit, the most bytes any attempt reported (a retried task starts again from
    zero; the bar does not go back)."""

    def __init__(self) -> None:
        self._done: dict[int, int] = {}

    def report(self, unit: int, done: int) -> None:
        if done > self._done.get(unit, 0):
            self._done[unit] = done

    def snapshot(self) -> dict[int, int]:
        return dict(self._done)


class Reporter:
    """A task's side, called as `merge_tasks` advances: sends its running total (the first step
    at once, then at most every `REPORT_EVERY` seconds) without waiting for an answer."""

    def __init__(self, actor: Any, unit: int, every: float = REPORT_EVERY) -> None:
        self._actor, self._unit, self._every = actor, unit, every
        self._done, self._sent = 0, -float("inf")

    def __call__(self, nbytes: int) -> None:
        self._done += nbytes
        now = time.monotonic()
        if now - self._sent >= self._every:
            self._actor.report.remote(self._unit, self._done)
            self._sent = now


class Aggregate:
    """The driver's side: advances the bar by what the running tasks report (never past a unit's
    bytes) and, when a unit finishes, by the rest of it. `poll` never blocks."""

    def __init__(self, ray: Any, actor: Any, advance: Callable[[int], None], sizes: dict[int, int]) -> None:
        self._ray, self._actor, self._advance = ray, actor, advance
        self._sizes = dict(sizes)  # the units still running → their input bytes
        self._shown: dict[int, int] = {}
        self._asked: Any = None

    def poll(self) -> None:
        if self._actor is None:  # units too small to be worth it: the bar moves as each ends
            return
        if self._asked is None:
            self._asked = self._actor.snapshot.remote()
        ready, _ = self._ray.wait([self._asked], timeout=0)
        if not ready:
            return
        reported, self._asked = self._ray.get(ready[0]), None
        for unit, done in reported.items():
            if unit in self._sizes:
                step = min(done, self._sizes[unit]) - self._shown.get(unit, 0)
                if step > 0:
                    self._shown[unit] = self._shown.get(unit, 0) + step
                    self._advance(step)

    def finished(self, unit: int) -> None:
        self._advance(self._sizes.pop(unit) - self._shown.pop(unit, 0))
