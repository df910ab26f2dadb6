"""The page's history: a thread reads every limit every few seconds and keeps an hour of samples."""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

import pgslots
from pgslots.client import Client

from .views import Point, history_view

HISTORY_SECONDS = 3600.0


class Sampler:
    """Reads every limit every ``interval`` seconds (one overview, no keys, no holders) and keeps an
    hour of points per limit, from which the page draws its charts."""

    def __init__(self, client: Client, interval: float) -> None:
        self.client, self.interval = client, interval
        size = int(HISTORY_SECONDS / interval) + 1
        self.points: dict[str, collections.deque[Point]] = collections.defaultdict(lambda: collections.deque(maxlen=size))
        self.error: str | None = None
        self.started = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pgslots-ui-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
                self.error = None
            except pgslots.PgSlotsError as exc:
                self.error = str(exc)
            self._stop.wait(self.interval)

    def sample(self) -> None:
        now = time.time()
        limits = self.client.overview(busiest=0, holders=0).limits
        with self._lock:
            for info in limits:
                self.points[info.name].append(
                    Point(now, info.grants_total, info.refusals_total, info.wait_seconds_total, info.held_slots, info.waiters)
                )
            for gone in set(self.points) - {i.name for i in limits}:
                del self.points[gone]

    def history(self) -> dict[str, Any]:
        with self._lock:
            points = {name: list(samples) for name, samples in self.points.items()}
        return history_view(points, self.started, self.interval)
