"""The Authorization header for requests to Label Studio, from LABEL_STUDIO_API_KEY.

Label Studio 1.23 accepts two kinds of key:

- a **legacy token** (40 hex characters), sent as `Authorization: Token <key>`; Label Studio
  refuses it (401) unless the organization has legacy tokens enabled;
- a **personal access token** (PAT): a JWT *refresh* token. It is exchanged for a short-lived
  access token (`POST /api/token/refresh/ {"refresh": PAT}` -> `{"access": JWT}`, about five
  minutes), which is sent as `Authorization: Bearer <access>`.

A key is a PAT when it decodes as a JWT. Its payload is only *decoded*, never verified: the
backend has no signing key and does not need one, it only reads `exp` to know when to refresh.
The access token is refreshed when it is within REFRESH_MARGIN_S of its `exp`, and after a 401
(Label Studio may revoke it early); refreshes are serialised by a lock so a burst of threads
causes one refresh, not one each.

Why not label-studio-sdk's `TokensClientExt` (tokens/client_ext.py), which does the same job:
it is reached only through private attributes (`client._client_wrapper._tokens_client`), it
refreshes only once the access token has already expired (so a token with one second left is
sent and fails), it has no refresh-on-401, and its refresh goes through the SDK's httpx client
whereas every other request here uses requests. A hundred lines of requests are easier to trust
than a private path that may move in the next SDK release.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import threading
import time
from collections.abc import Callable

import requests

log = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh/"
# Refresh this long before the access token's `exp`, so a request never carries a token that
# expires on the way.
REFRESH_MARGIN_S = 30.0
REFRESH_TIMEOUT = (5.0, 15.0)  # (connect, read) seconds

LEGACY = "legacy token"
PERSONAL = "personal access token"


class LabelStudioAuthError(RuntimeError):
    """The key cannot be turned into a header (refresh refused, Label Studio unreachable)."""


def jwt_claims(token: str) -> dict | None:
    """The payload of a JWT, decoded but NOT verified; None when `token` is not a JWT.

    Only used to tell a PAT from a legacy token and to read `exp`; nothing here trusts the
    claims for access decisions (Label Studio does the verifying).
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[1]:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
    except (ValueError, UnicodeError, binascii.Error):
        return None
    return claims if isinstance(claims, dict) else None


def key_kind(api_key: str) -> str:
    """LEGACY or PERSONAL for a LABEL_STUDIO_API_KEY value."""
    return PERSONAL if jwt_claims(api_key) is not None else LEGACY


class LabelStudioAuth:
    """Gives the Authorization header for Label Studio; thread-safe, one per process.

    `post` is the function that sends the refresh request (requests.post by default; tests may
    pass another); `clock` returns Unix seconds.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        post: Callable[..., requests.Response] = requests.post,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.kind = key_kind(api_key)
        self._api_key = api_key
        self._post = post
        self._clock = clock
        self._lock = threading.Lock()
        # (access token, its exp or None), replaced as one object so readers never mix two.
        self._access: tuple[str, float | None] | None = None
        if self.kind == PERSONAL:
            exp = _exp(jwt_claims(api_key))
            if exp is not None and exp <= clock():
                log.warning(
                    "LABEL_STUDIO_API_KEY is a personal access token that expired at %s: "
                    "downloads from Label Studio will fail until it is replaced",
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp)),
                )

    def header(self) -> str:
        """The Authorization header value to send now (refreshing a PAT's access if due)."""
        if self.kind == LEGACY:
            return f"Token {self._api_key}"
        access = self._access
        if self._due(access):
            with self._lock:
                if self._due(self._access):
                    self._access = self._refresh()
                access = self._access
        assert access is not None  # _refresh returns a token or raises
        return f"Bearer {access[0]}"

    def unauthorized(self, sent: str) -> bool:
        """Label Studio answered 401 to `sent`: drop that access token so the next header()
        refreshes it. True when a retry with a fresh header may succeed (PATs only)."""
        if self.kind == LEGACY:
            return False
        with self._lock:
            current = self._access
            if current is not None and sent == f"Bearer {current[0]}":  # not yet replaced
                self._access = None
        return True

    # -- internals

    def _due(self, access: tuple[str, float | None] | None) -> bool:
        """No access token yet, or one within REFRESH_MARGIN_S of its exp."""
        if access is None:
            return True
        exp = access[1]
        return exp is not None and exp - self._clock() <= REFRESH_MARGIN_S

    def _refresh(self) -> tuple[str, float | None]:
        """Exchange the PAT for an access token and its exp (caller holds the lock)."""
        url = self.base_url + REFRESH_PATH
        try:
            response = self._post(url, json={"refresh": self._api_key}, timeout=REFRESH_TIMEOUT)
        except requests.RequestException as e:
            raise LabelStudioAuthError(
                f"cannot refresh the personal access token at {url}: {first_line(e)}"
            ) from None
        if response.status_code in (400, 401, 403):
            raise LabelStudioAuthError(
                f"Label Studio refused the personal access token in LABEL_STUDIO_API_KEY "
                f"(HTTP {response.status_code} from {REFRESH_PATH}): it may be expired or "
                "revoked; create a new one under Account & Settings"
            )
        if response.status_code != 200:
            raise LabelStudioAuthError(
                f"refreshing the personal access token failed with HTTP {response.status_code}"
            )
        try:
            access = response.json().get("access")
        except (ValueError, AttributeError):
            access = None
        if not isinstance(access, str) or not access:
            raise LabelStudioAuthError(
                f"Label Studio's {REFRESH_PATH} answer has no 'access' token"
            )
        exp = _exp(jwt_claims(access))
        log.info(
            "label studio access token refreshed expires_in_s=%s",
            "unknown" if exp is None else f"{exp - self._clock():.0f}",
        )
        return access, exp


def _exp(claims: dict | None) -> float | None:
    exp = (claims or {}).get("exp")
    return float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None


def first_line(error: BaseException) -> str:
    """An error's first line (at most 300 characters), for one-line log and user messages;
    the error's type when it says nothing."""
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
