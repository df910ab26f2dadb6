from __future__ import annotations

import asyncio
import time

from django.http import HttpRequest, JsonResponse

from pgslots.django import header, limit_view


@limit_view("tenant:*", key=header("X-Tenant"))
def search(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})


@limit_view("reports", concurrency=True)
def report(request: HttpRequest) -> JsonResponse:
    time.sleep(0.3)
    return JsonResponse({"ok": True})


@limit_view("tenant:*", key=header("X-Tenant"))
async def async_search(request: HttpRequest) -> JsonResponse:
    await asyncio.sleep(0)
    return JsonResponse({"ok": True})
