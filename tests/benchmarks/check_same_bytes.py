"""A single-image catalog through this tree and through an older one: every output file
(synth tables, embedding parts and rejects, index shards, id maps, trained index) must be
byte for byte the same. Manifests and reports carry times, so they are left out.

    git worktree add /tmp/mimdex-old 1e6a80f
    .venv/bin/python tests/benchmarks/check_same_bytes.py --old /tmp/mimdex-old

Each tree runs in its own process, with ``mimdex.*`` mapped onto that tree's folders; both
encode the same catalog file (a unit's fingerprint covers the file's mtime) with the same
untrained model bundle.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBPACKAGES = ("encoders", "indexing", "pipelines", "infra")

RUN = """
import sys
from mimdex.pipelines.build_index import BuildConfig, run as build
from mimdex.pipelines.encode import EncodeConfig, run as encode
data, model, out = sys.argv[1:4]
encode(EncodeConfig(model=model, catalog=data + "/catalog", out=out + "/emb", unit_rows=128, progress=False))
build(BuildConfig(embeddings=out + "/emb", out=out + "/index", shards=3, eval_queries=100, queries=data + "/queries"))
"""


def _mapped(tree: str, work: str) -> str:
    """A folder holding mimdex/<subpackage> links into ``tree`` (for PYTHONPATH)."""
    root = os.path.join(work, "pkg-" + hashlib.sha256(tree.encode()).hexdigest()[:8])
    os.makedirs(os.path.join(root, "mimdex"), exist_ok=True)
    for name in SUBPACKAGES:
        os.symlink(os.path.join(tree, name), os.path.join(root, "mimdex", name))
    return root


def _hashes(out: str) -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(out):
        for name in files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, out)
            if "_reports" in rel or name.endswith(".json") or name in ("LATEST", ".LATEST.lock"):
                continue
            if "/versions/" in rel:  # version names carry the time
                head, tail = rel.split("/versions/")
                rel = f"{head}/versions/V/{tail.split('/', 1)[1]}"
            with open(path, "rb") as f:
                found[rel] = hashlib.sha256(f.read()).hexdigest()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="a checkout of the older tree (git worktree add DIR COMMIT)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="same-bytes-") as work:
        setup = ("import sys; sys.path.insert(0, 'tests'); from conftest import random_bundle; "
                 "import pyarrow.dataset as ds; from mimdex.pipelines import synth; "
                 "from mimdex.pipelines.synth import SynthConfig; "
                 "synth.run(SynthConfig(products=400, queries=20, seed=3), sys.argv[1], workers=2, progress=False); "
                 "random_bundle(sys.argv[2], ds.dataset(sys.argv[1] + '/catalog').to_table()"
                 ".column('title').to_pylist())")
        data, model = os.path.join(work, "data"), os.path.join(work, "model")
        subprocess.run([sys.executable, "-c", setup, data, model], cwd=HERE, check=True)
        result = {}
        for name, tree in (("old", os.path.abspath(args.old)), ("new", HERE)):
            out = os.path.join(work, name)
            env = {**os.environ, "PYTHONPATH": _mapped(tree, work)}
            subprocess.run([sys.executable, "-c", RUN, data, model, out], cwd=HERE, env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result[name] = _hashes(out)
    old, new = result["old"], result["new"]
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    print(json.dumps({"files": len(old), "differ": differ}, indent=1))
    print(f"{len(old)} output files, {len(differ)} differ: {'SAME BYTES' if not differ else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
