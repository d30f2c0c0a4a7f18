"""Filter columns: the catalog columns an index keeps current for attribute filters.

``build-index --filter-columns marketplace,category,in_stock`` names them; the version
records them in its params (``filter_columns``), refreshes and compactions carry them on,
and the reader filters on them alone (indexing/filters.py). Each is a string, integer or
bool column of the catalog.

A refresh keeps them current without re-encoding: the diff compares, per product, a
digest of these columns' values in the catalog with the same digest of what the previous
version's id maps show (the newest id map holding the product), and a product whose state
is unchanged but whose digest moved is *retagged*: its stored vectors are copied into the
refresh's run beside its new catalog row, and the delta segment replaces its id-map row.
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.infra.errors import DataError, UsageError

PARAM = "filter_columns"     # the key in an index version's params
_NAME = re.compile(r"^[A-Za-z_][\w.]*$")
_RESERVED = ("id", "product_id", "photo", "title", "image", "image_uri", "images", "image_uris")
_NULL = "\x00"               # a null value's stand-in in the digest (no catalog string holds it)


def parse_flag(text: str | None) -> tuple[str, ...]:
    """``--filter-columns a,b,c`` -> ("a", "b", "c"): names, in order, once each."""
    if not text:
        return ()
    out: list[str] = []
    for name in (n.strip() for n in text.split(",")):
        if not name:
            continue
        if not _NAME.match(name) or name in _RESERVED:
            raise UsageError(f"--filter-columns: {name!r} cannot be a filter column (a catalog metadata column: "
                             "letters, digits, '_' or '.', not one of " + ", ".join(_RESERVED) + ")")
        if name not in out:
            out.append(name)
    return tuple(out)


def kind(t: pa.DataType) -> str | None:
    """string, int or bool for the types a filter column may have, else None."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_boolean(t):
        return "bool"
    return None


def check(uri: str, schema: pa.Schema, columns: tuple[str, ...]) -> None:
    """Exit 65 naming the file and column when ``schema`` lacks a filter column or holds
    it as anything but a string, integer or bool."""
    for name in columns:
        if name not in schema.names:
            raise DataError(f"{uri}: no filter column {name!r} (--filter-columns; its columns: "
                            f"{', '.join(schema.names)})")
        if kind(schema.field(name).type) is None:
            raise DataError(f"{uri}: filter column {name!r} is {schema.field(name).type}; a filter column "
                            "holds strings, integers or bools")


def digest(table: pa.Table, columns: tuple[str, ...]) -> pa.Array:
    """An int64 per row: a hash of its values in ``columns`` (a missing column reads as
    nulls), so two sides compare 8 bytes a product. Integers compare by value whatever
    their width; a bool as true/false."""
    n = table.num_rows
    if not columns:
        return pa.nulls(n, pa.int64())
    texts = []
    for name in columns:
        col = table.column(name) if name in table.column_names else pa.nulls(n, pa.string())
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        texts.append(pc.fill_null(pc.cast(col, pa.string()), _NULL))
    joined = pc.binary_join_element_wise(*texts, "\x1f").to_pylist()
    out = np.fromiter((int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little", signed=True)
                       for s in joined), np.int64, count=n)
    return pa.array(out, pa.int64())
