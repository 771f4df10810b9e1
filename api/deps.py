"""Dependencies shared by the routes: a database session and the tenant behind the API key."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.errors import DATABASE_DOWN_ERRORS, ApiError
from store import repository
from store.models import Tenant

log = logging.getLogger("antidote.api")


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request; closing it never fails the request (see ``close_quietly``)."""
    session = request.app.state.sessions()
    try:
        yield session
    finally:
        close_quietly(session)


def close_quietly(session: Session) -> None:
    """Close a session whose connection the database may have cut meanwhile (a restart or failover right after
    the answer was sent): the closing rollback then fails, SQLAlchemy has already dropped the dead connection
    from its pool, and raising now would only break an answer that has already started."""
    try:
        session.close()
    except DATABASE_DOWN_ERRORS:
        log.warning("database connection lost while closing a session")


def current_tenant(request: Request, session: Session = Depends(get_session)) -> Tenant:
    """The tenant of a valid ``Authorization: Bearer <key>``; 401 otherwise.

    Known keys are remembered for ``ANTIDOTE_KEY_CACHE_S`` seconds (a revoked key works that long at most);
    unknown ones are not, so a new key works at once."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = request.app.state.key_cache.get(key.strip(), lambda k: repository.tenant_for_key(session, k))
    if tenant is None:
        raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


class KeyCache:
    """A small TTL map from API key hash to its tenant: one database round trip fewer per request."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: dict[str, tuple[float, Tenant]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[str], Tenant | None]) -> Tenant | None:
        digest, now = repository.hash_key(key), time.monotonic()
        with self._lock:
            hit = self._entries.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        tenant = load(key)
        if tenant is not None and self.ttl_s > 0:
            with self._lock:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[digest] = (now + self.ttl_s, tenant)
        return tenant
