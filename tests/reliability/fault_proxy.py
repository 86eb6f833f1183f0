"""A fault-injecting HTTP proxy for tests: sits on 127.0.0.1 in front of the moto S3 server.

Why a proxy and not a patched client: the faults must reach botocore, aiohttp and s3fs exactly as
a flaky object store would send them (a 503 with an XML body, a socket that never answers, a body
cut in the middle), so every retry layer in the stack is exercised, ours and theirs.

Per request (not per connection) the proxy draws from a seeded RNG and does one of:

- ``error``: answer ``500 InternalError`` or ``503 SlowDown`` itself, never forwarding the request;
- ``stall``: hold the request for ``stall_s`` seconds (longer than the client's read timeout in
  the tests), then close the connection without an answer;
- ``drop``: forward the request (the store *does* act on it), then send the client only a random
  prefix of the response and close the socket: a connection dropped mid-transfer;
- nothing: forward the request and relay the whole response.

Every request is forwarded with ``Connection: close`` so each TCP connection carries one request
and the proxy never has to parse chunked bodies. ``down = True`` makes the store unreachable:
connections are accepted and closed at once. Counters say what was injected.
"""

from __future__ import annotations

import contextlib
import random
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MAX_HEAD = 64 << 10  # refuse request heads larger than this (a proxy bug, not a client's)
FAULTS = ("error", "stall", "drop")


@dataclass
class FaultStats:
    """What the proxy saw and did; read it after a run to report the figures."""

    requests: int = 0
    error: int = 0
    stall: int = 0
    drop: int = 0
    refused: int = 0  # connections closed while ``down``
    by_method: dict[str, int] = field(default_factory=dict)

    @property
    def injected(self) -> int:
        return self.error + self.stall + self.drop

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "error": self.error, "stall": self.stall, "drop": self.drop,
                "refused": self.refused, "injected": self.injected, "by_method": dict(self.by_method)}


def _read_head(sock: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes]:
    """(HTTP head up to and including the blank line, bytes already read past it); b"" at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return b"", b""
        buf += chunk
        if len(buf) > MAX_HEAD:
            raise ValueError(f"request head over {MAX_HEAD} bytes")
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            name, value = line.split(b":", 1)
            out[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return out


def _close_connection(head: bytes) -> bytes:
    """The request head with ``Connection: close`` (one request per upstream connection)."""
    lines = [ln for ln in head[:-4].split(b"\r\n") if not ln.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n"


def _error_response(status: int) -> bytes:
    code, text = ("SlowDown", "Slow Down") if status == 503 else ("InternalError", "Internal Server Error")
    body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
            f"<Message>injected by fault_proxy</Message></Error>").encode()
    return (f"HTTP/1.1 {status} {text}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


def _recv_all(sock: socket.socket) -> bytes:
    parts = []
    while chunk := sock.recv(65536):
        parts.append(chunk)
    return b"".join(parts)


def _abort(sock: socket.socket) -> None:
    """Close with RST, not FIN: what a crashed peer or a cut network looks like."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


class FaultProxy:
    """A threaded TCP server on 127.0.0.1 forwarding HTTP/1.1 to ``upstream`` with injected faults.

    ``rates`` maps each of ``error``, ``stall``, ``drop`` to a probability per request (their sum is
    the fault rate). Change ``rates`` or ``down`` at any time; the RNG is seeded, so a single-threaded
    client sees the same sequence of faults every run.
    """

    def __init__(self, upstream: str, rates: dict[str, float] | None = None, *, seed: int = 0,
                 stall_s: float = 1.5) -> None:
        host, port = upstream.removeprefix("http://").rstrip("/").split(":")
        if host != "127.0.0.1":
            raise ValueError(f"upstream={upstream!r}: the fault proxy only forwards to 127.0.0.1")
        self.upstream = (host, int(port))
        self.rates = dict(rates or {})
        self.stall_s = stall_s
        self.down = False
        self.down_after: int | None = None  # requests served before the store goes down for good
        self.stats = FaultStats()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self._server.daemon_threads = True
        self._server.allow_reuse_address = True
        self._server.server_bind()
        self._server.server_activate()
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self, rates: dict[str, float] | None = None, seed: int = 0) -> None:
        """New rates and a fresh RNG and counters (each test starts from zero)."""
        with self._lock:
            self.rates = dict(rates or {})
            self._rng = random.Random(seed)
            self.stats = FaultStats()
            self.down = False
            self.down_after = None

    def _draw(self, method: str) -> tuple[str | None, float, int]:
        """(fault or None, a uniform draw for the drop point, an error status), counted."""
        with self._lock:
            self.stats.requests += 1
            self.stats.by_method[method] = self.stats.by_method.get(method, 0) + 1
            u, where, status = self._rng.random(), self._rng.random(), self._rng.choice((500, 503))
            acc = 0.0
            for fault in FAULTS:
                acc += self.rates.get(fault, 0.0)
                if u < acc:
                    setattr(self.stats, fault, getattr(self.stats, fault) + 1)
                    return fault, where, status
            return None, where, status

    def _handle(self, client: socket.socket) -> None:
        if self.down_after is not None and self.stats.requests >= self.down_after:
            self.down = True
        if self.down:
            with self._lock:
                self.stats.refused += 1
            _abort(client)
            return
        try:
            head, rest = _read_head(client)
            if not head:
                return
            method = head.split(b" ", 1)[0].decode("latin-1")
            headers = _headers(head)
            fault, where, status = self._draw(method)
            if fault == "error":
                self._answer_error(client, headers, rest, status)
            elif fault == "stall":
                time.sleep(self.stall_s)
                _abort(client)
            else:
                self._forward(client, head, rest, drop_at=where if fault == "drop" else None)
        except OSError:
            pass  # the client gave up (its timeout, or our own abort): nothing to answer
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _answer_error(self, client: socket.socket, headers: dict[str, str], rest: bytes, status: int) -> None:
        if headers.get("expect", "").lower() != "100-continue":  # read the body, so no RST eats the answer
            remaining = int(headers.get("content-length", "0") or 0) - len(rest)
            while remaining > 0 and (chunk := client.recv(min(remaining, 65536))):
                remaining -= len(chunk)
        client.sendall(_error_response(status))

    def _forward(self, client: socket.socket, head: bytes, rest: bytes, drop_at: float | None) -> None:
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(_close_connection(head) + rest)
            pump = threading.Thread(target=self._pump, args=(client, up), daemon=True)
            pump.start()  # the request body (after any 100 Continue) flows on while we read the answer
            answer, body = _read_head(up)
            while answer.split(b" ", 2)[1:2] == [b"100"]:  # interim answers pass through unchanged
                client.sendall(answer)
                answer, body = _read_head(up, body)
            if not answer:
                _abort(client)
                return
            response = _close_connection(answer) + body  # the client must not reuse this socket
            if drop_at is None:
                client.sendall(response)
                while chunk := up.recv(65536):
                    client.sendall(chunk)
                return
            response += _recv_all(up)
            cut = max(1, int(len(response) * drop_at))
            client.sendall(response[: min(cut, len(response) - 1)])
            _abort(client)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        except OSError:
            pass
