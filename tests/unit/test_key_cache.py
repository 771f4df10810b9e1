"""The API key cache's hit path (a dict lookup on the event loop), its TTL and its bound."""

from __future__ import annotations

import time

import pytest

from api.deps import KeyCache
from store.models import Tenant


def test_a_remembered_key_expires_after_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    cache, tenant = KeyCache(ttl_s=30), Tenant(id="t1", name="one")
    assert cache.get("digest") is None
    cache.put("digest", tenant)
    now[0] += 29
    assert cache.get("digest") is tenant
    now[0] += 2
    assert cache.get("digest") is None


def test_ttl_zero_remembers_nothing() -> None:
    cache = KeyCache(ttl_s=0)
    cache.put("digest", Tenant(id="t1", name="one"))
    assert cache.get("digest") is None


def test_the_cache_stays_bounded() -> None:
    cache = KeyCache(ttl_s=30, max_entries=3)
    for i in range(10):
        cache.put(f"d{i}", Tenant(id=f"t{i}", name=f"n{i}"))
    assert len(cache._entries) <= 3 and cache.get("d9") is not None
