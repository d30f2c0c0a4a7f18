"""Attribute filters for search: which id-map rows a query may return.

A filter is an AND of clauses on the version's filter columns (contracts.attributes:
catalog columns named by ``build-index --filter-columns``, kept current by refreshes, and
carried in every shard's id map): equality or set membership on strings, ints and bools, and
inclusive ranges on ints. Its text form is the CLI's ``--filter``::

    category=mug,in_stock=true          equality, AND
    colour=red|blue                     one of several values
    family=3..7   family>=3   family<8  integer ranges (either end of a..b may be empty)

Values are typed by the column they name; a null never matches. Pure: text in, a row
mask out (the reader turns it into a faiss IDSelector over row positions).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mimdex.infra.contracts.attributes import kind as _kind
from mimdex.infra.errors import UsageError

_CLAUSE = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(<=|>=|=|<|>)\s*(.*?)\s*$")
_RANGE = re.compile(r"^(-?\d*)\.\.(-?\d*)$")
_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


@dataclass(frozen=True)
class Clause:
    column: str
    values: tuple[str, ...] = ()      # equality / membership (as written; typed by the column)
    low: int | None = None            # inclusive integer range
    high: int | None = None
    text: str = ""                    # as written, for error messages

    @property
    def is_range(self) -> bool:
        return not self.values


@dataclass(frozen=True)
class Filter:
    clauses: tuple[Clause, ...]

    def __str__(self) -> str:
        return ",".join(c.text for c in self.clauses)


def parse(text: str | Filter) -> Filter:
    """The text form above -> a Filter; a malformed clause is a UsageError naming it."""
    if isinstance(text, Filter):
        return text
    clauses = []
    for part in (p for p in text.split(",") if p.strip()):
        m = _CLAUSE.match(part)
        if not m or not m.group(3):
            raise UsageError(f"--filter: cannot read {part.strip()!r} (column=value, column=a|b, column=lo..hi, "
                             "column>=n, column<n ...)")
        column, op, value = m.groups()
        clauses.append(_clause(column, op, value, part.strip()))
    if not clauses:
        raise UsageError("--filter: no clause given")
    return Filter(tuple(clauses))


def _clause(column: str, op: str, value: str, text: str) -> Clause:
    if op == "=":
        rng = _RANGE.match(value)
        if rng is None:
            return Clause(column, tuple(v.strip() for v in value.split("|")), text=text)
        low, high = (int(v) if v else None for v in rng.groups())
        if low is None and high is None:
            raise UsageError(f"--filter: {text!r}: a range needs at least one end")
        return Clause(column, low=low, high=high, text=text)
    try:
        n = int(value)
    except ValueError:
        raise UsageError(f"--filter: {text!r}: {op} needs an integer") from None
    low, high = {">=": (n, None), ">": (n + 1, None), "<=": (None, n), "<": (None, n - 1)}[op]
    return Clause(column, low=low, high=high, text=text)


def _typed(clause: Clause, kind: str) -> list:
    out = []
    for v in clause.values:
        if kind == "string":
            out.append(v)
        elif kind == "int":
            try:
                out.append(int(v))
            except ValueError:
                raise UsageError(f"--filter: {clause.text!r}: {clause.column} holds integers, not {v!r}") from None
        else:
            if v.lower() not in _TRUE | _FALSE:
                raise UsageError(f"--filter: {clause.text!r}: {clause.column} holds true/false, not {v!r}")
            out.append(v.lower() in _TRUE)
    return out


def mask(table: pa.Table, flt: Filter, columns: tuple[str, ...]) -> np.ndarray:
    """A bool per row of ``table``: every clause holds (nulls never match). ``columns``:
    the version's filter columns, the only ones a clause may name (another id-map column
    is not kept current by refreshes)."""
    keep = np.ones(table.num_rows, bool)
    for clause in flt.clauses:
        if clause.column not in columns:
            raise UsageError(f"--filter: {clause.column!r} is not a filter column of this version (it filters on: "
                             f"{', '.join(columns) or 'nothing; build it with --filter-columns'})")
        if clause.column not in table.column_names:  # a column no row ever had: nothing matches
            keep[:] = False
            continue
        col = table.column(clause.column)
        kind = _kind(col.type)
        if kind is None:
            raise UsageError(f"--filter: {clause.column} is {col.type}, not a string, integer or bool column")
        if clause.is_range:
            if kind != "int":
                raise UsageError(f"--filter: {clause.text!r}: ranges need an integer column; {clause.column} "
                                 f"holds {kind}s")
            hit = pc.and_kleene(pc.greater_equal(col, clause.low) if clause.low is not None else pa.scalar(True),
                                pc.less_equal(col, clause.high) if clause.high is not None else pa.scalar(True))
        else:
            values = _typed(clause, kind)
            plain = col.type.value_type if pa.types.is_dictionary(col.type) else col.type
            hit = pc.is_in(col, value_set=pa.array(values, plain))
        keep &= pc.fill_null(hit, False).to_numpy(zero_copy_only=False)
    return keep
