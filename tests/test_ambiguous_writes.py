"""Writes whose answer is lost: the fault proxy lets each write reach the local S3 server
and commit, then resets the connection before the answer arrives, so botocore's retry
meets the write it already made. Every write protocol must take its own write for
success (S3's guidance for conditional writes: check whether the object that now stands
is yours) and still refuse a real conflict."""
from __future__ import annotations

import os

import pytest
import s3fs

from fault_proxy import FaultProxy
from mimdex.infra import storage
from mimdex.infra.contracts import index_version as iv


@pytest.fixture
def ambiguous(s3_bucket, monkeypatch):
    """Every distinct write commits, then loses its answer the first time it is sent."""
    host, port = os.environ["AWS_ENDPOINT_URL_S3"].rsplit("//", 1)[1].split(":")
    proxy = FaultProxy((host, int(port)), ambiguous_once="writes")
    with proxy as via:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", via)
        s3fs.S3FileSystem.clear_instance_cache()  # the cached instance points at the old endpoint
        try:
            yield proxy
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def _dropped(proxy: FaultProxy, method: str, needle: str) -> bool:
    return any(m == method and needle in p for m, p in proxy.committed_then_dropped)


def test_each_write_protocol_recognises_its_own_committed_write(s3_bucket, ambiguous):
    # a plain PUT: retried, simply overwritten
    storage.write_bytes(s3_bucket + "/plain.bin", b"plain")
    # create-only (manifests, commit markers, the refresh lease): the retry gets 412, and the
    # object that stands is byte for byte what we sent
    storage.write_json(s3_bucket + "/manifest.json", {"format": "x", "n": 1}, create_only=True)
    # a conditional LATEST: created (If-None-Match), then moved on (If-Match); each retry gets
    # 412, and the pointer that stands carries this publisher's token
    storage.replace_if(s3_bucket + "/LATEST", b'{"version": "v1", "writer": "a"}', None)
    _, token = storage.read_versioned(s3_bucket + "/LATEST")
    storage.replace_if(s3_bucket + "/LATEST", b'{"version": "v2", "writer": "b"}', token)
    # a delete, and a second delete of what is gone
    storage.delete(s3_bucket + "/plain.bin")
    storage.delete(s3_bucket + "/plain.bin")
    # (s3fs deletes through DeleteObjects: a POST ?delete)
    for method, needle in (("PUT", "plain.bin"), ("PUT", "manifest.json"), ("PUT", "LATEST"), ("POST", "?delete")):
        assert _dropped(ambiguous, method, needle), (method, needle)
    assert ambiguous.injected["ambiguous"] >= 5
    assert not storage.exists(s3_bucket + "/plain.bin")
    assert storage.read_json(s3_bucket + "/manifest.json") == {"format": "x", "n": 1}
    assert storage.read_versioned(s3_bucket + "/LATEST")[0] == b'{"version": "v2", "writer": "b"}'


def test_a_real_conflict_is_still_refused_through_lost_answers(s3_bucket, ambiguous):
    storage.write_json(s3_bucket + "/manifest.json", {"n": 1}, create_only=True)
    with pytest.raises(storage.ObjectExists, match="another writer created it first"):
        storage.write_json(s3_bucket + "/manifest.json", {"n": 2}, create_only=True)
    storage.replace_if(s3_bucket + "/LATEST", b'{"version": "v1", "writer": "a"}', None)
    _, stale = storage.read_versioned(s3_bucket + "/LATEST")
    storage.replace_if(s3_bucket + "/LATEST", b'{"version": "v2", "writer": "b"}', stale)
    with pytest.raises(storage.ConcurrentUpdate, match="another publisher replaced it first"):
        storage.replace_if(s3_bucket + "/LATEST", b'{"version": "v3", "writer": "c"}', stale)
    assert storage.read_json(s3_bucket + "/manifest.json") == {"n": 1}
    assert storage.read_versioned(s3_bucket + "/LATEST")[0] == b'{"version": "v2", "writer": "b"}'


def test_a_multipart_upload_whose_completion_answer_is_lost(s3_bucket, ambiguous, monkeypatch):
    """Parts and the completion each commit and lose their answer once; the retried
    completion finds the upload gone (NoSuchUpload), and the object that stands is ours."""
    monkeypatch.setattr(storage, "MULTIPART_PART_BYTES", 5 * 2 ** 20)  # S3's smallest part
    data = os.urandom(11 * 2 ** 20)  # 5 + 5 + 1 MiB
    for create_only in (False, True):
        uri = f"{s3_bucket}/big-{create_only}.bin"
        with storage.open_write(uri, create_only=create_only) as f:
            f.write(data)
        assert storage.read_bytes(uri) == data
        assert _dropped(ambiguous, "PUT", f"big-{create_only}.bin?partNumber=")
        assert _dropped(ambiguous, "POST", f"big-{create_only}.bin?uploadId=")


def test_a_publisher_recognises_its_own_latest(s3_bucket, ambiguous, monkeypatch):
    """point_latest writes a pointer carrying a token of its writer: after its own update's
    answer is lost, the 412 of the retry is recognised, not reported as a lost race. (The
    versions' completeness check is not what is tested here.)"""
    monkeypatch.setattr(iv, "is_complete", lambda root, version: True)
    iv.point_latest(s3_bucket + "/idx", "v1", None, None)
    pointer, token = iv.read_latest(s3_bucket + "/idx")
    iv.point_latest(s3_bucket + "/idx", "v2", token, "v1")
    assert iv.latest_version(s3_bucket + "/idx") == "v2"
    assert _dropped(ambiguous, "PUT", "idx/LATEST")
    body = storage.read_json(s3_bucket + "/idx/LATEST")
    assert set(body) == {"version", "previous", "published_at", "writer"} and len(body["writer"]) == 32
