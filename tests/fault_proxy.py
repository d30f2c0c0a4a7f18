"""A loopback HTTP proxy in front of the local S3 server that answers a share of requests
with the faults S3 really gives under load, in two families:

- failures: 503 SlowDown, 500 InternalError and a dropped connection, all before the
  request reaches the server (as S3's own throttling: a retry is never applied twice);
  and ``ambiguous``: the request is forwarded, the server commits it, and then the answer
  is dropped (the connection reset), so the client's retry meets its own write. A read
  drawn as ambiguous passes, and the next write that draws no fault takes the fault in its
  place: a lost answer is news only for a write (reads are idempotent), and the failure
  rate stays what was asked;
- latency: an answer delayed by ``latency`` seconds, which is not a failure.

``rate`` is the failure rate (each failure kind an equal share), ``latency_rate`` the share
of delayed answers. ``only=(method, substring)`` limits faults to matching requests. ``ambiguous_once``: every distinct write ("writes": PUT, POST, DELETE;
"conditional": only those carrying If-None-Match / If-Match) commits and loses its answer
the first time it is sent, whatever the rate: the deterministic form of the fault.
"""
from __future__ import annotations

import http.client
import http.server
import random
import socket
import struct
import threading
import time
from collections import Counter

_ERRORS = {"slowdown": (503, b"SlowDown", b"Please reduce your request rate."),
           "internal": (500, b"InternalError", b"We encountered an internal error. Please try again."),
           # not a fault of load: what a missing grant or a wrong key gives, for the exit-path tests
           "denied": (403, b"AccessDenied", b"Access Denied")}
FAILURES = ("slowdown", "internal", "reset", "ambiguous")
KINDS = FAILURES + ("latency",)
WRITES = ("PUT", "POST", "DELETE")


class FaultProxy:
    """``with FaultProxy((host, port), rate=0.1, seed=0) as endpoint:`` ... ``.injected``;
    ``first`` instead answers exactly the first N requests with SlowDown."""

    def __init__(self, upstream: tuple[str, int], rate: float = 0.0, seed: int = 0, kinds=FAILURES,
                 first: int = 0, latency: float = 0.2, latency_rate: float = 0.0,
                 ambiguous_once: str | None = None, only: tuple[str, str] | None = None):
        self.upstream, self.rate, self.first, self.latency = upstream, rate, first, latency
        self.kinds = tuple(k for k in kinds if k != "latency")
        self.latency_rate = latency_rate or (rate / len(KINDS) if "latency" in kinds else 0.0)
        self.ambiguous_once, self._seen, self.only, self._owed = ambiguous_once, set(), only, 0
        # writes draw from a stream of their own: a change in how many reads a job makes (a
        # cache) must not move which writes fail, nor leave a run without an ambiguous write
        self.rng, self.write_rng, self.lock = random.Random(seed), random.Random(seed + 7919), threading.Lock()
        self.requests, self.injected = 0, Counter()
        self.committed_then_dropped: list[tuple[str, str]] = []  # (method, path) of ambiguous writes
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" on PUT

            def _drop(self) -> None:
                # RST instead of FIN: the client sees the connection reset mid-answer
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault, delay = proxy._draw(self.command, self.path, self.headers)
                if fault == "reset":
                    self._drop()  # nothing forwarded: the client sees the connection drop
                    return
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + code + b"</Code><Message>"
                               + message + b"</Message></Error>")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body: one sent would be read as the next answer
                        self.wfile.write(payload)
                    return
                if delay:
                    time.sleep(proxy.latency)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body or None,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "ambiguous":  # the server has done it; its answer never arrives
                    if self.command in WRITES and resp.status < 300:
                        with proxy.lock:
                            proxy.committed_then_dropped.append((self.command, self.path))
                    self._drop()
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the object's length
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up on a delayed answer: not the proxy's business to print

        self.server = Server(("127.0.0.1", 0), Handler)

    def _draw(self, method: str, path: str, headers) -> tuple[str | None, bool]:
        """(the failure to inject or None, whether to delay the answer)."""
        with self.lock:
            self.requests += 1
            if self.only and not (method == self.only[0] and self.only[1] in path):
                fault = None
            elif self.first:
                fault = "slowdown" if self.requests <= self.first else None
            elif self.ambiguous_once and method in WRITES and (
                    self.ambiguous_once == "writes" or "If-None-Match" in headers or "If-Match" in headers):
                key = (method, path, headers.get("If-None-Match"), headers.get("If-Match"))
                fault = None if key in self._seen else "ambiguous"
                self._seen.add(key)
            else:
                rng = self.write_rng if method in WRITES else self.rng
                fault = rng.choice(self.kinds) if self.kinds and rng.random() < self.rate else None
                if fault == "ambiguous" and method not in WRITES:   # passed on to the next write
                    fault, self._owed = None, self._owed + 1
                elif fault is None and self._owed and method in WRITES:
                    fault, self._owed = "ambiguous", self._owed - 1
            delay = fault is None and self.rng.random() < self.latency_rate
            if fault:
                self.injected[fault] += 1
            if delay:
                self.injected["latency"] += 1
            return fault, delay

    @property
    def failures(self) -> int:
        return sum(self.injected[k] for k in FAILURES)

    @property
    def failure_rate(self) -> float:
        return self.failures / max(1, self.requests)

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
