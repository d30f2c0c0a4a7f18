"""A refresh's delta reads only the vector columns its index takes (usable_rows(paged=True)),
each page checked against the CRC32 write_part stores with it; a part written before page
checksums is read whole against its sha256 instead."""
import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest

from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts.files import write_parquet
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.vectors import usable_rows
from mimdex.infra.errors import DataError

D = 64
MODEL = ModelRef("model", "ab" * 32, "3-tower", D, True)


@pytest.fixture
def part(tmp_path):
    rng = np.random.default_rng(3)
    image, text = rng.standard_normal((500, D)), rng.standard_normal((500, D))
    m = emb.write_vectors(str(tmp_path), image, [f"p{i:04d}" for i in range(500)], MODEL, text_vectors=text)
    return str(tmp_path), m.parts[0], image.astype(np.float16).astype(np.float32), \
        text.astype(np.float16).astype(np.float32)


def _flip(root: str, entry, column: str) -> None:
    """One byte in the middle of ``column``'s data."""
    path = f"{root}/{entry.part.file}"
    meta = pq.ParquetFile(path).metadata.row_group(0)
    chunk = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema.startswith(column))
    data = bytearray(open(path, "rb").read())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x5A
    open(path, "wb").write(bytes(data))


def _rows(root, entry, kind, paged=True):
    return usable_rows(root, entry, MODEL, "float16", kind, 0.5, paged=paged)


def test_a_paged_read_takes_the_index_s_columns_only_and_gives_the_whole_read_s_vectors(part):
    root, entry, image, text = part
    for kind in ("image", "text", "fused"):
        paged, whole = _rows(root, entry, kind), _rows(root, entry, kind, paged=False)
        assert np.array_equal(paged.vectors, whole.vectors) and np.array_equal(paged.ids, whole.ids)
    assert np.array_equal(_rows(root, entry, "image").vectors, image)
    columns = lambda names: [c for c in names if c in ("product_id", "image_emb")]  # noqa: E731
    table, stored = emb.read_part_columns(root, entry, MODEL, "float16", columns, verified=True)
    assert table.column_names == ["product_id", "image_emb"]
    assert stored < 0.55 * entry.part.bytes   # the text tower's vectors and the hashes stay unread


def test_a_corrupt_page_of_an_indexed_column_is_refused_naming_the_part(part):
    root, entry, image, _ = part
    _flip(root, entry, "text_emb")
    assert np.array_equal(_rows(root, entry, "image").vectors, image)   # that page is not read
    with pytest.raises(DataError, match=rf"embeddings part .*{entry.part.file}.*checksum"):
        _rows(root, entry, "text")
    with pytest.raises(DataError, match=entry.part.file):
        _rows(root, entry, "image", paged=False)   # the whole read: the sha256 no longer matches


def test_a_part_without_page_checksums_is_read_whole_against_its_sha256(part):
    root, entry, image, _ = part
    table = emb.read_part(root, entry, MODEL, "float16")
    meta = {k: v for k, v in table.schema.metadata.items() if k != emb.PAGE_CHECKSUMS}
    ref = write_parquet(root, entry.part.file, table.replace_schema_metadata(meta))   # as parts were written
    older = dataclasses.replace(entry, part=ref)
    assert np.array_equal(_rows(root, older, "image").vectors, image)
    _flip(root, older, "text_emb")   # a column the image index does not take: only the sha256 can see it
    with pytest.raises(DataError, match=older.part.file):
        _rows(root, older, "image")
