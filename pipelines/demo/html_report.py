"""The demo's HTML report: one self-contained page (thumbnails inlined as data: URIs,
so it opens the same from a laptop, an artifact store or S3, with no server).

Pure: bytes and dicts in, a string out; the demo writes it.
"""
from __future__ import annotations

import base64
import io
from html import escape

from PIL import Image

THUMB = 96

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1280px;color:#222}
h1{margin-bottom:0}.lede{color:#555;max-width:900px}
table.num{border-collapse:collapse;margin:12px 0}
table.num td,table.num th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:right}
table.num td:first-child,table.num th:first-child{text-align:left}
.best{font-weight:700}
.example{display:flex;gap:16px;align-items:flex-start;border-top:1px solid #eee;padding:10px 0}
.query{width:128px;flex:none;font-size:12px}.query img{width:128px;height:128px;border:3px solid #333}
.lane{font-size:12px;margin-bottom:6px}.lane b{display:inline-block;width:96px}
.tiles{display:inline-flex;gap:6px;vertical-align:top}
figure{margin:0;width:100px;font-size:10px;line-height:1.2}
figure img{width:96px;height:96px;border:3px solid #ccc;display:block}
figure.hit img{border-color:#1a7f37}figure.wrong img{border-color:#cf222e}
figure figcaption{height:3.6em;overflow:hidden}
.legend span{padding:1px 6px;margin-right:8px;font-size:12px}
.hit-key{border:3px solid #1a7f37}.wrong-key{border:3px solid #cf222e}.other-key{border:3px solid #ccc}
code{background:#f4f4f4;padding:1px 4px}
"""


def thumbnail(image: bytes, size: int = THUMB) -> bytes:
    """A small JPEG of an encoded image (keeps the page a few hundred KB)."""
    with Image.open(io.BytesIO(image)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        out = io.BytesIO()
        im.save(out, "JPEG", quality=85)
    return out.getvalue()


def thumb_key(result: dict) -> str:
    """Thumbnails are of the photo that matched: product_id, and #photo for a multi-photo catalog."""
    return result["product_id"] + (f"#{result['photo']}" if result.get("photo") is not None else "")


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/jpeg;base64,{base64.b64encode(data).decode()}">'


def _tiles(results: list[dict], thumbs: dict[str, bytes]) -> str:
    out = []
    for r in results:
        cls = "hit" if r["hit"] else "wrong" if r["wrong_category"] else ""
        mark = "✓ " if r["hit"] else "✗ " if r["wrong_category"] else ""
        view = f' <b>[{escape(r["view"])}]</b>' if r.get("view") else ""  # the photo that matched
        out.append(f'<figure class="{cls}">{_img(thumbs[thumb_key(r)], r["product_id"])}'
                   f'<figcaption>{mark}{escape(r["title"])}{view} <i>({r["score"]:.2f})</i></figcaption></figure>')
    return f'<div class="tiles">{"".join(out)}</div>'


def _example(ex: dict, thumbs: dict[str, bytes]) -> str:
    caption = escape(ex["target_title"])
    if ex.get("text"):
        caption = f'+ “<b>{escape(ex["text"])}</b>”<br>wanted: {caption}'
    lanes = "".join(f'<div class="lane"><b>{escape(name)}</b>{_tiles(res, thumbs)}</div>'
                    for name, res in ex["results"].items())
    return (f'<div class="example"><div class="query">{_img(ex["query_thumb"], "query")}<br>{caption}</div>'
            f'<div>{lanes}</div></div>')


def _table(header: list[str], rows: list[list], best: dict[int, str] | None = None) -> str:
    """A numeric table; ``best`` marks the max ('max') or min ('min') of a column in bold."""
    best = best or {}
    winners = {}
    for col, how in best.items():
        vals = [r[col] for r in rows if isinstance(r[col], (int, float))]
        if vals:
            winners[col] = max(vals) if how == "max" else min(vals)

    def cell(i, v):
        text = f"{v:.3f}" if isinstance(v, float) else escape(str(v))
        return f'<td class="best">{text}</td>' if winners.get(i) == v and isinstance(v, float) else f"<td>{text}</td>"

    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f'<table class="num"><tr>{head}</tr>{body}</table>'


def render(summary: dict, street: list[dict], multimodal: list[dict], thumbs: dict[str, bytes]) -> str:
    """The whole page. ``summary``: dataset, results rows, indexes, timings, storage."""
    ds = summary["dataset"]
    street_n = next((r["street_queries"] for r in summary["results"] if "street_queries" in r), 0)
    res_rows = [[r["model"], r["recall@1"], r["recall@10"], r["wrong_category@1"],
                 r.get("reform_recall@1_image", "—"), r.get("reform_recall@1_image_text", "—")]
                for r in summary["results"]]
    results = _table(["model", "recall@1", "recall@10", "top-1 wrong category", "reformulation r@1: image",
                      "reformulation r@1: image + text"], res_rows, {1: "max", 2: "max", 3: "min", 5: "max"})
    idx_rows = [[name, i["factory"], i["nlist"], i["shards"], i["vectors"], i["default_nprobe"],
                 i["bytes_per_vector"], i["heldout_recall@10"], i["version"]]
                for name, i in summary["indexes"].items()]
    indexes = _table(["model", "faiss factory", "nlist", "shards", "vectors", "default nprobe", "bytes / vector",
                      "held-out recall@10", "version"], idx_rows)
    timing_rows = [[k, round(v, 1)] for k, v in summary["timings_s"].items()]
    timings = _table(["stage", "seconds"], timing_rows + [["total", round(sum(summary["timings_s"].values()), 1)]])
    lanes = " vs ".join(escape(n) for n in summary["street_models"])
    mm_model = escape(summary.get("multimodal_model") or "")
    legend = ('<p class="legend"><span class="hit-key">✓ the photographed product</span>'
              '<span class="wrong-key">✗ another category</span><span class="other-key">same category, '
              'other product</span></p>')
    mm = (f'<h2>Multimodal search ({mm_model}): photo + a few words</h2>'
          '<p>A photo of one product plus a reformulation ("in blue") that names its sibling. '
          'The green tile is the sibling the text asks for.</p>'
          + "".join(_example(e, thumbs) for e in multimodal)) if multimodal else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>mimdex demo report</title><style>{CSS}</style></head>
<body>
<h1>mimdex demo</h1>
<p class="lede">A synthetic catalog of {ds['products']:,} products and {street_n:,} street photos of held-out
products (their families were left out of training: no model saw them). Each street photo shows the product
scaled, rotated and partly hidden over clutter painted like a product of <i>another</i> category. Pure image
matching follows that clutter; training the image tower with the product titles (3-tower) makes it follow
the product. Every number below comes from the published IVF-PQ index ({escape(summary['storage'])}), searched
at its default nprobe. Models: preset <code>{escape(str(summary.get('preset', 'tiny')))}</code>,
{escape(str(summary.get('epochs', '')))} epochs each (equal budgets).</p>
<h2>Held-out street queries</h2>{results}
<h2>Street photo → top 5: {lanes}</h2>
<p>A random sample of {len(street)} held-out street queries (seeded, not picked).</p>{legend}
{''.join(_example(e, thumbs) for e in street)}
{mm}
<h2>Indexes published</h2>{indexes}
<h2>Stage timings</h2>{timings}
<p>Machine: {escape(summary.get('machine', ''))}. JSON report: <code>{escape(summary.get('json_report', ''))}</code></p>
</body></html>
"""
