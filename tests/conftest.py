"""Shared fixtures: a real S3 server (moto's threaded server) on 127.0.0.1.

The server is a real HTTP endpoint; code under test reaches it through botocore and
s3fs exactly as it would reach AWS, configured only by the standard AWS environment.
"""
from __future__ import annotations

import os
import shutil
import tempfile
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
    from mimdex.pipelines.encode.job import loopback_only

    reaper = Reaper()
    with loopback_only():
        ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=f"test-{uuid.uuid4().hex[:6]}",
                 logging_level="ERROR")
    yield
    ray.shutdown()
    reaper.done()


@pytest.fixture(scope="module")
def dask_two(s3_server):
    """A dask.distributed cluster on 127.0.0.1 (tests/dask_cluster.py): a scheduler and 2
    one-thread workers, each with a private /tmp; started after the S3 server, whose
    endpoint they get from the environment. Stopped with the module, whatever happens."""
    from dask_cluster import dask_cluster
    from isolated import private_tmp

    if not private_tmp():
        _require_or_skip("Dask workers with a private /tmp need root and unshare (CI runs as root)")
    with dask_cluster(2) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def flink_two(s3_server):
    """A Flink session cluster on 127.0.0.1 (tests/flink_cluster.py): a JobManager, 2
    TaskManagers with a Beam worker pool beside each, Beam's job server; started after the
    S3 server, whose endpoint the pools pass to their workers. Stopped with the module."""
    from flink_cluster import available, flink_cluster

    why = available()
    if why:
        _require_or_skip(why)
    with flink_cluster() as cluster:
        yield cluster


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


@pytest.fixture(scope="session")
def chromium():
    """A real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium).
    Skipped where it is not installed (`make system-deps` installs it), unless
    MIMDEX_REQUIRE_SYSTEM_DEPS=1, as CI sets, makes its absence a failure."""
    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (binary and driver and webdriver):
        _require_or_skip("no headless Chromium here (`make system-deps` installs Debian's chromium and "
                         "chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # No network but loopback here: background services would only fail and retry.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1300,1000"):
        options.add_argument(flag)
    with tempfile.TemporaryDirectory() as profile:
        options.add_argument(f"--user-data-dir={profile}")
        browser = webdriver.Chrome(options=options, service=Service(driver))
        try:
            yield browser
        finally:
            browser.quit()


def _require_or_skip(why: str) -> None:
    if os.environ.get("MIMDEX_REQUIRE_SYSTEM_DEPS") == "1":
        pytest.fail(why)
    pytest.skip(why)


@pytest.fixture(scope="session")
def pushgateway():
    """A real Prometheus Pushgateway (Debian's build, unpacked by `make system-deps`) on
    127.0.0.1, in-memory, stopped at the end (and by the reaper should pytest be killed)."""
    import socket
    import subprocess
    import time
    import urllib.request

    from mimdex.infra.reaper import Reaper

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    binary = os.path.join(here, ".tools", "usr", "bin", "prometheus-pushgateway")
    binary = binary if os.path.exists(binary) else shutil.which("prometheus-pushgateway")
    if not binary:
        _require_or_skip("no prometheus-pushgateway here (`make system-deps` unpacks Debian's)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reaper = Reaper()
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            urllib.request.urlopen(url + "/-/ready", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"pushgateway did not start on {url}")
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(timeout=10)
    reaper.done()
