"""What changed between the catalog and the current embeddings.

Each product (the first catalog row of a product_id) has a state: the content hash of
its image bytes, title and model when encode could try it, or ``reject:<reason>`` when
the row itself breaks a rule (contracts.catalog judges both, as encode does). The
embeddings remember the state of every product they encoded and of every product encode
rejected, so an unchanged bad row stays rejected instead of counting as new each night.
A multi-photo product's state covers its photos in order (contracts.photos): a changed,
added, removed or moved photo makes the product changed, and its re-encode then copies
the vectors of the photos it still has (refresh job, ``reuse``).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from mimdex.infra.contracts import catalog
from mimdex.infra.contracts.embeddings import PreviousState
from mimdex.infra.contracts.photos import bounded, product_state


@dataclass(frozen=True)
class CatalogState:
    states: dict[str, str]     # product_id -> state, first occurrence in catalog order
    row_only_rejects: int      # rows with no product_id, and repeats of one


@dataclass(frozen=True)
class Diff:
    new: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()       # indexed before, row changed: re-encode (or reject) it
    rejudged: tuple[str, ...] = ()      # rejected before, row changed: try it again
    deleted: tuple[str, ...] = ()       # indexed before, gone from the catalog
    forgotten: tuple[str, ...] = ()     # rejected before, gone from the catalog
    unchanged: int = 0
    still_rejected: int = 0
    row_only_rejects: int = 0

    @property
    def empty(self) -> bool:
        return not (self.new or self.changed or self.rejudged or self.deleted or self.forgotten)

    @property
    def to_encode(self) -> set[str]:
        return set(self.new) | set(self.changed) | set(self.rejudged)

    @property
    def superseded(self) -> set[str]:
        """product_ids whose earlier part or reject row no longer stands."""
        return set(self.changed) | set(self.rejudged) | set(self.deleted) | set(self.forgotten)

    @property
    def removed_from_index(self) -> set[str]:
        return set(self.changed) | set(self.deleted)

    def counts(self) -> dict:
        return {"new": len(self.new), "changed": len(self.changed), "rejudged": len(self.rejudged),
                "deleted": len(self.deleted), "forgotten_rejects": len(self.forgotten),
                "unchanged": self.unchanged, "still_rejected": self.still_rejected,
                "row_only_rejects": self.row_only_rejects}


def _state(pid: str, title: bytes | None, image, cols: catalog.Columns, root: str, model_sha: str) -> str:
    problem = catalog.row_problem(pid, title, image)
    if problem:
        return catalog.rejected_state(problem.reason)
    if cols.photos:
        listed, _ = bounded(image)
        text = title.decode("utf-8")
        return product_state([catalog.photo_state(catalog.photo_bytes(v, cols.by_uri, root), text, model_sha)
                              for v in listed])
    if cols.image == "image_uri":
        image = catalog.fetch_image(catalog.resolve_uri(root, image))
        if isinstance(image, catalog.Problem):
            return catalog.rejected_state(image.reason)
    return catalog.content_hash(image, title.decode("utf-8"), model_sha)


def catalog_state(catalog_uri: str, model_sha: str, threads: int = 16) -> CatalogState:
    """The state of every product in the catalog (image_uris are fetched to hash them)."""
    files, root = catalog.catalog_files(catalog_uri)
    tables = [catalog.read_columns(uri) for uri in files]
    dups = catalog.duplicate_rows(files, [t.column("product_id").combine_chunks() for t, _ in tables])
    states: dict[str, str] = {}
    row_only = len(dups)
    with ThreadPoolExecutor(threads) as pool:
        for fi, (table, cols) in enumerate(tables):
            ids = table.column("product_id").to_pylist()
            titles = catalog.titles_as_bytes(table)
            images = table.column(cols.image).to_pylist()
            rows = [i for i, pid in enumerate(ids) if pid and (fi, i) not in dups]
            row_only += sum(1 for pid in ids if not pid)
            got = pool.map(lambda i: _state(ids[i], titles[i], images[i], cols, root, model_sha), rows)
            states.update((ids[i], s) for i, s in zip(rows, got))
    return CatalogState(states, row_only)


def diff(current: CatalogState, previous: PreviousState) -> Diff:
    new, changed, rejudged = [], [], []
    unchanged = still_rejected = 0
    for pid, state in current.states.items():
        old = previous.state.get(pid)
        if old is None:
            new.append(pid)
        elif old == state:
            if pid in previous.encoded:
                unchanged += 1
            else:
                still_rejected += 1
        elif pid in previous.encoded:
            changed.append(pid)
        else:
            rejudged.append(pid)
    gone = set(previous.state) - set(current.states)
    return Diff(new=tuple(sorted(new)), changed=tuple(sorted(changed)), rejudged=tuple(sorted(rejudged)),
                deleted=tuple(sorted(gone & previous.encoded)), forgotten=tuple(sorted(gone - previous.encoded)),
                unchanged=unchanged, still_rejected=still_rejected, row_only_rejects=current.row_only_rejects)
