"""A product's state without reading its image: the change fingerprint.

The refresh diff compares each product's *state* in the catalog with the state its
embeddings were made from (docs/contracts.md, "Change fingerprints"):

- an inline ``image`` / ``images`` row: the content hash of the bytes, title and model
  (catalog.content_hash): the bytes are in the catalog file anyway;
- an ``image_uri`` / ``image_uris`` row: the hash of the image's *fingerprint*, title and
  model, where the fingerprint is the catalog's ``image_sha256`` or ``image_version``
  column when it has one (for ``image_uris``, the lists ``image_sha256s`` or
  ``image_versions``: a value per photo, in the same positions) and the value is not
  null, else what a HEAD or a listing says of the object: ETag and size (size and mtime
  on a disk). No image byte is read to know that an image did not change, and no object
  is HEADed or listed whose value the catalog gives.

Encode records both the fingerprint state it encoded from (part column ``source_state``,
and ``image_fingerprint``) and the exact ``content_hash`` of the bytes it read. An image
replaced between the HEAD and the read has an older fingerprint than its bytes: the next
night sees a new fingerprint and encodes it again (never the reverse).

The diff carries a state as ``digests``: its first 8 bytes of BLAKE2b, an int64. Two
different states compare equal with probability 2^-64 per product, so the diff is the
one the strings would give, in a third of the bytes of a hex string.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mimdex.infra import storage
from mimdex.infra.contracts import catalog
from mimdex.infra.contracts.photos import LIST_COLUMNS, bounded, product_state
from mimdex.infra.redact import redact

def column_of(names, image: str) -> str | None:
    """The fingerprint column a catalog provides for its ``image`` column (``image_uri``:
    catalog.FINGERPRINT_COLUMNS; ``image_uris``: their per-photo lists), most exact first,
    or None."""
    return next((c for c in catalog.FINGERPRINT_COLUMNS_OF.get(image, ()) if c in set(names)), None)


def given_of(column: str | None, value: str | None) -> str | None:
    """The fingerprint a catalog gives for an image (None: look at the object)."""
    return f"{column}:{value}" if column and value else None


def photo_given(values: list | None, position: int) -> str | None:
    """A photo's value in a per-photo fingerprint list (None past its end, or null)."""
    return values[position] if values is not None and position < len(values) else None


def from_info(info: dict) -> str | catalog.Problem:
    """An object's fingerprint from what a HEAD or a listing says of it: the same fields
    from either (ETag and size on an object store, size and mtime on a disk), so an object
    listed one night and HEADed the next keeps its fingerprint. (A VersionId is not in a
    listing; the ETag changes with the content anyway.)"""
    if info.get("type") == "directory":
        return catalog.Problem("image_uri_unreachable", f"{redact(str(info.get('name')))} is a directory")
    etag = info.get("ETag") or info.get("etag")
    facts = [("etag", etag), ("size", info.get("size"))]
    if not etag:  # a local disk: no ETag, the modification time stands in for it
        facts.append(("mtime", info.get("mtime") or info.get("LastModified")))
    return "object:" + ";".join(f"{k}={v}" for k, v in facts if v is not None)


def of_object(uri: str) -> str | catalog.Problem:
    """The fingerprint of the object at ``uri`` from one HEAD, or why it cannot be used
    (the same reasons a fetch gives: catalog.unreachable_or)."""
    info = catalog.unreachable_or(lambda: storage.head(uri), uri)
    return info if isinstance(info, catalog.Problem) else from_info(info)


LIST_MIN = 256   # a directory holding at least this many of the wanted objects is listed, not HEADed


def of_objects(uris: list[str], threads: int = 16, io: dict | None = None) -> dict[str, str | catalog.Problem]:
    """Fingerprints of many objects: a directory (prefix) that holds at least LIST_MIN of
    them is listed (one LIST per 1,000 keys on S3, instead of a HEAD each), the rest are
    HEADed on ``threads`` threads, in blocks (no per-object task). ``io`` (if given) gets
    the storage traffic of the helper threads added (HEADs, and any bytes read)."""
    by_dir: dict[str, list[str]] = {}
    for uri in dict.fromkeys(uris):
        by_dir.setdefault(uri.rsplit("/", 1)[0], []).append(uri)
    out: dict[str, str | catalog.Problem] = {}
    heads, mark = [], storage.IO.thread_snapshot()
    for directory, wanted in by_dir.items():
        listed = storage.list_info(directory) if len(wanted) >= LIST_MIN else None
        if listed is None:
            heads += wanted
            continue
        for uri in wanted:
            info = listed.get(uri.rsplit("/", 1)[1])
            out[uri] = from_info(info) if info is not None else catalog.Problem(
                "image_uri_unreachable", f"read: no such object or directory: {redact(uri)}")
    def head_block(block: list[str]):
        start = storage.IO.thread_snapshot()
        return [of_object(u) for u in block], storage.IO.thread_since(start)

    blocks = [heads[i::threads] for i in range(min(threads, len(heads)))]
    with ThreadPoolExecutor(max(1, len(blocks))) as pool:
        done = list(pool.map(head_block, blocks))
    used = [storage.IO.thread_since(mark)] + [u for _, u in done]  # the LISTs here, the HEADs there
    for block, (got, _) in zip(blocks, done):
        out.update(zip(block, got))
    if io is not None:
        for k in used[0]:
            io[k] = io.get(k, 0) + sum(u[k] for u in used)
    return out


def of_row(uri: str, given: str | None, column: str | None) -> str | catalog.Problem:
    """An image's fingerprint: the catalog's value (a row's, or a photo's), else the object's."""
    return given_of(column, given) or of_object(uri)


def source_state(fingerprint: str, title: str, model_sha256: str) -> str:
    """What the diff compares for an image known by fingerprint (cf. catalog.content_hash,
    which hashes the bytes themselves)."""
    h = hashlib.sha256(b"fingerprint\n")
    for part in (fingerprint.encode("utf-8"), title.encode("utf-8"), model_sha256.encode("ascii")):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return "fp:" + h.hexdigest()


def digests(states: list[str]) -> np.ndarray:
    """Each state's 8-byte digest as an int64 (what the diff compares and writes)."""
    return np.frombuffer(b"".join(hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest() for s in states),
                         "<i8").copy()


def state_of(got: str | catalog.Problem, title: str, model_sha256: str) -> str:
    return catalog.rejected_state(got.reason) if isinstance(got, catalog.Problem) \
        else source_state(got, title, model_sha256)


def image_state(by_uri: bool, value, known: str | catalog.Problem | None, title: str, model_sha256: str) -> str:
    """The state of one image (a row's, or one photo of its list) as the diff compares it
    and encode records it: inline bytes by their content hash; an image behind a URI by
    ``known``, its fingerprint (the catalog's value or what a HEAD said) or why it cannot
    be used; a null photo is image_missing. The one rule both sides apply."""
    if value is None:
        return catalog.rejected_state("image_missing")
    if not by_uri:
        return catalog.content_hash(value, title, model_sha256)
    return state_of(known, title, model_sha256)


def row_state(problem: catalog.Problem | None, image_column: str, image, known, title: str | None,
              model_sha256: str) -> str:
    """A catalog row's state: its reject state when the row breaks a rule
    (catalog.row_problem), else its image's (image_state), or for a photo list the
    product state of its photos (``known``: a value per photo)."""
    if problem is not None:
        return catalog.rejected_state(problem.reason)
    by_uri = image_column in catalog.FINGERPRINT_COLUMNS_OF
    if image_column in LIST_COLUMNS:
        return product_state([image_state(by_uri, v, k, title, model_sha256)
                              for v, k in zip(bounded(image)[0], known)])
    return image_state(by_uri, image, known, title, model_sha256)


def row_states(ids: list, titles: list, images: list, given: list, cols: catalog.Columns, fp_column: str | None,
               root: str, model_sha256: str, threads: int = 16, io: dict | None = None) -> list[str]:
    """Each catalog row's state as the diff sees it (row_state), reading no image behind a
    URI: the fingerprints the rows need and the catalog does not give are taken in bulk
    first (``of_objects``)."""
    problems = [catalog.row_problem(p, t, im) for p, t, im in zip(ids, titles, images)]
    by_uri = cols.image in catalog.FINGERPRINT_COLUMNS_OF
    listed = cols.image in LIST_COLUMNS

    def values(i: int) -> list:   # (photo value, the catalog's fingerprint of it) of a row
        if not listed:
            return [(images[i], given[i])]
        return [(v, photo_given(given[i], pos)) for pos, v in enumerate(bounded(images[i])[0])]

    wanted = [catalog.resolve_uri(root, v) for i, problem in enumerate(problems) if problem is None and by_uri
              for v, g in values(i) if v is not None and not given_of(fp_column, g)]
    fps = of_objects(wanted, threads, io) if wanted else {}

    def known(v, g):
        if not by_uri or v is None:
            return None
        return given_of(fp_column, g) or fps[catalog.resolve_uri(root, v)]

    out = []
    for i, problem in enumerate(problems):
        if problem is not None:
            out.append(row_state(problem, cols.image, None, None, None, model_sha256))
            continue
        knowns = [known(v, g) for v, g in values(i)]
        out.append(row_state(None, cols.image, images[i], knowns if listed else knowns[0],
                             titles[i].decode("utf-8"), model_sha256))
    return out
