"""A FastAPI app under pgslots' dependencies and middleware, for the integration's tests (served by
uvicorn in a subprocess; the database is PGSLOTS_DSN)."""

from __future__ import annotations

import asyncio

from fastapi import Depends, FastAPI

import pgslots
from pgslots.fastapi import Concurrency, LimitMiddleware, RateLimit, client_address, header, path_param

app = FastAPI()
app.add_middleware(LimitMiddleware, limit="address:*", key=client_address(), paths=["/mw/"])

per_tenant = RateLimit("tenant:*", key=header("X-Tenant"))
patient = RateLimit("patient", wait_seconds=3)
per_user = RateLimit("user:*", key=path_param("user"))
reports = Concurrency("reports")


@app.get("/search", dependencies=[Depends(per_tenant)])
async def search() -> dict[str, bool]:
    return {"ok": True}


@app.get("/patient", dependencies=[Depends(patient)])
async def wait_then_answer() -> dict[str, bool]:
    return {"ok": True}


@app.get("/users/{user}/items", dependencies=[Depends(per_user)])
async def items(user: str) -> dict[str, str]:
    return {"user": user}


@app.get("/report", dependencies=[Depends(reports)])
async def report() -> dict[str, bool]:
    await asyncio.sleep(0.5)
    return {"ok": True}


@app.get("/mw/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


@app.get("/free")
async def free() -> dict[str, bool]:
    return {"ok": True}


# A database that is not there: refusals must not be made up; fail_open decides.
_DEAD = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=1"
_closed = pgslots.Client(_DEAD, fail_open_after_seconds=0.2)
_opened = pgslots.Client(_DEAD, fail_open=True, fail_open_after_seconds=0.2)


@app.get("/dead/closed", dependencies=[Depends(RateLimit("api", client=_closed))])
async def closed() -> dict[str, bool]:
    return {"ok": True}


@app.get("/dead/open", dependencies=[Depends(RateLimit("api", client=_opened))])
async def opened() -> dict[str, bool]:
    return {"ok": True}
