from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("search", views.search),
    path("report", views.report),
    path("async-search", views.async_search),
]
