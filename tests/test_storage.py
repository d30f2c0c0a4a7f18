"""The storage layer, run against a local directory and against the local S3 server."""
from __future__ import annotations

import os
import threading

import pytest

from mimdex.infra import storage
from mimdex.infra.errors import EXIT_DATA, EXIT_TRANSIENT


def test_round_trip_bytes_and_json(store_root):
    storage.write_bytes(storage.join(store_root, "a/b.bin"), b"\x00\x01payload")
    storage.write_json(storage.join(store_root, "a/m.json"), {"z": 1, "a": [1, 2], "t": "naïve"})
    assert storage.read_bytes(storage.join(store_root, "a/b.bin")) == b"\x00\x01payload"
    assert storage.read_json(storage.join(store_root, "a/m.json")) == {"z": 1, "a": [1, 2], "t": "naïve"}
    assert storage.list_files(storage.join(store_root, "a")) == [
        storage.join(store_root, "a/b.bin"), storage.join(store_root, "a/m.json")]
    assert storage.list_files(storage.join(store_root, "a"), suffix=".json") == [
        storage.join(store_root, "a/m.json")]


def test_create_only_refuses_an_existing_key(store_root):
    uri = storage.join(store_root, "LATEST")
    storage.write_bytes(uri, b"v1", create_only=True)
    with pytest.raises(storage.ObjectExists) as err:
        storage.write_bytes(uri, b"v2", create_only=True)
    assert uri in str(err.value) and "already exists" in str(err.value)
    assert err.value.exit_code == EXIT_TRANSIENT
    assert storage.read_bytes(uri) == b"v1"


def test_create_only_race_has_exactly_one_winner(store_root):
    uri = storage.join(store_root, "race/marker")
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            storage.write_bytes(uri, f"writer-{i}".encode(), create_only=True)
            outcomes.append(f"won-{i}")
        except storage.ObjectExists:
            outcomes.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [o for o in outcomes if o.startswith("won")]
    assert len(winners) == 1 and outcomes.count("lost") == 5
    assert storage.read_bytes(uri) == f"writer-{winners[0][4:]}".encode()


def test_failed_write_leaves_nothing_and_keeps_the_old_object(store_root):
    uri = storage.join(store_root, "obj.bin")
    storage.write_bytes(uri, b"old")
    with pytest.raises(RuntimeError):
        with storage.open_write(uri) as f:
            f.write(b"new-but-partial")
            raise RuntimeError("writer died half way")
    assert storage.read_bytes(uri) == b"old"
    fresh = storage.join(store_root, "never.bin")
    with pytest.raises(RuntimeError):
        with storage.open_write(fresh) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("writer died half way")
    assert not storage.exists(fresh)
    assert storage.list_files(store_root) == [uri]  # no spool files left behind


def test_reader_never_sees_a_partial_object(store_root):
    """A reader polling while a writer replaces a 3 MB object sees only whole versions."""
    uri = storage.join(store_root, "big.bin")
    size = 3 * 2**20
    storage.write_bytes(uri, bytes([0]) * size)
    stop = threading.Event()
    seen: set[int] = set()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            data = storage.read_bytes(uri)
            if len(data) != size or data.count(data[:1]) != size:
                bad.append(f"len={len(data)} first={data[:1]!r}")
                return
            seen.add(data[0])

    t = threading.Thread(target=reader)
    t.start()
    try:
        for version in range(1, 6):
            with storage.open_write(uri) as f:
                for _ in range(size // 2**16):  # streamed in 64 KiB pieces
                    f.write(bytes([version]) * 2**16)
    finally:
        stop.set()
        t.join()
    assert not bad, bad
    assert storage.read_bytes(uri) == bytes([5]) * size
    assert len(seen) >= 1


def test_missing_path_error_names_the_uri(store_root):
    uri = storage.join(store_root, "no/such/manifest.json")
    with pytest.raises(storage.ObjectNotFound) as err:
        storage.read_json(uri)
    assert uri in str(err.value)
    assert err.value.exit_code == EXIT_DATA
    with pytest.raises(storage.ObjectNotFound, match="no/such/dir"):
        storage.list_files(storage.join(store_root, "no/such/dir"))
    with pytest.raises(storage.ObjectNotFound, match="no/such/table"):
        storage.parquet_dataset(storage.join(store_root, "no/such/table"))


def test_invalid_json_is_a_data_error_naming_the_uri(store_root):
    uri = storage.join(store_root, "broken.json")
    storage.write_bytes(uri, b"{not json")
    with pytest.raises(Exception) as err:
        storage.read_json(uri)
    assert uri in str(err.value) and getattr(err.value, "exit_code", None) == EXIT_DATA


def test_local_writes_are_world_readable(tmp_path):
    uri = str(tmp_path / "x" / "y.bin")
    storage.write_bytes(uri, b"1")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(uri).st_mode & 0o777 == 0o666 & ~umask


def test_transient_s3_errors_are_retried_by_botocore(s3_bucket, monkeypatch):
    """Four 503 SlowDown answers in a row are absorbed by the retries configured in
    STORAGE_OPTIONS (botocore's adaptive mode; s3fs's own loop behind it)."""
    import s3fs

    from fault_proxy import FaultProxy

    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    host, port = endpoint.rsplit("//", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)), first=4)
    try:
        with proxy as via:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", via)
            s3fs.S3FileSystem.clear_instance_cache()  # the cached instance points at the old endpoint
            before = storage.retry_count()
            uri = storage.join(s3_bucket, "retried.json")
            storage.write_json(uri, {"ok": True})
            assert proxy.requests > 4 and proxy.injected["slowdown"] == 4  # the failures happened, more followed
            assert storage.read_json(uri) == {"ok": True}
            assert storage.retry_count() - before >= 4  # and were counted
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_retry_budget_from_the_environment_holds_after_a_client_was_made(monkeypatch):
    """botocore writes total_max_attempts into the retries dict it is given; had it been
    STORAGE_OPTIONS' own, MIMDEX_S3_MAX_ATTEMPTS would be outranked by the 8 of an earlier
    client (CI saw 9 attempts, 5 minutes, where 2 were asked for)."""
    monkeypatch.delenv("MIMDEX_S3_MAX_ATTEMPTS", raising=False)
    assert storage.resolve("s3://any-bucket/x")[0].s3.meta.config.retries["total_max_attempts"] == 9
    monkeypatch.setenv("MIMDEX_S3_MAX_ATTEMPTS", "1")
    assert storage.resolve("s3://any-bucket/x")[0].s3.meta.config.retries["total_max_attempts"] == 2
    assert storage.STORAGE_OPTIONS["s3"]["config_kwargs"]["retries"] == {"max_attempts": 8, "mode": "adaptive"}
