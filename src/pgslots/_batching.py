"""Batching, for both faces: the acquires (and releases) that one process sends while a call of the
same kind is on its way are gathered and sent as one call (``acquire_each``, ``release_each``),
decided in one transaction in the order they were asked. A lone request is sent as it is, from its
caller, so an uncontended caller pays nothing for this; under load, one round trip and one commit
serve many callers. Each caller still gets its own answer: its own lease and fencing token, its own
refusal and queue place, or its own error (a batch the database refuses as a whole is sent again
one request at a time, so that each error reaches the caller that caused it).

The async face gathers the tasks of one event loop (:class:`Batcher`, a sender task per kind); the
sync face the threads of one process (:class:`ThreadBatcher`, a sender thread per kind, which ends
when idle). A caller that gives up while its request is on its way (a cancelled task, an
interrupted thread) has run its clean-up before the answer was committed: that answer is given
back in the background (:func:`give_back`)."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Coroutine
from typing import Any

from . import _queries as q
from ._connections import Connections, process_id
from ._flow import BACKGROUND_WAIT_SECONDS, release_params
from .errors import DatabaseUnavailableError, PgSlotsError

_KINDS = {id(q.ACQUIRE): "acquire", id(q.RELEASE_FAST): "release"}
_ONE = {"acquire": q.ACQUIRE, "release": q.RELEASE_FAST}
Rows = list[dict[str, Any]]
# Per event loop, per client's connections: its batcher.
_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, Batcher]] = weakref.WeakKeyDictionary()
# Per client's connections: the batcher of this process's threads.
_THREAD_BATCHERS: weakref.WeakKeyDictionary[Connections, ThreadBatcher] = weakref.WeakKeyDictionary()
_THREAD_BATCHERS_LOCK = threading.Lock()
SENDER_IDLE_SECONDS = 1.0  # a sender thread with nothing to send for this long ends (and starts again when needed)


def _behind(kind: str, timeout: float) -> DatabaseUnavailableError:
    """A request that waited its whole timeout behind this process's call of the same kind (blocked on
    a lock, say): busy, not down, as when no pooled connection is free in time."""
    return DatabaseUnavailableError(
        f"Waited {timeout:.3g} s behind this process's {kind} on its way to the database (another session may "
        "hold a lock it waits for): nothing was changed. Try again, or look for long transactions in pg_stat_activity.",
        pool_exhausted=True,
        answered=True,
    )


def batchable(query: Any) -> bool:
    return id(query) in _KINDS


def _json(key: str, value: Any) -> Any:
    if key == "holder" and isinstance(value, str):
        return json.loads(value)  # JSON text, as the lone statement sends it
    return str(value) if isinstance(value, uuid.UUID) else value


def _least(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return min(known) if known else None


def batch_call(kind: str, requests: list[tuple[dict[str, Any], float | None]]) -> tuple[Any, dict[str, Any], float | None]:
    """The one statement that carries several requests of a kind: (query, params, timeout). Its lock
    waits and its wait for a pooled connection are those of its most hurried request."""
    timeout = _least([t for _, t in requests])
    wait = _least([p.get("wait_seconds") for p, _ in requests])
    if kind == "acquire":
        each = [{k: _json(k, v) for k, v in p.items() if k != "wait_seconds"} for p, _ in requests]
        return q.ACQUIRE_EACH, {"requests": json.dumps(each), "wait_seconds": wait}, timeout
    return q.RELEASE_EACH, {"lease_ids": [p["lease_id"] for p, _ in requests], "wait_seconds": wait}, timeout


def batch_answers(kind: str, rows: Rows) -> list[Rows]:
    """A batch's rows, one answer per request in the order they were sent, each as its lone call answers."""
    if kind == "acquire":
        return [[row] for row in rows]
    return [[{"release": row["released"]}] for row in rows]


def give_back(db: Connections, kind: str, params: dict[str, Any], rows: Rows) -> None:
    """The answer of a request whose caller gave up while it was on its way: a grant is released,
    and a queue place left and then the lease it named released (in that order, so that no release
    can hand it over after it was let go), all in the background."""
    row = rows[0] if rows else {}
    if kind != "acquire":
        return
    if row.get("granted") and row.get("lease_id") is not None:
        db.engine.later(q.RELEASE, release_params(row["lease_id"]))
    elif row.get("waiter") is not None and params.get("queue_client") is not None:
        leave = {"ticket": row["waiter"], "queue_client": params["queue_client"], "wait_seconds": BACKGROUND_WAIT_SECONDS}
        db.engine.later(q.LEAVE_QUEUE, leave)
        if params.get("new_lease_id") is not None:
            db.engine.later(q.RELEASE, release_params(params["new_lease_id"]))


# ---- the async face: the tasks of one event loop ------------------------------------------------


def batcher(db: Connections) -> Batcher:
    loop = asyncio.get_running_loop()
    per_loop = _BATCHERS.get(loop)
    if per_loop is None:  # (setdefault would make a weak reference with a callback at every call)
        per_loop = _BATCHERS.setdefault(loop, {})
    found = per_loop.get(id(db))
    if found is None or found.db is not db:
        found = per_loop[id(db)] = Batcher(db)
    return found


class Batcher:
    """Gathers one loop's requests of each kind while a batch of that kind is on its way."""

    def __init__(self, db: Connections) -> None:
        self.db = db
        self._pending: dict[str, list[tuple[dict[str, Any], float | None, asyncio.Future[Rows]]]] = {}
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._stopping = False
        self._direct: set[str] = set()

    async def call(self, query: Any, params: dict[str, Any], timeout: float | None) -> Rows:
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
        answer: asyncio.Future[Rows] = loop.create_future()
        self._pending.setdefault(kind, []).append((params, timeout, answer))
        if timeout is None:
            return await answer
        try:
            # Past its timeout the request is let go: dropped if not sent yet, its answer given back if it was.
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            raise _behind(kind, timeout) from None

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

    async def _finish(self, call: Coroutine[Any, Any, Rows]) -> Rows:
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

    async def _one(self, kind: str, params: dict[str, Any], timeout: float | None, answer: asyncio.Future[Rows]) -> None:
        try:
            rows = await self._finish(self.db.acall(_ONE[kind], params, timeout=timeout))
        except Exception as error:  # noqa: BLE001 - handed to the task that asked
            if not answer.done():
                answer.set_exception(error)
            return
        self._answer(kind, params, answer, rows)

    def _answer(self, kind: str, params: dict[str, Any], answer: asyncio.Future[Rows], rows: Rows) -> None:
        if not answer.done():
            answer.set_result(rows)
        else:  # cancelled while on its way: its clean-up has run already
            give_back(self.db, kind, params, rows)

    async def _many(self, kind: str, batch: list[tuple[dict[str, Any], float | None, asyncio.Future[Rows]]]) -> None:
        query, params, timeout = batch_call(kind, [(p, t) for p, t, _ in batch])
        try:
            answers = batch_answers(kind, await self._finish(self.db.acall(query, params, timeout=timeout)))
        except PgSlotsError:
            for request in batch:  # one at a time, in order: each error reaches its own task
                await self._one(kind, *request)
            return
        for (asked, _, answer), rows_of_one in zip(batch, answers, strict=True):
            self._answer(kind, asked, answer, rows_of_one)


# ---- the sync face: the threads of one process --------------------------------------------------


def thread_batcher(db: Connections) -> ThreadBatcher:
    found = _THREAD_BATCHERS.get(db)
    if found is not None and found.pid == process_id():
        return found  # the hot path: no lock
    with _THREAD_BATCHERS_LOCK:
        found = _THREAD_BATCHERS.get(db)
        if found is None or found.pid != process_id():  # a forked child starts afresh: its parent's senders did not survive
            found = _THREAD_BATCHERS[db] = ThreadBatcher(db)
        return found


class _Request:
    """One thread's request on its way in a batch. Its thread waits on `signal`, a lock held until the
    answer (rows or error) is in; both ends look at it under the batcher's lock."""

    __slots__ = ("error", "gave_up", "params", "rows", "signal", "timeout")

    def __init__(self, params: dict[str, Any], timeout: float | None) -> None:
        self.params = params
        self.timeout = timeout
        self.rows: Rows | None = None
        self.error: BaseException | None = None
        self.gave_up = False
        self.signal = threading.Lock()
        self.signal.acquire()


class ThreadBatcher:
    """Gathers the requests of this process's threads of each kind while a call of that kind is on its
    way, and sends them from a sender thread of that kind: a thread interrupted while it waits
    (Ctrl-C, a lost lease) leaves its answer to the sender, which gives it back.

    An interruption is an exception raised into a thread wherever it is, even half-way through a
    lock's Python code: so the waits here are on plain locks and queues, whose operations are single
    C calls, and a `with` on a plain lock releases it whatever is raised in its block."""

    WAIT_STEP_SECONDS = 0.2  # a waiting thread looks up this often, so an interruption reaches it

    def __init__(self, db: Connections) -> None:
        # Held weakly: the registry (_THREAD_BATCHERS) keys each batcher by its client's connections,
        # weakly; a batcher holding them strongly would keep both alive for ever.
        self._db = weakref.ref(db)
        self.pid = process_id()
        self._lock = threading.Lock()
        self._pending: dict[str, list[_Request]] = {}
        # Kinds with a call on its way, and the thread sending it (the sender's, or a caller's own).
        self._busy: dict[str, int] = {}
        self._wake: dict[str, queue.SimpleQueue[None]] = {}  # kinds with a sender thread: how to wake it

    @property
    def db(self) -> Connections:
        db = self._db()
        if db is None:  # a caller holds its client's connections until its answer is in
            raise RuntimeError("pgslots: the client of this batch is gone.")
        return db

    def call(self, query: Any, params: dict[str, Any], timeout: float | None) -> Rows:
        kind = _KINDS[id(query)]
        me = threading.get_ident()
        request: _Request | None = None
        try:
            with self._lock:
                if kind not in self._busy and not self._pending.get(kind):
                    self._busy[kind] = me  # nothing of this kind on its way: sent at once, by this thread
                else:
                    request = _Request(params, timeout)
                    self._pending.setdefault(kind, []).append(request)
            if request is None:
                return self.db.call(query, params, timeout=timeout)
            self._sender(kind).put(None)
            give_up_at = None if timeout is None else time.monotonic() + timeout
            while not request.signal.acquire(timeout=self.WAIT_STEP_SECONDS if timeout is None else min(self.WAIT_STEP_SECONDS, timeout)):
                if give_up_at is not None and time.monotonic() >= give_up_at:
                    # Let go: dropped if not sent yet, its answer given back if it was (below).
                    raise _behind(kind, timeout or 0.0)
        except BaseException:
            if request is not None:
                with self._lock:
                    request.gave_up = True
                    rows = request.rows
                if rows is not None:
                    give_back(self.db, kind, request.params, rows)  # answered as it was interrupted
            raise
        finally:
            self._done(kind, me)
        if request.error is not None:
            raise request.error
        assert request.rows is not None
        return request.rows

    def _done(self, kind: str, sender: int) -> None:
        """After a call of `kind` from thread `sender` (if it sent one): the next batch may go."""
        with self._lock:
            if self._busy.get(kind) != sender:
                return
            del self._busy[kind]
            wake = self._wake.get(kind) if self._pending.get(kind) else None
        if wake is not None:
            wake.put(None)

    def _sender(self, kind: str) -> queue.SimpleQueue[None]:
        """The wake-up queue of this kind's sender thread, started if there is none."""
        with self._lock:
            wake = self._wake.get(kind)
            if wake is None:
                wake = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(kind, wake), name=f"pgslots-batch-{kind}", daemon=True).start()
                self._wake[kind] = wake  # once started: an interrupted start leaves none behind
        return wake

    def _serve(self, kind: str, wake: queue.SimpleQueue[None]) -> None:
        me = threading.get_ident()
        while True:
            with self._lock:
                batch = None
                if kind not in self._busy and self._pending.get(kind):
                    batch = [r for r in self._pending.pop(kind) if not r.gave_up]
                    self._busy[kind] = me
            if batch is None:
                try:
                    wake.get(timeout=SENDER_IDLE_SECONDS)
                except queue.Empty:
                    with self._lock:
                        if not self._pending.get(kind):  # idle: this sender ends, the next request starts another
                            if self._wake.get(kind) is wake:
                                del self._wake[kind]
                            return
                continue
            try:
                if len(batch) == 1:
                    self._one(kind, batch[0])
                elif batch:
                    self._many(kind, batch)
            finally:
                with self._lock:
                    del self._busy[kind]

    def _one(self, kind: str, request: _Request) -> None:
        try:
            rows = self.db.call(_ONE[kind], request.params, timeout=request.timeout)
        except Exception as error:  # noqa: BLE001 - handed to the thread that asked
            self._answer(kind, request, None, error)
            return
        self._answer(kind, request, rows, None)

    def _many(self, kind: str, batch: list[_Request]) -> None:
        query, params, timeout = batch_call(kind, [(r.params, r.timeout) for r in batch])
        try:
            answers = batch_answers(kind, self.db.call(query, params, timeout=timeout))
        except PgSlotsError:
            for request in batch:  # one at a time, in order: each error reaches its own thread
                self._one(kind, request)
            return
        for request, rows in zip(batch, answers, strict=True):
            self._answer(kind, request, rows, None)

    def _answer(self, kind: str, request: _Request, rows: Rows | None, error: BaseException | None) -> None:
        with self._lock:
            gave_up = request.gave_up
            request.rows, request.error = rows, error
        request.signal.release()
        if gave_up and rows is not None:
            give_back(self.db, kind, request.params, rows)
