"""Which webhook targets Antidote may call (no SSRF): the operator's host allowlist and, after DNS resolution,
the address itself. Shared by the API (host check at submission) and the worker (every hop)."""

from __future__ import annotations

import ipaddress
import socket
import threading
from fnmatch import fnmatchcase

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# cloud metadata services: refused even with ANTIDOTE_WEBHOOK_ALLOW_PRIVATE, nobody needs a webhook there
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "169.254.169.253", "100.100.100.200", "fd00:ec2::254", "fd00:ec2::23",
))


class TargetRefused(Exception):
    """A webhook target the policy does not allow; the message says which rule."""


def host_allowed(host: str, patterns: list[str]) -> bool:
    """True when ``host`` matches one of the operator's names or fnmatch patterns (case-insensitive)."""
    host = host.lower().rstrip(".")
    return any(fnmatchcase(host, p) for p in patterns)


def check_host(host: str, patterns: list[str]) -> None:
    if not patterns:
        raise TargetRefused("webhooks are disabled on this server (ANTIDOTE_WEBHOOK_ALLOWED_HOSTS is empty)")
    if not host_allowed(host, patterns):
        raise TargetRefused(f"host {host!r} is not in ANTIDOTE_WEBHOOK_ALLOWED_HOSTS")
    try:  # what the resolver and the Host header do with it; an empty or 64-character label fails there
        host.encode("idna")
    except UnicodeError as exc:
        raise TargetRefused(f"host {host!r} is not a valid DNS name (a label is empty or over 63 "
                            "characters)") from exc


def check_address(ip: IPAddress, allow_private: bool) -> None:
    """Refuse metadata addresses always, and the non-public ranges unless the operator allowed them."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:  # ::ffff:127.0.0.1 is 127.0.0.1
        ip = mapped
    if ip in METADATA_ADDRESSES:
        raise TargetRefused(f"address {ip} is a cloud metadata service")
    if allow_private:
        return
    if (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global):
        raise TargetRefused(f"address {ip} is not public (loopback, private, link-local, multicast or "
                            "reserved); set ANTIDOTE_WEBHOOK_ALLOW_PRIVATE=true to allow it")


def _lookup(host: str, port: int, timeout_s: float | None) -> list:
    """``socket.getaddrinfo`` within ``timeout_s`` (``None``: the resolver's own, which can be tens of seconds per
    name: a receiver's slow DNS would hold the worker past ANTIDOTE_WEBHOOK_TIMEOUT_S). The lookup runs in a
    daemon thread, left to the resolver's own timeout once abandoned; ``TimeoutError`` (an ``OSError``) past it."""
    if timeout_s is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread as it is
            box["error"] = exc

    thread = threading.Thread(target=run, name="webhook-dns", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"resolving {host!r} took more than {timeout_s:g} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["infos"]  # type: ignore[return-value]


def resolve_checked(host: str, port: int, allow_private: bool, timeout_s: float | None = None) -> IPAddress:
    """Resolve once (within ``timeout_s``) and return the first address that passes; the caller connects to
    exactly that address (no second lookup a DNS rebinding could answer differently). Refused if any answer is
    refused, since a name that also points inside is a probe."""
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        check_address(literal, allow_private)
        return literal
    try:
        infos = _lookup(host, port, timeout_s)
    except socket.gaierror as exc:
        raise OSError(f"cannot resolve {host!r}: {exc.strerror}") from exc
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]
    if not addresses:
        raise OSError(f"{host!r} has no address")
    for ip in addresses:
        check_address(ip, allow_private)
    return addresses[0]
