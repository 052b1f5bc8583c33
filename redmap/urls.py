"""URLs as shown to people: without their password. No redis import.

Used by the engine (its `url` attribute) and by the drivers' error translation.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["password_of", "safe_url"]


def safe_url(url: str) -> str:
    """`url` with any password replaced by `***`, for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc = parts.netloc
    if "@" in netloc:
        creds, _, host = netloc.rpartition("@")
        user = creds.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in creds else f"{creds}@{host}"
    query = parts.query
    if "password=" in query:
        query = "&".join(
            "password=***" if q.startswith("password=") else q for q in query.split("&")
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def password_of(url: str) -> str | None:
    """The password in `url` (netloc or `?password=`), to scrub it from error texts."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password:
        return parts.password
    for q in parts.query.split("&"):
        if q.startswith("password="):
            return q.split("=", 1)[1] or None
    return None
