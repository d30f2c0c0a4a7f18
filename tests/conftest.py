"""Shared fixtures: a real S3 server (moto's threaded server) on 127.0.0.1.

The server is a real HTTP endpoint; code under test reaches it through botocore and
s3fs exactly as it would reach AWS, configured only by the standard AWS environment.
"""
from __future__ import annotations

import uuid

import pytest

from mimdex.infra.local_s3 import create_bucket, local_s3_server


@pytest.fixture(scope="session")
def s3_server():
    with local_s3_server() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; returns its ``s3://`` URI."""
    return create_bucket(s3_server, f"mimdex-test-{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def local_ray():
    """A small real Ray for a test module; the jobs under test join it. The reaper stops
    its processes should pytest itself be killed (a CI timeout), as the CLI's does."""
    import ray

    from mimdex.infra.reaper import Reaper

    reaper = Reaper()
    ray.init(num_cpus=2, include_dashboard=False, namespace=f"test-{uuid.uuid4().hex[:6]}", logging_level="ERROR")
    yield
    ray.shutdown()
    reaper.done()


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """The same test against a local directory and against the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_bucket") + "/store"



def random_bundle(uri: str, titles: list[str], variant: str = "3-tower", seed: int = 0) -> str:
    """An untrained tiny bundle: pipeline tests check plumbing, not what a model learned."""
    from mimdex.encoders.bundle import save_untrained_bundle

    return save_untrained_bundle(uri, titles, variant, "tiny", seed)
