"""Admission control and auth: a bound on generations running at once (the next one is refused
with 429 and Retry-After rather than queued), and the optional bearer token."""

from __future__ import annotations

import hmac
from contextlib import contextmanager

from router.errors import Overloaded, Unauthenticated


class Admission:
    def __init__(self, max_sessions: int, retry_after_s: int = 1) -> None:
        self.max_sessions = max_sessions
        self.retry_after_s = retry_after_s
        self.running = 0

    @contextmanager
    def slot(self):
        if self.running >= self.max_sessions:
            raise Overloaded(f"the router is running its maximum of {self.max_sessions} generations; retry later",
                             self.retry_after_s)
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1


def check_bearer(authorization: str | None, api_key: str) -> None:
    """Raise Unauthenticated unless `authorization` is 'Bearer <api_key>' (no key configured: no check)."""
    if not api_key:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise Unauthenticated("missing or invalid API key: send 'Authorization: Bearer <key>'")
