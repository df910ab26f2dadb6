"""Who may read and change through the page: pure functions of a request's headers, used by the
app's middleware and tested without a server."""

from __future__ import annotations

import hmac
import ipaddress

MAX_BODY = 65536  # bytes of an admin action's JSON

# Every answer carries these: the page loads only its own files, never frames, never sniffs types.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def loopback(host: str) -> bool:
    """True for exactly "localhost" and loopback addresses (127.0.0.0/8, ::1): no other name, so a
    page whose name merely starts like one (127.0.0.1.attacker.example) is not served."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str | None:
    """The name in a Host header without its port ("[::1]:8787" -> "::1"); None when malformed."""
    header = header.strip()
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1 :] if end > 0 else "?"
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return header[1:end]
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    return name


def local_host(header: str | None) -> bool:
    """On loopback, a page of another site that rebinds its name to 127.0.0.1 sends its own name as
    Host: only loopback names are served."""
    name = host_name(header or "")
    return name is not None and loopback(name)


def authorized(token: str | None, header: str | None) -> bool:
    """The Authorization header carries the token (compared in constant time)."""
    if token is None or header is None or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer ") :].encode(), token.encode())


def body_length(header: str | None) -> int | None:
    """The declared length of an admin action's body, from 0 to MAX_BODY; None when it is not a
    plain number of bytes in that range."""
    declared = (header or "0").strip()
    if not declared.isascii() or not declared.isdigit() or int(declared) > MAX_BODY:
        return None
    return int(declared)
