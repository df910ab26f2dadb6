"""The live web page of the limits (``pgslots ui``) and ``pgslots metrics``.

``command`` holds the two commands; ``app`` the web app (a Starlette route table and the guard
every request passes); ``views`` the pure functions that build its JSON; ``sampler`` the history of
the charts; ``static/`` the page itself (HTML, CSS and JavaScript, shipped in the wheel)."""

from . import command  # noqa: F401 - adds its commands to cli
