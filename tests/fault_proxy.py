"""A fault-injecting HTTP proxy in front of a real server (Label Studio), on 127.0.0.1.

Every request is forwarded as it came (method, path, headers, body) and the answer passed back,
unless a rule matches it first:

- `fail(pattern, status=500)`: answer `status` without forwarding (Label Studio failing);
- `fail(pattern, forward=True)`: forward, then answer `status` anyway (Label Studio did the
  work, but the answer was lost: a retry must not do it twice);
- `drop(pattern)`: close the connection without an answer (a connection reset).

A rule matches a method (or any) and a regular expression searched in the path with its query.
`heal()` removes every rule. `stop()` closes the listening socket, so connections are refused,
and `start()` listens again on the same port. Every request is recorded (method, path, what
was done), so tests can count what reached Label Studio.
"""

from __future__ import annotations

import http.client
import http.server
import re
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

# Not passed on: they describe one connection, not the message (and the proxy sends its own
# Server and Date).
_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade", "proxy-authorization", "server",
                         "date"})  # fmt: skip


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    method: str | None
    status: int
    forward: bool
    drop: bool

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and bool(self.pattern.search(path))


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    action: str  # "forwarded", "failed <status>", "forwarded, failed <status>", "dropped"


class FaultProxy:
    """A proxy to `target` (http://host:port); see the module docstring."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.target_host = parts.hostname or "127.0.0.1"
        self.target_port = parts.port or 80
        self.rules: list[Rule] = []
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- faults

    def fail(self, pattern: str, status: int = 500, *, method: str | None = None,
             forward: bool = False) -> None:  # fmt: skip
        self._add(Rule(re.compile(pattern), method, status, forward, drop=False))

    def drop(self, pattern: str, *, method: str | None = None) -> None:
        self._add(Rule(re.compile(pattern), method, 0, forward=False, drop=True))

    def heal(self) -> None:
        with self._lock:
            self.rules = []

    def hits_of(self, pattern: str, method: str | None = None) -> list[Hit]:
        found = re.compile(pattern)
        with self._lock:
            return [h for h in self.hits if found.search(h.path)
                    and (method is None or h.method == method)]  # fmt: skip

    def _add(self, rule: Rule) -> None:
        with self._lock:
            self.rules.append(rule)

    def _rule_for(self, method: str, path: str) -> Rule | None:
        with self._lock:
            return next((r for r in self.rules if r.matches(method, path)), None)

    def _record(self, method: str, path: str, action: str) -> None:
        with self._lock:
            self.hits.append(Hit(method, path, action))

    # -- listening

    def start(self) -> None:
        """Listen (again) on the proxy's port; the first start picks a free one."""
        if self._server is not None:
            return
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.proxy = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening: new connections are refused until start()."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    close = stop


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # start() again on the same port at once
    proxy: FaultProxy


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        rule = proxy._rule_for(self.command, self.path)
        if rule is not None and rule.drop:
            proxy._record(self.command, self.path, "dropped")
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if rule is not None and not rule.forward:
            proxy._record(self.command, self.path, f"failed {rule.status}")
            self._answer(rule.status, [("Content-Type", "text/plain")],
                         b"fault injected by the test proxy")  # fmt: skip
            return
        status, headers, data = self._forward(body)
        if rule is not None:  # forwarded, but the answer is lost
            proxy._record(self.command, self.path, f"forwarded, failed {rule.status}")
            self._answer(rule.status, [("Content-Type", "text/plain")],
                         b"fault injected by the test proxy after forwarding")  # fmt: skip
            return
        proxy._record(self.command, self.path, "forwarded")
        self._answer(status, headers, data)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        connection = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=300)
        try:
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders()
                    if k.lower() not in _HOP_BY_HOP and k.lower() != "content-length"]  # fmt: skip
            return response.status, kept, data
        finally:
            connection.close()

    def _answer(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle
