"""A loopback HTTP proxy in front of the local S3 server that answers a share of requests
with the faults S3 really gives under load: 503 SlowDown, 500 InternalError, a dropped
connection, or added latency. Faults come before the request reaches the server, so a
retried request is never applied twice (as with S3's own throttling)."""
from __future__ import annotations

import http.client
import http.server
import random
import threading
import time
from collections import Counter

_ERRORS = {"slowdown": (503, b"SlowDown", b"Please reduce your request rate."),
           "internal": (500, b"InternalError", b"We encountered an internal error. Please try again.")}
KINDS = ("slowdown", "internal", "reset", "latency")


class FaultProxy:
    """``with FaultProxy((host, port), rate=0.1, seed=0) as endpoint:`` ... ``.injected``;
    ``first`` instead answers exactly the first N requests with SlowDown."""

    def __init__(self, upstream: tuple[str, int], rate: float = 0.0, seed: int = 0, kinds=KINDS,
                 first: int = 0, latency: float = 0.2):
        self.upstream, self.rate, self.kinds, self.first, self.latency = upstream, rate, kinds, first, latency
        self.rng, self.lock = random.Random(seed), threading.Lock()
        self.requests, self.injected = 0, Counter()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" on PUT

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._draw()
                if fault == "reset":
                    self.close_connection = True  # nothing written: the client sees the connection drop
                    return
                if fault in _ERRORS:
                    status, code, message = _ERRORS[fault]
                    payload = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>" + code + b"</Code><Message>"
                               + message + b"</Message></Error>")
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "latency":
                    time.sleep(proxy.latency)
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                conn.request(self.command, self.path, body=body or None,
                             headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but the object's length
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _handle

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up on a delayed answer: not the proxy's business to print

        self.server = Server(("127.0.0.1", 0), Handler)

    def _draw(self) -> str | None:
        with self.lock:
            self.requests += 1
            if self.first:
                fault = "slowdown" if self.requests <= self.first else None
            else:
                fault = self.rng.choice(self.kinds) if self.rng.random() < self.rate else None
            if fault:
                self.injected[fault] += 1
            return fault

    def __enter__(self) -> str:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
