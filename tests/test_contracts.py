"""The data contracts: one rule per contract, judged the same by every job.

Property tests (hypothesis) draw dirty catalogs from the row kinds of dirty_catalog.py;
the import-graph and size tests keep the layering the docs describe.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dirty_catalog as dc
from mimdex.infra import storage
from mimdex.infra.contracts import catalog
from mimdex.infra.contracts import embeddings as emb
from mimdex.infra.contracts import fingerprint
from mimdex.infra.contracts.model import ModelRef
from mimdex.infra.contracts.recall import recall_at
from mimdex.pipelines.encode.commits import write_unit
from mimdex.pipelines.encode.config import DecodeSpec
from mimdex.pipelines.encode.decode import decode_unit
from mimdex.pipelines.encode.plan import plan_units
from mimdex.pipelines.refresh import diff as diffs
from mimdex.pipelines.refresh.diff_graph import run_diff

REPO = Path(__file__).resolve().parents[1]
MODEL = ModelRef("model", "ab" * 32, "image-only", 4, False)
KINDS = [k for k in dc.GOOD if k != "big"] + list(dc.BAD) + ["empty_id", "null_id", "duplicate"]


def _catalog(root: str, kinds: list[str]) -> tuple[list[dict], dict[str, bytes]]:
    """The catalog; a "duplicate" repeats the first product_id (the first row itself when
    it is the first row with an id, so a plain product)."""
    rows, objects = [], {}
    for i, kind in enumerate(kinds):
        first = next((r["product_id"] for r in rows if r["product_id"]), f"P{i:03d}")
        row, objs, _ = dc.row(kind, first if kind == "duplicate" else f"P{i:03d}", i)
        rows.append(row)
        objects.update(objs)
    dc.write(root, rows, objects, row_group_size=7)
    return rows, objects


def _encode(root: str, out: str) -> dict[str, tuple[str, str | None]]:
    """What encode makes of every product (its state, its reject reason or None), written
    as an embeddings root the way encode writes it (the model is a stand-in: zeros)."""
    units, facts = plan_units(root + "/catalog.parquet", 10)
    spec = DecodeSpec(image_size=8, has_text=False, tokenizer_json="", context_length=8,
                      model_sha256=MODEL.sha256, catalog_root=facts["root"], image_column="image_uri")
    judged, entries = {}, []
    for unit in units:
        decoded, _ = decode_unit(spec, unit)
        assert len(decoded.product_ids) + len(decoded.rejects) == unit.rows  # nothing dropped
        for pid, state in zip(decoded.product_ids, decoded.content_hashes):
            judged[pid] = (state, None)
        for r in decoded.rejects:
            if r.problem.reason not in catalog.ROW_ONLY_REASONS:
                judged[r.product_id] = (r.state, r.problem.reason)
        n = len(decoded.product_ids)
        vectors = {"image_emb": np.zeros((n, MODEL.d), np.float16), "text_emb": None, "seconds": 0.0}
        entries.append(write_unit(out, unit, decoded, vectors, MODEL, "float16").entry)
    emb.write_manifest(out, emb.build_manifest(entries, MODEL, "float16", root, 10))
    return judged


def _expected_reason(kind: str) -> str | None:
    return dc.BAD.get(kind)


def _diff(root: str, out: str, tmp: str, buckets: int) -> tuple[diffs.Diff, dict]:
    """The refresh's diff (Beam, DirectRunner) of the catalog against the embeddings at
    ``out``, and what it read and wrote."""
    return run_diff(root + "/catalog.parquet", MODEL.sha256, out, emb.read_manifest(out),
                    f"{tmp}/diff-{len(storage.list_files(tmp))}-{buckets}", buckets=buckets)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=24),
       edits=st.lists(st.tuples(st.sampled_from(["retitle", "break_image", "delete", "fix_title", "add"]),
                                st.integers(0, 23)), max_size=6),
       buckets=st.integers(1, 5))
def test_encode_and_the_bucketed_refresh_diff_judge_every_row_alike(kinds, edits, buckets):
    """The diff's bucketed join on Beam's DirectRunner against a brute-force diff of the
    states encode itself records (a dict per product, before and after the edits)."""
    with tempfile.TemporaryDirectory() as tmp:
        root, out = tmp + "/cat", tmp + "/emb"
        rows, objects = _catalog(root, kinds)
        judged = _encode(root, out)
        # each product gets the reason its kind deserves (the first row of an id decides)
        first: dict[str, str] = {}
        for row, kind in zip(rows, kinds):
            if row["product_id"]:
                first.setdefault(row["product_id"], "plain" if kind == "duplicate" else kind)
        assert {p: reason for p, (_, reason) in judged.items()} == {p: _expected_reason(k) for p, k in first.items()}

        # an unchanged catalog: nothing to do, whatever it holds
        unchanged, first_night = _diff(root, out, tmp, buckets)
        assert unchanged.empty, unchanged.counts
        assert first_night["runs_kept"] == {"cat": 0, "prev": 0, "shown": 0}
        assert unchanged.counts["unchanged"] == sum(1 for _, r in judged.values() if r is None)

        # edits: the diff re-processes exactly the products whose state encode would change
        for op, i in edits:
            if i >= len(rows) or not rows[i]["product_id"]:
                continue
            if op == "retitle":
                rows[i]["title"] = (rows[i]["title"] or b"") + b" v2"
            elif op == "fix_title":
                rows[i]["title"] = b"a proper title"
            elif op == "break_image" and rows[i]["image_uri"] in objects:
                storage.write_bytes(storage.join(root, rows[i]["image_uri"]), b"broken")
            elif op == "delete":
                rows[i] = {**rows[i], "product_id": ""}
            elif op == "add":
                rows.append({**rows[i], "product_id": f"ADDED-{i}"})
        dc.write(root, rows, {}, row_group_size=7)
        now = _encode(root, tmp + "/emb-after")
        d, second_night = _diff(root, out, tmp, buckets)
        # the same diff from the previous side's runs kept by the first night (none rewritten)
        assert second_night["runs_kept"]["prev"] == second_night["part_batches"] > 0
        got = lambda *kinds: set(d.ids(*kinds).to_pylist())  # noqa: E731
        assert got(*diffs.TO_ENCODE) == {p for p, (state, _) in now.items() if judged.get(p, (None,))[0] != state}
        assert got(diffs.NEW) == set(now) - set(judged)
        assert got(diffs.DELETED, diffs.FORGOTTEN) == set(judged) - set(now)
        assert got(diffs.CHANGED, diffs.DELETED) == {p for p in got(*diffs.SUPERSEDED) if judged[p][1] is None}


def test_an_image_whose_read_fails_after_a_good_head_is_rejected_in_the_state_the_diff_sees(monkeypatch):
    """One rule for both sides (fingerprint.row_state): encode's reject state of a row whose
    bytes could not be read after its HEAD succeeded is the diff's state of that row, so
    the next night sees it unchanged (still rejected) until the image itself changes."""

    with tempfile.TemporaryDirectory() as tmp:
        root = tmp + "/cat"
        _catalog(root, ["plain", "plain"])
        real = catalog.fetch_image

        def flaky(uri):   # the second image's GET fails; its HEAD still answers
            return catalog.Problem("image_uri_unreachable", "read failed") if uri.endswith("P001-1.img") else real(uri)

        monkeypatch.setattr(catalog, "fetch_image", flaky)
        judged = _encode(root, tmp + "/emb")
        assert judged["P001"][1] == "image_uri_unreachable" and judged["P000"][1] is None
        table, cols, _ = catalog.read_unit(root + "/catalog.parquet")
        states = fingerprint.row_states(table.column("product_id").to_pylist(), catalog.titles_as_bytes(table),
                                        table.column("image_uri").to_pylist(), [None, None], cols, None, root,
                                        MODEL.sha256)
        assert judged["P001"][0] == states[1] and states[1].startswith("fp:")   # the fingerprint state
        d, _ = _diff(root, tmp + "/emb", tmp, 1)
        assert d.empty and d.counts["still_rejected"] == 1


@settings(max_examples=200, deadline=None)
@given(products=st.lists(st.tuples(st.booleans(), st.sampled_from(["s1", "s2"]), st.sampled_from([None, 1, 2]),
                                   st.booleans(), st.sampled_from(["s1", "s2"]), st.booleans(),
                                   st.sampled_from([None, 1, 2])), max_size=25))
def test_a_product_is_retagged_exactly_when_its_state_held_and_the_index_shows_other_filter_values(products):
    """classify, after shown_attrs, against the rule written out per product: (in the
    catalog, its state, its filter digest or None where the index has no filter columns;
    in the embeddings, their state, encoded; the digest the index's newest id map shows)."""
    cat, prev, shown, want = [], [], [], {}
    for i, (in_cat, state, attrs, in_prev, was, encoded, seen) in enumerate(products):
        pid = f"p{i:03d}"
        digest = dict(zip(["s1", "s2"], fingerprint.digests(["s1", "s2"]).tolist()))   # as the runs carry them
        if in_cat:
            cat.append({"product_id": pid, "state": digest[state], "attrs": attrs, "order": i})
        if in_prev:
            prev.append({"product_id": pid, "state": digest[was], "encoded": encoded, "part": "part-00000"})
            if encoded and seen is not None:   # an older id map's row is superseded by the newer one's
                shown += [{"product_id": pid, "attrs": 99, "seq": 0}, {"product_id": pid, "attrs": seen, "seq": 2}]
        if in_cat and not in_prev:
            want[pid] = diffs.NEW
        elif in_prev and not in_cat:
            want[pid] = diffs.DELETED if encoded else diffs.FORGOTTEN
        elif in_cat and state != was:
            want[pid] = diffs.CHANGED if encoded else diffs.REJUDGED
        elif in_cat and encoded and attrs is not None and seen is not None and attrs != seen:
            want[pid] = diffs.RETAGGED
    cat_t = pa.Table.from_pylist(cat, pa.schema([("product_id", pa.string()), diffs.STATE, diffs.ATTRS, diffs.ORDER]))
    prev_t = pa.Table.from_pylist(prev, diffs.PREV_SCHEMA)
    out, counts = diffs.classify(cat_t, diffs.shown_attrs(prev_t, pa.Table.from_pylist(shown, diffs.SHOWN_SCHEMA)))
    assert dict(zip(out["product_id"].to_pylist(), out["change"].to_pylist())) == want
    assert counts[diffs.RETAGGED] == sum(1 for c in want.values() if c == diffs.RETAGGED)
    assert counts["unchanged"] == sum(1 for i, p in enumerate(products) if p[0] and p[3] and p[1] == p[4] and p[5]
                                      and f"p{i:03d}" not in want)


def test_duplicate_rows_the_first_occurrence_wins_across_files():
    ids = [pa.array(["a", "b", None, "a"]), pa.array(["", "b", "c", "a"])]
    dups = catalog.duplicate_rows(["f0", "f1"], ids)
    assert dups == {(0, 3): "f0 row 0", (1, 1): "f0 row 1", (1, 3): "f0 row 0"}


def test_deletion_files_hide_superseded_rows_and_fold_an_inline_exclude(tmp_path):
    """A part's superseded ids live in a deletion file the entry names (sha256 checked),
    each new file holding every id so far; an entry written before deletion files (ids
    inline, ``exclude``) reads the same and is folded into the next file."""
    from dataclasses import replace

    from mimdex.infra.contracts import part_deletions
    from mimdex.infra.errors import DataError

    root = str(tmp_path / "emb")
    pids = [f"p{i:03d}" for i in range(30)]
    x = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    m = emb.write_vectors(root, x, pids, ModelRef("m", "s" * 64, "3-tower", 8, False), "float32", 3)
    live = lambda e: emb.read_part(root, e, m.model, m.dtype).column("product_id").to_pylist()  # noqa: E731
    legacy = replace(m.parts[0], exclude=("p000", "p001"))
    assert live(legacy) == pids[2:10]
    first = replace(legacy, exclude=(), deleted=part_deletions.write(root, "runs/r-1", legacy.name, {"p002"},
                                                                     legacy.deleted, legacy.exclude))
    assert live(first) == pids[3:10] and emb.PartEntry.from_json(first.to_json()) == first
    assert "exclude" not in first.to_json() and first.to_json()["deleted"]["file"] == \
        "runs/r-1/deleted/part-00000.parquet"
    second = replace(first, deleted=part_deletions.write(root, "runs/r-2", first.name, {"p004"}, first.deleted))
    assert live(second) == [pids[3]] + pids[5:10]
    assert part_deletions.read(root, second.deleted).to_pylist() == ["p000", "p001", "p002", "p004"]
    # a deletion file that is not what the manifest recorded is refused, naming it
    bad = replace(first, deleted=part_deletions.write(root, "runs/r-3", first.name, {"p005"}, first.deleted))
    path = tmp_path / "emb" / bad.deleted.file
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(DataError, match="runs/r-3/deleted/part-00000.parquet"):
        live(bad)


@given(st.lists(st.lists(st.integers(0, 5), min_size=3, max_size=3), min_size=1, max_size=20), st.data())
def test_recall_is_the_share_of_queries_whose_target_is_in_the_first_k(found, data):
    target = data.draw(st.lists(st.integers(0, 5), min_size=len(found), max_size=len(found)))
    got = recall_at(np.array(found), np.array(target), (1, 3), digits=None)
    assert got["recall@1"] == sum(f[0] == t for f, t in zip(found, target)) / len(found)
    assert got["recall@3"] == sum(t in f for f, t in zip(found, target)) / len(found)


# ---- layering ---------------------------------------------------------------------------

LAYERS = {"infra": ("mimdex.pipelines", "mimdex.indexing", "mimdex.encoders"),
          "encoders": ("mimdex.pipelines", "mimdex.indexing"),
          "indexing": ("mimdex.pipelines",)}


def _modules():
    for top in ("encoders", "indexing", "infra", "pipelines"):
        for path in sorted((REPO / top).rglob("*.py")):
            yield path, ast.parse(path.read_text())


def _imports(tree) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [m for m in out if m.startswith("mimdex.")]


def test_no_job_imports_another_jobs_internals():
    jobs = {p.name for p in (REPO / "pipelines").iterdir() if (p / "__init__.py").exists()}
    bad = []
    for path, tree in _modules():
        rel = path.relative_to(REPO).parts
        own = rel[1] if rel[0] == "pipelines" and len(rel) > 2 else None
        for name in _imports(tree):
            parts = name.split(".")
            # mimdex.pipelines.<job> (what its __init__ exports) is fine, a module inside it is not
            if (parts[:2] == ["mimdex", "pipelines"] and len(parts) > 3 and parts[2] in jobs and parts[2] != own
                    and (REPO / "pipelines" / parts[2] / f"{parts[3]}.py").exists()):
                bad.append(f"{path.relative_to(REPO)} imports {name}")
            for layer, forbidden in LAYERS.items():
                if rel[0] == layer and name.startswith(forbidden):
                    bad.append(f"{path.relative_to(REPO)} ({layer}) imports {name}")
    assert bad == []


def test_contracts_import_no_job_and_refresh_loads_no_beam():
    code = ("import sys, mimdex.infra.contracts.catalog, mimdex.infra.contracts.embeddings, "
            "mimdex.infra.contracts.index_version, mimdex.pipelines.refresh; "
            "print(sorted(m for m in sys.modules "
            "if m.startswith(('apache_beam', 'mimdex.pipelines.build_index.graph'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_no_module_over_400_lines():
    long = [f"{p.relative_to(REPO)}: {n}" for p, _ in _modules() if (n := len(p.read_text().splitlines())) > 400]
    assert long == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from(["", "a", "b", "c", "d"])), max_size=30))
def test_the_first_occurrence_rule_is_one_function(ids):
    """contracts.duplicates.first_in_order is the rule encode (first_positions), the diff
    (first_occurrences) and the duplicate scan (repeats) use: catalog order picks the row."""
    from mimdex.infra.contracts import duplicates as dups
    from mimdex.pipelines.refresh.diff import first_occurrences

    expected: dict[str, int] = {}
    for i, p in enumerate(ids):
        if p:
            expected.setdefault(p, i)
    assert dups.first_positions(ids) == expected
    rows = [(p, i) for i, p in enumerate(ids) if p]
    repeated = dups.repeats(pa.table({"id": pa.array([p for p, _ in rows], pa.string()),
                                      "file": pa.array([0] * len(rows), pa.int32()),
                                      "row": pa.array([i for _, i in rows], pa.int64())}), ["f"])
    assert set(repeated) == {(0, i) for p, i in rows if expected[p] != i}
    cat = pa.table({"product_id": pa.array([p for p, _ in rows], pa.string()),
                    "state": pa.array([f"s{i}" for _, i in rows], pa.string()),
                    "attrs": pa.array([None] * len(rows), pa.int64()), "order": pa.array([i for _, i in rows])})
    firsts, dropped = first_occurrences(cat)
    assert dict(zip(firsts["product_id"].to_pylist(), firsts["state"].to_pylist())) == {
        p: f"s{i}" for p, i in expected.items()}
    assert dropped == len(rows) - len(expected)


def test_parts_are_diffed_in_batches_that_a_refresh_does_not_move():
    """The diff reads the embeddings' states in batches of about a catalog unit's rows (a
    bucket's join reads a row group of every run); a refresh appends parts, so the batches
    before stay as they were and their kept runs are found again."""
    from mimdex.infra.contracts.files import FileRef
    from mimdex.pipelines.refresh.diff_graph import BATCH_ROWS, part_batches

    def part(i: int, rows: int) -> emb.PartEntry:
        return emb.PartEntry(f"part-{i:05d}", FileRef(f"part-{i:05d}.parquet", "0" * 64, 1, rows),
                             FileRef(f"rej-{i}.parquet", "0" * 64, 1, 5) if i == 3 else None)

    sizes = [BATCH_ROWS // 3, BATCH_ROWS // 3, BATCH_ROWS // 3, BATCH_ROWS // 5, BATCH_ROWS, 10]
    parts = [part(i, n) for i, n in enumerate(sizes)]
    names = [[e.name for e in b] for b in part_batches(parts)]
    assert names == [["part-00000", "part-00001", "part-00002", "part-00003"], ["part-00004"], ["part-00005"]]
    later = part_batches(parts + [part(6, 99)])
    assert later[:2] == part_batches(parts)[:2] and [e.name for e in later[2]] == ["part-00005", "part-00006"]
