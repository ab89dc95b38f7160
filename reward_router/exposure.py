"""Safe-by-default checks that the gateway's and the RM services' settings share.

* :func:`placeholder_secret`: a key or password that is a known placeholder (``change-me``,
  ``changethis``, ``password``, ...). A default key is worse than no key: it looks configured
  while anyone who read the docs knows it, so the settings refuse it at start-up.
* :func:`is_loopback`: whether a bind address only this host can reach.
* :func:`redis_password`: the password inside a ``redis://user:password@host`` URL.

>>> placeholder_secret("Change_Me-too"), placeholder_secret("k-3f9c0a")
(True, False)
>>> is_loopback("127.0.0.1"), is_loopback("localhost"), is_loopback("0.0.0.0")
(True, True, False)
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

# Compared after lower-casing and dropping everything but letters and digits, so "Change_Me",
# "change-me" and "CHANGEME" are one value. The prefixes catch the numbered and suffixed
# variants docs and templates use ("change-me-too", "change-me-redis", "changethis123").
_PLACEHOLDER_PREFIXES = ("changeme", "changethis", "replaceme", "yourkey", "yourapikey")
_PLACEHOLDERS = frozenset(
    {"secret", "password", "passwd", "admin", "default", "placeholder", "example", "apikey"}
)


def placeholder_secret(value: str) -> bool:
    """True for a known placeholder (see the module docstring); the empty string is not one."""
    norm = re.sub(r"[^a-z0-9]", "", value.lower())
    return norm in _PLACEHOLDERS or norm.startswith(_PLACEHOLDER_PREFIXES)


def is_loopback(host: str) -> bool:
    """Loopback addresses (127.0.0.0/8, ::1) and ``localhost``; ``0.0.0.0``, ``::``, any other
    address or host name is reachable from elsewhere."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redis_password(url: str) -> str | None:
    """The password of a Redis URL (``redis://:pw@h:6379/0`` -> ``pw``), or None without one.

    >>> redis_password("redis://:s3cr3t@redis:6379/0"), redis_password("redis://h:6379")
    ('s3cr3t', None)
    """
    try:
        return urlsplit(url).password
    except ValueError:
        return None
