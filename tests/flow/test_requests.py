"""Checked requests and lease ids, which every acquire makes: a program asks with the same arguments
again and again, so a checked request is kept and reused; lease ids come from the operating system's
random bytes, many at a time. Both must stay right across a fork: a child names itself as the holder
and never names a lease as its parent does. No database: these run in milliseconds."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from pgslots import _flow as flows
from pgslots._connections import process_id
from pgslots._flow import Request, new_lease_id
from pgslots.errors import InvalidArgumentError


def _in_child(work: Callable[[], Any]) -> Any:
    """Runs `work` in a forked child and returns what it returned (as JSON)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: answer, then leave without running the parent's clean-up
        try:
            os.write(write, json.dumps(work()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        text = answer.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def test_the_same_arguments_give_the_same_checked_request() -> None:
    first = Request.for_concurrency("reused", slots=2, timeout_seconds=5)
    assert Request.for_concurrency("reused", slots=2, timeout_seconds=5) is first
    assert Request.for_concurrency("reused", slots=3, timeout_seconds=5) is not first
    assert Request.for_rate_limit("reused", slots=2, timeout_seconds=5) is Request.for_rate_limit("reused", slots=2, timeout_seconds=5)
    assert Request.for_rate_limit("reused", slots=2) is not Request.for_rate_limit("reused", slots=2, reserve=True)
    # A list of names and a holder dict cannot be keys (and could change): checked afresh, each time.
    listed = Request.for_concurrency(["reused"], slots=2, timeout_seconds=5)
    assert listed == first and listed is not Request.for_concurrency(["reused"], slots=2, timeout_seconds=5)
    holder = {"worker": "7"}
    held = Request.for_concurrency("reused", slots=1, holder=holder)
    assert held is not None and held is not Request.for_concurrency("reused", slots=1, holder=holder)
    assert Request.for_concurrency(None, slots=1) is None


@pytest.mark.parametrize(
    ("taken", "refused"),
    [
        ({"slots": 1}, {"slots": True}),
        ({"slots": 1}, {"slots": 1.0}),
        ({"slots": 1, "timeout_seconds": 1}, {"slots": 1, "timeout_seconds": True}),
        ({"slots": 1, "priority": 1}, {"slots": 1, "priority": True}),
        ({"slots": 1, "fail_open": True}, {"slots": 1, "fail_open": 1}),
        ({"slots": 1, "max_retries": 1}, {"slots": 1, "max_retries": True}),
    ],
)
def test_an_argument_the_checks_refuse_is_refused_after_an_equal_one_was_taken(taken: dict[str, Any], refused: dict[str, Any]) -> None:
    # True == 1 and 1.0 == 1 in Python: a request kept under the one must not answer for the other.
    assert Request.for_concurrency("typed", **taken) is not None
    with pytest.raises(InvalidArgumentError) as caught:
        Request.for_concurrency("typed", **refused)
    assert caught.value.__context__ is None  # raised as the checks raise it, not inside the lookup's KeyError
    with pytest.raises(InvalidArgumentError):
        Request.for_concurrency("typed", **refused)  # and again: a refusal is never kept
    if "max_retries" not in taken:
        assert Request.for_rate_limit("typed", **taken) is not None
        with pytest.raises(InvalidArgumentError):
            Request.for_rate_limit("typed", **refused)


def test_the_kept_requests_stay_bounded() -> None:
    for i in range(3 * flows._MAX_REQUESTS):
        Request.for_concurrency(f"tenant:{i}", slots=1)
    assert 0 < len(flows._REQUESTS) <= flows._MAX_REQUESTS


def test_a_forked_child_names_itself_as_the_holder() -> None:
    request = Request.for_concurrency("holder-after-fork", slots=1)
    assert request is not None and json.loads(request.holder_json)["pid"] == os.getpid()

    def child() -> dict[str, Any]:
        again = Request.for_concurrency("holder-after-fork", slots=1)
        assert again is not None
        return {"holder_pid": json.loads(again.holder_json)["pid"], "pid": os.getpid(), "process_id": process_id()}

    seen = _in_child(child)
    assert seen["holder_pid"] == seen["pid"] != os.getpid()
    assert seen["process_id"] == seen["pid"]  # the fork hook told the child its own id
    assert process_id() == os.getpid()


def test_lease_ids_are_random_uuid4s_never_repeated() -> None:
    ids = [new_lease_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {4} and {i.variant for i in ids} == {uuid.RFC_4122}


def test_a_forked_child_never_names_a_lease_as_its_parent_does() -> None:
    new_lease_id()  # the parent now has ids made and not used yet
    left_in_parent = len(flows._LEASE_IDS)
    assert left_in_parent > 0
    child_ids = set(_in_child(lambda: [str(new_lease_id()) for _ in range(left_in_parent)]))
    parent_ids = {str(new_lease_id()) for _ in range(left_in_parent)}
    assert len(child_ids) == left_in_parent and not child_ids & parent_ids
