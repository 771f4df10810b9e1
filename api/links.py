"""Short-lived signed links to the HTML pages: a browser cannot send ``Authorization``, so a page URL carries
``?token=``, an HMAC-SHA256 over (tenant id, scope, expiry) where the scope is one scan id or ``"list"``."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from api.errors import ApiError
from store.settings import Settings

LIST_SCOPE = "list"
SECRET_FILE = "link_secret"
MAX_EXPIRY_DIGITS = 20  # a token's Unix-seconds expiry; more digits than any real one


def link_secret(settings: Settings) -> bytes:
    """``ANTIDOTE_LINK_SECRET``, or the embedded default's secret under data_dir (made once, mode 0600), so
    that links survive a restart and every API process of one data_dir shares it."""
    if settings.link_secret:
        return settings.link_secret.encode()
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # O_EXCL: two processes starting at once keep the first one's secret
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _mac(secret: bytes, tenant_id: str, scope: str, expires: int) -> str:
    message = f"{tenant_id}\n{scope}\n{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def sign(secret: bytes, tenant_id: str, scope: str, ttl_s: int, now: float | None = None) -> tuple[str, int]:
    """(token, expiry as Unix seconds) for ``scope`` of ``tenant_id``: ``<tenant>.<scope>.<expiry>.<mac>``. The
    scope is in the token so that an authentic token shown to another page is told apart from a forged one."""
    expires = int((time.time() if now is None else now) + ttl_s)
    return f"{tenant_id}.{scope}.{expires}.{_mac(secret, tenant_id, scope, expires)}", expires


def read_token(secret: bytes, token: str, now: float | None = None) -> tuple[str, str]:
    """(tenant id, scope) of an authentic, unexpired token; 401 otherwise (the reason is said)."""
    parts = token.split(".")
    # ASCII digits only, and few: str.isdigit() passes '²' and other digits int() refuses, and int() refuses more
    # than 4,300 digits; either raised ValueError, a 500
    if len(parts) != 4 or not (parts[2].isascii() and parts[2].isdigit() and len(parts[2]) <= MAX_EXPIRY_DIGITS):
        raise ApiError(401, "malformed link token", field="token")
    tenant_id, scope, expires_text, mac = parts
    expires = int(expires_text)
    if not hmac.compare_digest(mac, _mac(secret, tenant_id, scope, expires)):
        raise ApiError(401, "invalid link token (tampered with, or signed with another secret)", field="token")
    if expires < (time.time() if now is None else now):
        raise ApiError(401, "link token expired; ask for a new link (antidote open)", field="token")
    return tenant_id, scope


def verify(secret: bytes, token: str, scope: str, now: float | None = None) -> str:
    """The tenant id of an authentic, unexpired token for ``scope``; 401 otherwise. The pages answer a token
    for another scan as a missing scan instead (api/routes/pages.py)."""
    tenant_id, token_scope = read_token(secret, token, now)
    if not hmac.compare_digest(token_scope, scope):
        raise ApiError(401, "this link token is for another page", field="token")
    return tenant_id
