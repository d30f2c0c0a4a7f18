"""A street-to-shop dataset from real drawings nobody on the project made: the Material
Design Icons of the npm package @mdi/svg (Apache-2.0), their names, aliases and the
package's own category tags.

    .venv/bin/python tests/benchmarks/icon_dataset.py --out bench-output/icons/dataset [--mdi PATH/package]

What it writes is a dataset directory as `mimdex synth-catalog` writes one
(catalog/, train_pairs/, queries/, manifest.json), so training, encoding and
`pipelines.train.evaluate_bundle` read it unchanged:

* a product is an icon of the package (not deprecated, tagged, not an ``-outline``
  variant, not in a category that is not a thing: letters, logos, emoji, arrows,
  shapes ...); its title is its name and aliases in words ("cart plus, add shopping
  cart"); its category the first of its tags;
* its catalog image is the *filled* drawing, centred on white (a studio shot);
* a street photo of it is the package's *outline* drawing of the same item (a
  different rendering by the same designers), scaled, turned and placed off centre on
  a cluttered background: a texture and filled drawings of other products, the very
  local patterns a pure image matcher is misled by;
* a reformulation is a street photo of a sibling (``airplane``) and the words that
  make the target (``airplane-off``: "off");
* a quarter of the products (by a seeded hash of the name) are held out: their street
  photos and reformulations are the evaluation queries, and no training pair names them.

The package is fetched with `npm pack` (the npm registry; npm checks its integrity) and
its meta.json must be the pinned file. Rendering: resvg (the PyPI package resvg-py,
installed on first use beside the project, under bench-output/.deps/resvg, not into
it) and Pillow. Same arguments, same bytes.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from registry import npm_unpack, pip_beside  # noqa: E402

PACKAGE = "@mdi/svg@7.4.47"
META_SHA256 = "ed9d7c7a5ca3ce7dee023fb6c1d62715dbec5b27503d268cbc10b9c8894ef3e8"
# Tags that name no thing a shopper could photograph (and emoji, which the benchmark must not use).
NOT_THINGS = frozenset({"Alpha / Numeric", "Brand / Logo", "Arrow", "Text / Content / Format", "Math", "Form",
                        "Tooltip", "Vector", "Emoji", "Shape"})
HELD_OUT = 0.25
RESVG = "resvg-py==0.5.0"
DEPS = os.path.join("bench-output", ".deps", "resvg")
SIZE = 160          # rendered pixels (the pretrained presets train at 128)


@dataclass(frozen=True)
class Product:
    name: str            # the icon's name: the product_id
    title: str
    category: str
    outline: bool        # the package draws it in outline too: it has street photos
    held_out: bool
    query: str           # what a shopper types for it: its first alias, else the first word of its name


@dataclass(frozen=True)
class Reform:
    sibling: str         # the product in the photo
    target: str          # the product to find
    text: str            # what makes the sibling the target


@dataclass(frozen=True)
class Plan:
    products: tuple[Product, ...]
    reforms: tuple[Reform, ...]


def words(name: str) -> str:
    return name.replace("-", " ")


def _held_out(name: str, seed: int) -> bool:
    h = int.from_bytes(hashlib.sha256(f"{seed}\t{name}".encode()).digest()[:8], "little")
    return h / 2.0 ** 64 < HELD_OUT


TITLES = ("name", "department")


def plan(meta: list[dict], seed: int = 0, max_aliases: int = 2, titles: str = "name") -> Plan:
    """The products, their split and the reformulations, from the package's meta.json
    alone (pure: tested on a made-up meta). ``titles``: "name", the name and aliases in
    words; "department", followed by the category in brackets, as a catalog lists a
    product under its department ("rabbit, bunny (Animal)")."""
    names = {m["name"] for m in meta}
    products = []
    for m in sorted(meta, key=lambda m: m["name"]):
        if m.get("deprecated") or not m.get("tags") or m["name"].endswith("-outline") or m["tags"][0] in NOT_THINGS:
            continue
        title = ", ".join([words(m["name"])] + [words(a) for a in m.get("aliases", [])[:max_aliases]])
        if titles == "department":
            title = f"{title} ({m['tags'][0]})"
        query = words(m["aliases"][0]) if m.get("aliases") else m["name"].split("-")[0]
        products.append(Product(m["name"], title, m["tags"][0], f"{m['name']}-outline" in names,
                                _held_out(m["name"], seed), query))
    known = {p.name for p in products}
    reforms = []
    for p in products:   # airplane-off: airplane + "off"; airplane-landing: airplane + "landing"
        parts = p.name.split("-")
        for cut in range(len(parts) - 1, 0, -1):
            sibling = "-".join(parts[:cut])
            if sibling in known:
                reforms.append(Reform(sibling, p.name, " ".join(parts[cut:])))
                break
    return Plan(tuple(products), tuple(reforms))


# -- rendering ---------------------------------------------------------------------------

def _colour(name: str) -> tuple[int, int, int]:
    """A product's own colour (its studio shot and street photos share it), never near white."""
    h = hashlib.sha256(name.encode()).digest()
    return tuple(int(v) * 3 // 4 for v in h[:3])


def resvg_path() -> str | None:
    """Where resvg-py is importable from: the environment, else DEPS (pip-installed there
    from PyPI once, with pip, beside the project's environment)."""
    if importlib.util.find_spec("resvg_py") is not None:
        return None
    return pip_beside(DEPS, [RESVG])


def _glyph(svg: str, size: int, colour: tuple[int, int, int]) -> Image.Image:
    """The drawing as an RGBA image of ``size`` px in one colour (the paths take currentColor's black)."""
    import resvg_py

    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size)
    alpha = Image.open(io.BytesIO(bytes(png))).convert("RGBA").getchannel("A")
    out = Image.new("RGBA", (size, size), colour + (255,))
    out.putalpha(alpha)
    return out


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def catalog_image(svg: str, name: str) -> bytes:
    img = Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    g = _glyph(svg, int(SIZE * 0.8), _colour(name))
    img.paste(g, ((SIZE - g.width) // 2, (SIZE - g.height) // 2), g)
    return _jpeg(img, 92)


def _background(rng: np.random.Generator) -> Image.Image:
    """A texture: a two-colour gradient with stripes or blotches and noise."""
    a, b = rng.integers(60, 256, 3), rng.integers(60, 256, 3)
    t = np.linspace(0, 1, SIZE)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, SIZE)[:, None, None]
    px = (a * (1 - t) + b * t) * np.ones((SIZE, SIZE, 1))
    img = Image.fromarray(px.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        c = tuple(int(v) for v in rng.integers(40, 256, 3))
        x0, y0 = rng.integers(-SIZE // 2, SIZE, 2)
        w, h = rng.integers(10, SIZE, 2)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=c)
    noise = rng.normal(0, 12, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def street_image(outline_svg: str, name: str, distractors: list[tuple[str, str]], seed: int) -> bytes:
    """The outline drawing on clutter: ``distractors`` (svg, name) are other products'
    filled drawings in their own colours, partly off the frame, under the product."""
    rng = np.random.default_rng(seed)
    img = _background(rng).convert("RGBA")
    for svg, other in distractors:
        g = _glyph(svg, int(SIZE * rng.uniform(0.3, 0.55)), _colour(other)).rotate(float(rng.uniform(-30, 30)),
                                                                                  expand=True)
        img.alpha_composite(g, (int(rng.integers(-g.width // 3, SIZE - 2 * g.width // 3)),
                                int(rng.integers(-g.height // 3, SIZE - 2 * g.height // 3))))
    jitter = rng.uniform(0.75, 1.15)
    colour = tuple(int(min(255, v * jitter)) for v in _colour(name))
    g = _glyph(outline_svg, int(SIZE * rng.uniform(0.5, 0.75)), colour).rotate(float(rng.uniform(-20, 20)),
                                                                               expand=True)
    g = g.resize((min(g.width, SIZE), min(g.height, SIZE)))
    img.alpha_composite(g, (int(rng.integers(0, SIZE - g.width + 1)), int(rng.integers(0, SIZE - g.height + 1))))
    img = img.convert("RGB").filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 0.8))))
    return _jpeg(img, int(rng.integers(60, 90)))


# -- the dataset -------------------------------------------------------------------------

_SVG: dict[str, str] = {}


def _init(svg_dir: str, deps: str | None) -> None:
    _SVG["dir"] = svg_dir
    if deps and deps not in sys.path:
        sys.path.insert(0, deps)


def _svg(name: str) -> str:
    with open(os.path.join(_SVG["dir"], f"{name}.svg")) as f:
        return f.read()


def _render(job: tuple) -> bytes:
    kind, name, others, seed = job
    if kind == "catalog":
        return catalog_image(_svg(name), name)
    photo = f"{name}-outline" if os.path.exists(os.path.join(_SVG["dir"], f"{name}-outline.svg")) else name
    return street_image(_svg(photo), name, [(_svg(o), o) for o in others], seed)


def _street_jobs(p: Plan, name: str, count: int, seed: int, salt: str) -> list[tuple]:
    h = int.from_bytes(hashlib.sha256(f"{seed}\t{salt}\t{name}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(h)
    jobs = []
    for _ in range(count):
        others = [p.products[i].name for i in rng.choice(len(p.products), int(rng.integers(2, 5)), replace=False)
                  if p.products[i].name != name]
        jobs.append(("street", name, others, int(rng.integers(1 << 62))))
    return jobs


def _write(out: str, table: str, t: pa.Table) -> dict:
    path = os.path.join(out, table, "part-00000.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    pq.write_table(t, tmp, compression="zstd", row_group_size=512)
    os.replace(tmp, path)
    with open(path, "rb") as f:
        return {"path": f"{table}/part-00000.parquet", "rows": t.num_rows,
                "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


QUERY_SCHEMA = pa.schema([("query_image", pa.binary()), ("product_id", pa.string()), ("query_text", pa.string()),
                          ("kind", pa.string()), ("source_product_id", pa.string())])


def build(mdi: str, out: str, seed: int = 0, train_photos: int = 3, query_photos: int = 2,
          limit: int | None = None, titles: str = "name", workers: int | None = None) -> dict:
    """The dataset at ``out`` from the unpacked package at ``mdi``; ``limit``: the first
    products of a seeded shuffle only (quick runs)."""
    with open(os.path.join(mdi, "meta.json"), "rb") as f:
        raw = f.read()
    sha = hashlib.sha256(raw).hexdigest()
    if sha != META_SHA256:
        raise SystemExit(f"{mdi}/meta.json: sha256 {sha}, expected {META_SHA256} ({PACKAGE})")
    p = plan(json.loads(raw), seed, titles=titles)
    if limit is not None:
        keep = set(np.random.default_rng(seed).permutation([q.name for q in p.products])[:limit].tolist())
        p = Plan(tuple(q for q in p.products if q.name in keep),
                 tuple(r for r in p.reforms if r.sibling in keep and r.target in keep))
    by = {q.name: q for q in p.products}
    street = [q for q in p.products if q.outline]
    pairs = [(q.name, q.query, "street", q.name, j) for q in street if not q.held_out
             for j in _street_jobs(p, q.name, train_photos, seed, "train")]
    pairs += [(r.target, r.text, "reformulation", r.sibling, j) for r in p.reforms if not by[r.target].held_out
              for j in _street_jobs(p, r.sibling, 1, seed, f"reform {r.target}")]
    queries = [(q.name, q.query, "street", q.name, j) for q in street if q.held_out
               for j in _street_jobs(p, q.name, query_photos, seed, "query")]
    queries += [(r.target, r.text, "reformulation", r.sibling, j) for r in p.reforms if by[r.target].held_out
                for j in _street_jobs(p, r.sibling, 1, seed, f"reform {r.target}")]
    jobs = [("catalog", q.name, [], 0) for q in p.products] + [j for *_, j in pairs] + [j for *_, j in queries]
    ctx = multiprocessing.get_context("spawn")   # the caller may hold torch's threads
    with ProcessPoolExecutor(workers or os.cpu_count(), ctx, initializer=_init,
                             initargs=(os.path.join(mdi, "svg"), resvg_path())) as ex:
        images = list(ex.map(_render, jobs, chunksize=64))
    cat_img, rest = images[:len(p.products)], images[len(p.products):]
    files = {"catalog": _write(out, "catalog", pa.table({
        "product_id": [q.name for q in p.products], "title": [q.title for q in p.products],
        "category": [q.category for q in p.products], "image": pa.array(cat_img, pa.binary())}))}
    for name, rows, imgs in (("train_pairs", pairs, rest[:len(pairs)]), ("queries", queries, rest[len(pairs):])):
        files[name] = _write(out, name, pa.table({
            "query_image": pa.array(imgs, pa.binary()), "product_id": [r[0] for r in rows],
            "query_text": [r[1] for r in rows], "kind": [r[2] for r in rows],
            "source_product_id": [r[3] for r in rows]}, schema=QUERY_SCHEMA))
    counts = {"products": len(p.products), "categories": len({q.category for q in p.products}),
              "held_out_products": sum(q.held_out for q in p.products),
              "street_train_pairs": sum(r[2] == "street" for r in pairs),
              "reformulation_train_pairs": sum(r[2] == "reformulation" for r in pairs),
              "street_queries": sum(r[2] == "street" for r in queries),
              "reformulation_queries": sum(r[2] == "reformulation" for r in queries)}
    manifest = {"kind": "mimdex-icon-dataset/1", "source": {"package": PACKAGE, "meta_sha256": sha},
                "config": _config(seed, train_photos, query_photos, limit, titles), "counts": counts, "tables": files}
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _config(seed: int, train_photos: int, query_photos: int, limit: int | None, titles: str) -> dict:
    return {"seed": seed, "train_photos": train_photos, "query_photos": query_photos, "limit": limit,
            "titles": titles, "size": SIZE, "held_out": HELD_OUT}


def fetch(work: str) -> str:
    """The package `npm pack`ed into ``work`` and unpacked (registry.npm_unpack)."""
    return npm_unpack(PACKAGE, work)


def ensure(out: str, mdi: str | None, work: str, **kw) -> dict:
    """The dataset at ``out``, built unless a complete one with the same config is there."""
    path = os.path.join(out, "manifest.json")
    if os.path.exists(path):
        with open(path) as f:
            m = json.load(f)
        want = _config(kw.get("seed", 0), kw.get("train_photos", 3), kw.get("query_photos", 2), kw.get("limit"),
                       kw.get("titles", "name"))
        if m.get("config") == want:
            return m
    return build(mdi or fetch(work), out, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--mdi", help="the unpacked @mdi/svg package (default: npm pack into <out>.npm)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--titles", choices=TITLES, default="name")
    args = ap.parse_args()
    m = ensure(args.out, args.mdi, args.out.rstrip("/") + ".npm", seed=args.seed, limit=args.limit,
               titles=args.titles)
    print(json.dumps(m["counts"]))


if __name__ == "__main__":
    sys.exit(main())
