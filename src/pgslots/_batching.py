"""Batching for the async face: the acquires (and releases) that an event loop's tasks send while a
batch of the same kind is on its way are gathered and sent as one call (``acquire_each``,
``release_each``), decided in one transaction in the order they were asked. A lone request is sent
as it is, so an uncontended task pays nothing for this; under load, one round trip and one commit
serve many tasks. Each task still gets its own answer: its own lease and fencing token, its own
refusal and queue place, or its own error (a batch the database refuses as a whole is sent again
one request at a time, so that each error reaches the task that caused it)."""

from __future__ import annotations

import asyncio
import json
import uuid
import weakref
from collections.abc import Coroutine
from typing import Any

from . import _queries as q
from ._connections import Connections
from ._flow import BACKGROUND_WAIT_SECONDS, release_params
from .errors import PgSlotsError

_KINDS = {id(q.ACQUIRE): "acquire", id(q.RELEASE_FAST): "release"}
# Per event loop, per client's connections: its batcher.
_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, Batcher]] = weakref.WeakKeyDictionary()


def batchable(query: Any) -> bool:
    return id(query) in _KINDS


def batcher(db: Connections) -> Batcher:
    loop = asyncio.get_running_loop()
    per_loop = _BATCHERS.setdefault(loop, {})
    found = per_loop.get(id(db))
    if found is None or found.db is not db:
        found = per_loop[id(db)] = Batcher(db)
    return found


def _json(value: Any) -> Any:
    return str(value) if isinstance(value, uuid.UUID) else value


def _least(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


class Batcher:
    """Gathers one loop's requests of each kind while a batch of that kind is on its way."""

    def __init__(self, db: Connections) -> None:
        self.db = db
        self._pending: dict[str, list[tuple[dict[str, Any], float | None, asyncio.Future[list[dict[str, Any]]]]]] = {}
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._direct: set[str] = set()

    async def call(self, query: Any, params: dict[str, Any], timeout: float | None) -> list[dict[str, Any]]:
        kind = _KINDS[id(query)]
        loop = asyncio.get_running_loop()
        if kind not in self._sending and kind not in self._direct:
            # Nothing of this kind on its way: sent at once, from the caller's own task (a lone
            # task pays nothing for batching); requests that come meanwhile wait for it, then go together.
            self._direct.add(kind)
            try:
                return await self.db.acall(query, params, timeout=timeout)
            finally:
                self._direct.discard(kind)
                if self._pending.get(kind) and kind not in self._sending:
                    self._sending[kind] = loop.create_task(self._send(kind))
        answer: asyncio.Future[list[dict[str, Any]]] = loop.create_future()
        self._pending.setdefault(kind, []).append((params, timeout, answer))
        return await answer

    async def _send(self, kind: str) -> None:
        try:
            while self._pending.get(kind) and not self._stopping:
                batch = self._pending.pop(kind)
                live = [(p, t, f) for p, t, f in batch if not f.done()]  # a cancelled task's request is dropped
                if len(live) == 1:
                    await self._one(kind, *live[0])
                elif live:
                    await self._many(kind, live)
        finally:
            del self._sending[kind]
            if self._stopping:  # cancelled: what was not sent is not sent
                for _, _, answer in self._pending.pop(kind, []):
                    answer.cancel()

    async def _finish(self, call: Coroutine[Any, Any, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """Awaits a call to its end even when the sender is cancelled (its loop shutting down, say):
        a call on its way may commit grants, and only its answer says which to give back. The
        sender then stops after this batch."""
        sent = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(sent)
        except asyncio.CancelledError:
            self._stopping = True
            await asyncio.wait([sent])
            return sent.result()

    async def _one(self, kind: str, params: dict[str, Any], timeout: float | None, answer: asyncio.Future[list[dict[str, Any]]]) -> None:
        query = q.ACQUIRE if kind == "acquire" else q.RELEASE_FAST
        try:
            rows = await self._finish(self.db.acall(query, params, timeout=timeout))
        except Exception as error:  # noqa: BLE001 - handed to the task that asked
            if not answer.done():
                answer.set_exception(error)
            return
        self._answer(kind, params, answer, rows)

    def _answer(self, kind: str, params: dict[str, Any], answer: asyncio.Future[list[dict[str, Any]]], rows: list[dict[str, Any]]) -> None:
        """Hands a request its rows. A task cancelled while its acquire was on its way has run its
        clean-up already, before this answer was committed: a grant is released here, and a queue
        place left and then the lease it named released (in that order, so that no release can hand
        it over after it was let go), all in the background."""
        if not answer.done():
            answer.set_result(rows)
            return
        row = rows[0] if rows else {}
        if kind != "acquire":
            return
        if row.get("granted") and row.get("lease_id") is not None:
            self.db.engine.later(q.RELEASE, release_params(row["lease_id"]))
        elif row.get("waiter") is not None and params.get("queue_client") is not None:
            leave = {"ticket": row["waiter"], "queue_client": params["queue_client"], "wait_seconds": BACKGROUND_WAIT_SECONDS}
            self.db.engine.later(q.LEAVE_QUEUE, leave)
            if params.get("new_lease_id") is not None:
                self.db.engine.later(q.RELEASE, release_params(params["new_lease_id"]))

    async def _many(self, kind: str, batch: list[tuple[dict[str, Any], float | None, asyncio.Future[list[dict[str, Any]]]]]) -> None:
        timeout = _least([t for _, t, _ in batch])
        wait = _least([p.get("wait_seconds") for p, _, _ in batch])
        try:
            if kind == "acquire":
                requests = [{k: _json(v) for k, v in p.items() if k != "wait_seconds"} for p, _, _ in batch]
                call = self.db.acall(q.ACQUIRE_EACH, {"requests": json.dumps(requests), "wait_seconds": wait}, timeout=timeout)
                rows = await self._finish(call)
                answers = [[row] for row in rows]
            else:
                ids = [p["lease_id"] for p, _, _ in batch]
                rows = await self._finish(self.db.acall(q.RELEASE_EACH, {"lease_ids": ids, "wait_seconds": wait}, timeout=timeout))
                answers = [[{"release": row["released"]}] for row in rows]
        except PgSlotsError:
            for request in batch:  # one at a time, in order: each error reaches its own task
                await self._one(kind, *request)
            return
        for (params, _, answer), rows_of_one in zip(batch, answers, strict=True):
            self._answer(kind, params, answer, rows_of_one)
