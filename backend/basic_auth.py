"""HTTP basic auth for the routes Label Studio calls (BASIC_AUTH_USER / BASIC_AUTH_PASS).

Label Studio sends `Authorization: Basic <base64(user:pass)>` when the model's "Basic auth"
fields are filled in. The check never short-circuits: both the user and the password are
compared, each as a SHA-256 digest with `hmac.compare_digest`, so neither the content nor the
length of either leaks through the answer's timing. Nothing here logs; callers must not log the
header either.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

REALM = "pupil-backend"
CHALLENGE = f'Basic realm="{REALM}"'


def credentials_match(header: str | None, user: str, password: str) -> bool:
    """Whether an Authorization header carries exactly `user` and `password` (constant time)."""
    given_user, given_password = _basic_credentials(header)
    user_ok = _same(given_user, user.encode("utf-8"))
    password_ok = _same(given_password, password.encode("utf-8"))
    return user_ok & password_ok  # both evaluated, always


def _basic_credentials(header: str | None) -> tuple[bytes, bytes]:
    """(user, password) bytes from a Basic header; empty for a missing or malformed one."""
    if not header:
        return b"", b""
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return b"", b""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return b"", b""
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else (b"", b"")


def _same(given: bytes, expected: bytes) -> bool:
    return hmac.compare_digest(hashlib.sha256(given).digest(), hashlib.sha256(expected).digest())
