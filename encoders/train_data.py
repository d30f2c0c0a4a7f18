"""Loading training data into memory-resident arrays (the I/O edge of training).

Pairs are joined with the catalog on ``product_id``; every image is decoded once,
with the bundle's own preprocessing, into uint8 pixels at the model's image size. A
catalog with several photos per product (``images``, contracts.photos) keeps them all:
training draws a product's positive from any of its photos.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from mimdex.encoders.images import ImageDecodeError, load_pixels
from mimdex.infra import storage
from mimdex.infra.contracts.files import read_dataset
from mimdex.infra.contracts.queries import read_queries
from mimdex.infra.contracts.photos import bounded
from mimdex.infra.errors import DataError


@dataclass
class TrainData:
    product_ids: list[str]            # the gallery: every catalog product
    titles: list[str]
    categories: list[str | None]
    product_pixels: np.ndarray        # uint8 P x S x S x 3
    train_products: np.ndarray        # gallery indices of products with street pairs
    street_product: np.ndarray        # gallery index of each street pair
    street_pixels: np.ndarray
    street_text: list[str]            # short text query ("red mug") of each street pair
    reform_product: np.ndarray        # gallery index each reformulation pair targets
    reform_pixels: np.ndarray
    reform_text: list[str]
    val_product: np.ndarray           # held-out street queries: target gallery index
    val_pixels: np.ndarray
    view_pixels: np.ndarray | None = None  # a multi-photo catalog: every photo, product by product
    view_start: np.ndarray | None = None   # product i's photos: view_pixels[view_start[i]:view_start[i + 1]]

    def product_views(self, products: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One photo of each product: its only one, or one of its photos drawn at random."""
        if self.view_pixels is None:
            return self.product_pixels[products]
        lo, hi = self.view_start[products], self.view_start[products + 1]
        return self.view_pixels[lo + rng.integers(0, hi - lo)]


def _decode_all(images: list[bytes], size: int, uri: str, ids: list[str], desc: str,
                progress: bool, draft: bool, where: list[str] | None = None) -> np.ndarray:
    """``where`` names each image in an error (default: its row and product_id)."""
    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, data in enumerate(tqdm(images, desc=desc, unit="img", disable=not progress, mininterval=1.0)):
        try:
            out[i] = load_pixels(data, size, draft)
        except ImageDecodeError as exc:
            raise DataError(f"{uri}: {where[i] if where else f'row {i} ({ids[i]})'}: {exc}") from exc
    return out


def load_train_data(data_uri: str, catalog_uri: str, image_size: int, *, max_val: int = 300,
                    progress: bool = True, jpeg_draft: bool = False) -> TrainData:
    """``data_uri``: training pairs (a table, or a dataset dir with train_pairs/ and queries/)."""
    pairs_uri = data_uri
    queries_uri = None
    if storage.exists(storage.join(data_uri, "train_pairs")):
        pairs_uri = storage.join(data_uri, "train_pairs")
        if storage.exists(storage.join(data_uri, "queries")):
            queries_uri = storage.join(data_uri, "queries")

    catalog = read_dataset(catalog_uri, "catalog", required=("product_id", "title"))
    column = next((c for c in ("image", "images") if c in catalog.column_names), None)
    if column is None:
        raise DataError(f"{catalog_uri}: missing required column 'image' (binary) or 'images' (list<binary>)")
    ids = catalog.column("product_id").to_pylist()
    index = {pid: i for i, pid in enumerate(ids)}
    if len(index) != len(ids):
        raise DataError(f"{catalog_uri}: product_id values are not unique")
    titles = catalog.column("title").to_pylist()
    cats = catalog.column("category").to_pylist() if "category" in catalog.column_names else [None] * len(ids)
    view_pixels = view_start = None
    if column == "image":
        product_pixels = _decode_all(catalog.column("image").to_pylist(), image_size, catalog_uri, ids,
                                     "decode catalog", progress, jpeg_draft)
    else:
        lists = [bounded(photos)[0] for photos in catalog.column("images").to_pylist()]
        empty = [ids[i] for i, photos in enumerate(lists) if not photos or any(p is None for p in photos)]
        if empty:
            raise DataError(f"{catalog_uri}: {len(empty)} products have no photo or a null one, e.g. {empty[:3]}")
        view_start = np.cumsum([0] + [len(photos) for photos in lists])
        where = [f"row {i} ({pid}) photo {k}" for i, (pid, photos) in enumerate(zip(ids, lists))
                 for k in range(len(photos))]
        view_pixels = _decode_all([p for photos in lists for p in photos], image_size, catalog_uri, ids,
                                  "decode catalog photos", progress, jpeg_draft, where)
        product_pixels = view_pixels[view_start[:-1]]  # the main photos: the validation gallery

    pairs = read_dataset(pairs_uri, "training pairs", required=("query_image", "product_id"))
    kinds = pairs.column("kind").to_pylist() if "kind" in pairs.column_names else ["street"] * pairs.num_rows
    texts = pairs.column("query_text").to_pylist() if "query_text" in pairs.column_names else [None] * pairs.num_rows
    targets = pairs.column("product_id").to_pylist()
    missing = sorted({t for t in targets if t not in index})
    if missing:
        raise DataError(f"{pairs_uri}: {len(missing)} product_id values are not in the catalog "
                        f"{catalog_uri}, e.g. {missing[:3]}")
    pair_pixels = _decode_all(pairs.column("query_image").to_pylist(), image_size, pairs_uri, targets,
                              "decode pairs", progress, jpeg_draft)
    street = [i for i, k in enumerate(kinds) if k != "reformulation"]
    reform = [i for i, k in enumerate(kinds) if k == "reformulation" and texts[i]]

    val_product, val_pixels = np.zeros(0, np.int64), np.zeros((0, image_size, image_size, 3), np.uint8)
    if queries_uri:
        street_q = read_queries(queries_uri, max_val).street   # the contract's street queries
        val_product = np.array([index[t] for t in street_q.targets], np.int64)
        val_pixels = _decode_all(list(street_q.images), image_size, queries_uri, list(street_q.targets),
                                 "decode validation", progress, jpeg_draft)

    street_product = np.array([index[targets[i]] for i in street], np.int64)
    return TrainData(
        product_ids=ids, titles=titles, categories=cats, product_pixels=product_pixels,
        train_products=np.unique(street_product),
        street_product=street_product, street_pixels=pair_pixels[street],
        street_text=[texts[i] or "" for i in street],
        reform_product=np.array([index[targets[i]] for i in reform], np.int64),
        reform_pixels=pair_pixels[reform], reform_text=[texts[i] for i in reform],
        val_product=val_product, val_pixels=val_pixels, view_pixels=view_pixels, view_start=view_start,
    )
