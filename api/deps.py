"""Dependencies shared by the routes: a database session and the tenant behind the API key."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from fastapi import Request
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


async def current_tenant(request: Request) -> Tenant:
    """The tenant of a valid ``Authorization: Bearer <key>``; 401 otherwise.

    Known keys are remembered for ``ANTIDOTE_KEY_CACHE_S`` seconds (a revoked key works that long at most);
    unknown ones are not, so a new key works at once. A hit costs a hash and a dict lookup on the event loop."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})
    state = request.app.state
    digest = repository.hash_key(key.strip())
    tenant = state.key_cache.get(digest)
    if tenant is None:
        tenant = await state.reads.tenant_for_key_hash(digest)
        if tenant is not None:
            state.key_cache.put(digest, tenant)
    if tenant is None:
        raise ApiError(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
    return tenant


class KeyCache:
    """A small TTL map from API key hash to its tenant: no database round trip for a known key.

    Used from the event loop only, so it needs no lock."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._entries: dict[str, tuple[float, Tenant]] = {}

    def get(self, digest: str) -> Tenant | None:
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        return None

    def put(self, digest: str, tenant: Tenant) -> None:
        if self.ttl_s <= 0:
            return
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl_s, tenant)
