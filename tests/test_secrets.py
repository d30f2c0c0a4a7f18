"""No credential leaves in anything mimdex writes or prints: a lifecycle run with
recognisable fake AWS credentials and presigned image URLs, then every object written
under the bucket (outside the input catalog) and every line printed is searched for them.
"""
from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import parse_qs, urlparse

import boto3
from botocore.config import Config
import pyarrow as pa

import dirty_catalog as dc
from conftest import random_bundle
from mimdex.infra import storage

FAKE = {"AWS_ACCESS_KEY_ID": "AKIAMIMDEXLEAKTEST01", "AWS_SECRET_ACCESS_KEY": "mimdexSecretCanary/0123456789abcdefXYZ",
        "AWS_SESSION_TOKEN": "mimdexSessionTokenCanary0123456789"}


def test_credentials_and_signed_urls_never_appear_in_outputs(s3_bucket, tmp_path, monkeypatch):
    for k, v in FAKE.items():
        monkeypatch.setenv(k, v)
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          config=Config(signature_version="s3v4"), aws_access_key_id=FAKE["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=FAKE["AWS_SECRET_ACCESS_KEY"],
                          aws_session_token=FAKE["AWS_SESSION_TOKEN"])
    rows, objects = [], {}
    for i in range(40):
        row, objs, _ = dc.row("plain", f"P{i:03d}", i)
        rows.append(row)
        objects.update(objs)
    signed = []
    for i, key in ((40, "cat/images/signed-0.jpg"), (41, "cat/images/signed-1.jpg"), (42, "cat/images/gone.jpg")):
        if i < 42:
            storage.write_bytes(f"{s3_bucket}/{key}", dc.picture(i))
        url = client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)
        signed.append(url)
        rows.append({"product_id": f"P{i:03d}", "title": f"signed product {i}".encode(), "image_uri": url,
                     "brand": "b"})
    dc.write(s3_bucket + "/cat", rows, objects, row_group_size=16)
    random_bundle(s3_bucket + "/model", ["product title"], "3-tower")
    canaries = list(FAKE.values())
    for url in signed:
        query = parse_qs(urlparse(url).query)
        canaries += [query["X-Amz-Signature"][0], query["X-Amz-Credential"][0].split("/")[0]]
    assert "X-Amz-Security-Token" in signed[0]  # the session token travels in the URL too

    mimdex = [sys.executable, "-m", "mimdex.pipelines.cli"]
    catalog, emb, index = s3_bucket + "/cat/catalog.parquet", s3_bucket + "/emb", s3_bucket + "/index"
    image = tmp_path / "q.jpg"
    image.write_bytes(dc.picture(40))
    printed = []
    for argv, code in (
            (["encode", "--model", s3_bucket + "/model", "--catalog", catalog, "--out", emb, "--unit-rows", "16"], 0),
            (["build-index", "--embeddings", emb, "--out", index, "--shards", "2", "--eval-queries", "8"], 0),
            (["search", "--index", index, "--image", str(image), "-k", "43", "--json"], 0),
            (["refresh", "--catalog", catalog, "--model", s3_bucket + "/model", "--embeddings", emb, "--index",
              index, "--unit-rows", "16"], 99),
            (["versions", "--index", index], 0),
            (["encode", "--model", s3_bucket + "/nowhere", "--catalog", catalog, "--out", emb + "2"], 65)):
        done = subprocess.run(mimdex + argv, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert done.returncode == code, (argv[0], done.stderr[-2000:])
        printed.append(done.stdout + done.stderr)

    # the signed URLs were used (two images encoded, one reject), but never written back
    assert "signed product 40" in printed[2] and "REDACTED" in printed[2]
    fs, root = storage.resolve(s3_bucket)
    written = [p for p in fs.find(root) if "/cat/" not in p]
    assert any(p.endswith("manifest.json") for p in written) and any("rejects" in p for p in written)
    leaks = []
    for path in written:
        data = fs.cat_file(path)
        if path.endswith(".parquet"):  # compressed: search the decoded text columns
            import pyarrow.parquet as pq
            table = pq.read_table(pa.BufferReader(data))
            data = str(table.drop_columns([c for c in table.column_names if "emb" in c]).to_pylist()).encode()
        leaks += [(path, c) for c in canaries if c.encode() in data]
    leaks += [("printed", c) for text in printed for c in canaries if c in text]
    assert leaks == []
