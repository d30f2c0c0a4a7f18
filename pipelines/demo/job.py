"""`mimdex demo`: the whole job on embedded defaults, ending in an HTML report.

Stages: synthetic dataset -> naive histogram baseline -> tiny image-only / 3-tower /
4-tower models (equal budgets) -> encode each with the local Ray pipeline -> build and
publish a sharded index per model with the Beam DirectRunner -> evaluate through the
published indexes -> report.

The dataset and the model bundles live in --workdir and are reused when complete (they
are the slow part). Catalog copy, embeddings and indexes go to a local S3 server the demo
starts on 127.0.0.1 and stops at the end, or, with --no-s3, to --workdir as well, where
a re-run also reuses committed encode units and indexes already published from the
same embeddings.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import traceback

from mimdex.infra import storage
from mimdex.infra.errors import MimdexError, UsageError
from mimdex.pipelines.report import StageTimer, write_report

BUCKET = "mimdex-demo"
VARIANTS = ("image-only", "3-tower", "4-tower")
STREET_LANES = ("image-only", "3-tower")  # the paper's comparison
STREET_EXAMPLES, MULTIMODAL_EXAMPLES = 8, 6


class StageFailed(MimdexError):
    """Wraps a failure with the demo stage it happened in (keeps the exit code)."""

    def __init__(self, stage: str, cause: BaseException, workdir: str):
        super().__init__(f"demo stage '{stage}' failed: {cause} (partial output kept in {workdir}; "
                         "a re-run reuses what is complete)")
        self.exit_code = getattr(cause, "exit_code", 1)


def _train(workdir: str, dataset: str, variant: str, args: argparse.Namespace, data) -> str:
    """Train a model of the demo's preset, or reuse its bundle if already complete.
    ``data``: the shared training-data loader (the three models decode the same images)."""
    from mimdex.encoders.training import TrainConfig, recipe_for
    from mimdex.pipelines import train

    preset = args.preset
    name = variant if preset == "tiny" else f"{preset}-{variant}"
    job = train.TrainJob(data=dataset, catalog=storage.join(dataset, "catalog"),
                         out=storage.join(workdir, "models", name), variant=variant, preset=preset)
    return train.train_unless_complete(
        job,
        # no validation inside training: the evaluate stage measures each model through its
        # published index (validation would embed the whole catalog once more per model)
        TrainConfig(epochs=args.epochs, batch_size=min(128, args.products // 4), seed=args.seed,
                    **{**recipe_for(preset), "validate_every": 0}),
        data=lambda: data(job))


def _shared_loader():
    """One decode of the training data for the demo's models: one dataset, one preset, so
    the same pixels (the first model that trains loads them)."""
    from mimdex.pipelines import train

    loaded = []

    def load(job):
        if not loaded:
            loaded.append(train.load_data(job))
        return loaded[0]
    return load


def _copy_catalog(dataset: str, root: str) -> str:
    """The catalog as the pipeline would find it in production: in the object store."""
    src, dst = storage.join(dataset, "catalog"), storage.join(root, "catalog")
    for uri in storage.list_files(src, ".parquet"):
        storage.write_bytes(storage.join(dst, uri.rsplit("/", 1)[-1]), storage.read_bytes(uri))
    return dst


def _published_from(index_root: str, emb_root: str) -> str | None:
    """The LATEST version if it indexes exactly the current embeddings manifest."""
    from mimdex.infra.contracts import embeddings as emb
    from mimdex.infra.contracts import index_version as iv

    version = iv.latest_version(index_root)
    if version is None:
        return None
    manifest = iv.read_manifest(index_root, version)
    current = emb.read_manifest(emb_root)
    same = (manifest.embeddings.get("uri") == emb_root
            and manifest.embeddings.get("manifest_created_at") == current.created_at
            and manifest.model.sha256 == current.model.sha256)
    return version if same else None


def _build(emb_root: str, index_root: str, shards: int, seed: int) -> str:
    from mimdex.pipelines.build_index import BuildConfig, run

    reused = _published_from(index_root, emb_root)
    if reused:
        print(f"[demo]   index {index_root} already has version {reused} from these embeddings: reused")
        return reused
    return run(BuildConfig(embeddings=emb_root, out=index_root, shards=shards, seed=seed)).version


def _index_facts(reader) -> dict:
    from mimdex.indexing.evaluate import held_out_at
    from mimdex.indexing.release import held_bytes

    m = reader.manifest
    at = held_out_at(m.evaluation, m.default_nprobe)
    total = held_bytes(m.shards, m.trained.bytes, m.params)   # the demo's indexes are fresh builds: no deltas
    return {"version": m.version, "factory": m.factory, "nlist": m.params["nlist"],
            "shards": len(m.shards), "vectors": m.counts["indexed"], "default_nprobe": m.default_nprobe,
            "bytes_per_vector": round(total / max(m.counts["indexed"], 1), 1),
            "heldout_recall@10": at.get("recall@10")}


def _evaluate(index_roots: dict[str, str], dataset: str) -> dict:
    """Each published index on the dataset's evaluation queries: the figures its quality
    gate records (indexing.query_recall), and the searches the report's examples show."""
    from mimdex.encoders.queries import query_vectors
    from mimdex.indexing.query_recall import query_recall
    from mimdex.indexing.reader import IndexReader
    from mimdex.pipelines.demo import evaluation as demo_eval
    from mimdex.pipelines.query import encoder_for

    q, cat = demo_eval.load(dataset)
    out: dict = {"metrics": {}, "indexes": {}, "street": {}, "reform_image": {}, "reform_text": {}}
    for variant, root in index_roots.items():
        reader = IndexReader.open(root)
        qv = query_vectors(encoder_for(reader), q, reader.manifest.vector)  # the manifest's model, checked
        out["metrics"][variant] = query_recall(reader, qv)
        out["indexes"][variant] = {**_index_facts(reader), "uri": root}
        shown = lambda x: reader.search_products(x, demo_eval.K) if len(x) else []  # noqa: E731
        out["street"][variant], out["reform_image"][variant] = shown(qv.street), shown(qv.reform_image)
        out["reform_text"][variant] = shown(qv.reform_fused) if qv.reform_fused is not None else None
    out["queries"], out["catalog"] = q, cat
    return out


def _examples(ev: dict, seed: int) -> tuple[list[dict], list[dict], str | None]:
    from mimdex.pipelines.demo import evaluation as demo_eval
    from mimdex.pipelines.demo.html_report import thumbnail

    q, cat = ev["queries"], ev["catalog"]
    street_q, reform_q = q.street, q.reformulation
    lanes = [v for v in STREET_LANES if v in ev["street"]]
    street = [{"query_thumb": thumbnail(street_q.images[i], 128), "target_title": cat.title[street_q.targets[i]],
               "results": {v: demo_eval.marked(ev["street"][v][i], street_q.targets[i], cat) for v in lanes}}
              for i in demo_eval.sample(len(street_q), STREET_EXAMPLES, seed)]
    mm_model = next((v for v in ("4-tower", "3-tower") if ev["reform_text"].get(v) is not None), None)
    multimodal = []
    if mm_model:
        for i in demo_eval.sample(len(reform_q), MULTIMODAL_EXAMPLES, seed):
            target = reform_q.targets[i]
            multimodal.append({
                "query_thumb": thumbnail(reform_q.images[i], 128), "text": reform_q.texts[i],
                "target_title": cat.title[target],
                "results": {"image only": demo_eval.marked(ev["reform_image"][mm_model][i], target, cat),
                            "image + text": demo_eval.marked(ev["reform_text"][mm_model][i], target, cat)}})
    return street, multimodal, mm_model


def _thumbnails(dataset: str, examples: list[dict]) -> dict[str, bytes]:
    import pyarrow.dataset as pads

    from mimdex.pipelines.demo.html_report import thumb_key, thumbnail

    shown = [r for ex in examples for res in ex["results"].values() for r in res]
    catalog = storage.parquet_dataset(storage.join(dataset, "catalog"))
    column = "image" if "image" in catalog.schema.names else "images"
    table = catalog.to_table(columns=["product_id", column],
                             filter=pads.field("product_id").isin(sorted({r["product_id"] for r in shown})))
    images = dict(zip(table.column("product_id").to_pylist(), table.column(column).to_pylist()))
    return {thumb_key(r): thumbnail(images[r["product_id"]] if column == "image"
                                    else images[r["product_id"]][r.get("photo") or 0]) for r in shown}


def _write_html(workdir: str, summary: dict, ev: dict, seed: int) -> str:
    from mimdex.pipelines.demo.html_report import render

    street, multimodal, mm_model = _examples(ev, seed)
    page = render({**summary, "street_models": [v for v in STREET_LANES if v in ev["street"]],
                   "multimodal_model": mm_model}, street, multimodal,
                  _thumbnails(summary["dataset_uri"], street + multimodal))
    path = os.path.join(workdir, "report.html")
    storage.write_bytes(path, page.encode())
    return path


def main(args: argparse.Namespace) -> int:
    from mimdex.infra.local_s3 import create_bucket, local_s3_server
    from mimdex.pipelines.demo.baseline import evaluate_histogram_nn
    from mimdex.pipelines import synth
    from mimdex.pipelines.encode import EncodeConfig, ray_session
    from mimdex.pipelines.encode import run as encode
    from mimdex.pipelines.synth import SynthConfig

    asked = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(asked) - set(VARIANTS))
    if unknown or not asked:
        raise UsageError(f"--variants: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    variants = [v for v in VARIANTS if v in asked]
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    timer = StageTimer()

    def stage(name, fn):
        print(f"[demo] stage {name} ...", flush=True)
        try:
            with timer.stage(name):
                result = fn()
        except MimdexError as exc:
            raise StageFailed(name, exc, workdir) from exc
        except Exception as exc:  # a bug: keep the trace, still name the stage
            traceback.print_exc()
            raise StageFailed(name, exc, workdir) from exc
        print(f"[demo] stage {name} done in {timer.seconds[name]:.1f} s", flush=True)
        return result

    with contextlib.ExitStack() as stack:
        if args.no_s3:
            root = workdir
        else:
            endpoint = stack.enter_context(local_s3_server())
            root = create_bucket(endpoint, BUCKET)
            print(f"[demo] local S3 server on {endpoint} (stops when the demo ends)")
        dataset = storage.join(workdir, "dataset")
        shared_data = _shared_loader()
        cfg = SynthConfig(products=args.products, queries=args.queries, seed=args.seed, views=args.views)
        synth_report = stage("synth-catalog", lambda: synth.run(cfg, dataset))
        baseline = stage("baseline-histogram-nn", lambda: evaluate_histogram_nn(dataset))
        bundles = {v: stage(f"train-{v}", lambda v=v: _train(workdir, dataset, v, args, shared_data))
                   for v in variants}
        catalog = (storage.join(dataset, "catalog") if args.no_s3
                   else stage("upload-catalog", lambda: _copy_catalog(dataset, root)))
        emb = {v: storage.join(root, "embeddings", v) for v in variants}
        index = {v: storage.join(root, "index", v) for v in variants}
        # A pretrained image tower is the encode's bottleneck (measured on 2 cores: decode
        # 1,300 products/s, the model 46 on one thread): it gets every core, and the decode
        # tasks, idle most of the time, share one with it
        encode_cpus = {} if args.preset == "tiny" else {"encoder_cpus": os.cpu_count() or 1, "decode_cpus": 0.5}
        with ray_session():  # one local Ray for the three encodes
            for v in variants:
                stage(f"encode-{v}", lambda v=v: encode(EncodeConfig(model=bundles[v], catalog=catalog, out=emb[v],
                                                                     **encode_cpus)))
        versions = {v: stage(f"build-index-{v}", lambda v=v: _build(emb[v], index[v], args.shards, args.seed))
                    for v in variants}
        ev = stage("evaluate", lambda: _evaluate(index, dataset))
        storage_desc = ("a local directory" if args.no_s3 else f"{root} on a local S3 server")
        results = [{"model": "histogram NN (exact)", **baseline}] + [{"model": v, **ev["metrics"][v]} for v in variants]
        summary = {"preset": args.preset, "epochs": args.epochs,
                   "dataset": synth_report["counts"], "dataset_uri": dataset, "storage": storage_desc,
                   "models": {v: {"bundle": bundles[v], "index": index[v], "version": versions[v]} for v in variants},
                   "results": results, "indexes": ev["indexes"],
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {sys.version.split()[0]}"}
        with timer.stage("report"):
            summary["timings_s"] = timer.seconds
            summary["json_report"] = write_report(workdir, "demo", {**summary, "baseline_histogram_nn": baseline})
            html = _write_html(workdir, summary, ev, args.seed)
    _print_summary(results)
    print(summary["json_report"])
    print(html)
    return 0


def _print_summary(results: list[dict]) -> None:
    print(f"[demo] {'model':<22} recall@1  recall@10  top-1 wrong category  reform r@1 image / +text")
    for r in results:
        reform = (f"{r['reform_recall@1_image']:.3f} / " + (f"{r['reform_recall@1_image_text']:.3f}"
                  if "reform_recall@1_image_text" in r else "—")) if "reform_recall@1_image" in r else ""
        print(f"[demo] {r['model']:<22} {r['recall@1']:>8.3f}  {r['recall@10']:>9.3f}  "
              f"{r['wrong_category@1']:>20.3f}  {reform}")
