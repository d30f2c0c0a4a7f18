"""A real S3 server on loopback for tests and the demo (moto's threaded server).

It speaks the S3 HTTP API on 127.0.0.1 at a free port; code reaches it only through
the standard AWS environment this context sets (``AWS_ENDPOINT_URL_S3`` and dummy
credentials), exactly as it would reach AWS. It lives in a daemon thread, so it stops
with the process at the latest.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

from mimdex.infra.errors import UsageError

_ENV_KEYS = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_DEFAULT_REGION", "AWS_PROFILE", "AWS_SESSION_TOKEN")


@contextlib.contextmanager
def local_s3_server() -> Iterator[str]:
    """Start the server, point the AWS environment at it, yield its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        raise UsageError("a local S3 server needs moto: pip install 'mimdex[dev]' "
                         "(or run without S3, e.g. `mimdex demo --no-s3`)") from exc
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request access log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    os.environ.update({"AWS_ENDPOINT_URL_S3": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    _forget_s3_clients()
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _forget_s3_clients()


def _forget_s3_clients() -> None:
    """fsspec caches S3 filesystems by their arguments, and an instance keeps the endpoint
    it first connected to: without this, a server started while another was in use (a
    demo run inside a test session) would be shadowed by the old one's cached client."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def create_bucket(endpoint: str, name: str) -> str:
    """Create ``name`` on the server; returns ``s3://name``."""
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"
