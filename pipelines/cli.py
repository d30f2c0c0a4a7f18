"""The `mimdex` command line (DESIGN.md, "CLI").

Exit codes: 0 done, 2 usage or config error, 65 bad input data, 75 transient failure
(safe to retry), 99 nothing to do. Every job ends by writing a JSON report next to its
output and printing that report's URI as the last line of stdout.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from mimdex.infra.errors import DataError, MimdexError, NothingToDo, UsageError

Handler = Callable[[argparse.Namespace], int]



def _add_synth(sub) -> None:
    p = sub.add_parser("synth-catalog", help="write a deterministic synthetic street-to-shop dataset",
                       description="Write catalog/, train_pairs/ and queries/ Parquet tables "
                                   "(plus manifest.json) under --out.")
    p.add_argument("--out", required=True, help="dataset directory URI (local path or s3://...)")
    p.add_argument("--products", type=int, required=True, help="number of catalog products")
    p.add_argument("--queries", type=int, required=True,
                   help="street queries of held-out products (plus half as many reformulations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout-frac", type=float, default=0.2, help="share of product families held out")
    p.add_argument("--pairs-per-product", type=int, default=2, help="street photos per training product")
    p.add_argument("--image-size", type=int, default=160, help="rendered image side in pixels")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from mimdex.pipelines.report import write_report
    from mimdex.pipelines.synth import job
    from mimdex.pipelines.synth.plan import SynthConfig

    cfg = SynthConfig(products=args.products, queries=args.queries, seed=args.seed,
                      heldout_frac=args.heldout_frac, pairs_per_product=args.pairs_per_product,
                      image_size=args.image_size)
    report = job.run(cfg, args.out, workers=args.workers, progress=not args.no_progress)
    counts = report["counts"]
    state = "already complete, nothing rewritten" if report["skipped"] else "written"
    print(f"dataset {state}: {counts['products']} products "
          f"({counts['heldout_products']} held out), {counts['train_pairs']} training pairs, "
          f"{counts['queries']} queries -> {args.out}")
    print(write_report(args.out, "synth-catalog", report))
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train the image-only / 3-tower / 4-tower towers into a model bundle")
    p.add_argument("--data", required=True, help="training pairs table, or a dataset dir with train_pairs/ "
                   "(and queries/ for validation)")
    p.add_argument("--catalog", required=True, help="catalog table the pairs join on product_id")
    p.add_argument("--variant", required=True, choices=["image-only", "3-tower", "4-tower"])
    p.add_argument("--preset", default="tiny", choices=["tiny", "base"])
    p.add_argument("--out", required=True, help="model bundle URI")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint under --out")
    p.add_argument("--clip-checkpoint", help="local CLIP .safetensors (OpenAI/open_clip key names) to start from")
    p.add_argument("--bert-checkpoint", help="local BERT-style dir (config.json, model.safetensors, "
                   "tokenizer.json) for the text tower")
    p.add_argument("--tokenizer", help="local tokenizer.json to use instead of training one")
    p.add_argument("--weights", help='loss weights as JSON, e.g. \'{"query_title": 1.0}\'')
    p.add_argument("--batching", choices=["random", "similar"], default="random",
                   help="similar: batches of products with similar colour statistics (hard negatives)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from mimdex.encoders.config import LossWeights
    from mimdex.encoders.training import TrainConfig
    from mimdex.pipelines import train_job
    from mimdex.pipelines.report import write_report

    try:
        weights = LossWeights(**json.loads(args.weights)) if args.weights else LossWeights()
    except (ValueError, TypeError) as exc:
        raise UsageError(f"--weights: {exc}") from exc
    for flag in ("epochs", "batch_size", "checkpoint_every"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1")
    job = train_job.TrainJob(data=args.data, catalog=args.catalog, out=args.out, variant=args.variant,
                             preset=args.preset, resume=args.resume, clip_checkpoint=args.clip_checkpoint,
                             bert_checkpoint=args.bert_checkpoint, tokenizer=args.tokenizer, threads=args.threads)
    tcfg = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, checkpoint_every=args.checkpoint_every, weights=weights,
                       batching=args.batching)
    report = train_job.run(job, tcfg, progress=not args.no_progress)
    last = report["history"][-1] if report["history"] else {}
    print(f"model bundle written: {args.out} (variant {args.variant}, {report['train']['steps']} steps, "
          + ", ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith(("recall", "wrong"))) + ")")
    print(write_report(args.out, "train", report))
    return 0


def _add_encode(sub) -> None:
    p = sub.add_parser("encode", help="batch-encode a catalog into embedding shards on Ray",
                       description="Encode every catalog product's image and title with a model bundle into "
                                   "Parquet shards (one per work unit) under --out, resumably: a re-run "
                                   "skips committed units. Bad rows go to rejects/ with a reason.")
    p.add_argument("--model", required=True, help="model bundle URI")
    p.add_argument("--catalog", required=True, help="catalog Parquet file or directory URI")
    p.add_argument("--out", required=True, help="embeddings root URI")
    p.add_argument("--ray-address", help="join this Ray cluster (e.g. ray://head:10001 or auto); "
                   "default: start an embedded local Ray sized to this machine")
    p.add_argument("--unit-rows", type=int, default=2048, help="target rows per work unit (whole row groups)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=256, help="encoder forward batch (1024+ on a GPU)")
    p.add_argument("--encoders", type=int, help="encoder actors (default: one per GPU, else 1)")
    p.add_argument("--encoder-cpus", type=int, help="torch threads per CPU encoder actor (default: half the CPUs)")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task")
    p.add_argument("--max-in-flight", type=int, help="units decoding or encoding at once "
                   "(default: decode slots + 2 per actor)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    from mimdex.infra.errors import DataError, TransientError
    from mimdex.pipelines.encode.config import EncodeConfig
    from mimdex.pipelines.encode.job import run
    from mimdex.pipelines.report import write_report

    cfg = EncodeConfig(model=args.model, catalog=args.catalog, out=args.out, ray_address=args.ray_address,
                       unit_rows=args.unit_rows, dtype=args.dtype, batch_size=args.batch_size,
                       encoders=args.encoders, encoder_cpus=args.encoder_cpus, decode_cpus=args.decode_cpus,
                       max_in_flight=args.max_in_flight, progress=not args.no_progress)
    report = run(cfg)
    c = report["counts"]
    print(f"encode: {c['units_encoded']} units encoded, {c['units_skipped']} already committed; "
          f"{c['read']} rows read, {c['encoded']} encoded, {c['rejected']} rejected"
          + (f" ({report['products_per_s']} products/s)" if report["products_per_s"] else "") + f" -> {args.out}")
    report_uri = write_report(args.out, "encode", report)
    print(report_uri)
    if not report["complete"]:
        fails = report["failed_units"]
        cls = DataError if all(f["exit_code"] == DataError.exit_code for f in fails) else TransientError
        raise cls(f"{len(fails)} of {c['units']} units failed (first: {fails[0]['error']}); committed units "
                  f"are kept and a re-run encodes only the rest; report: {report_uri}")
    return 0


def _add_build_index(sub) -> None:
    p = sub.add_parser("build-index", help="build and publish sharded IVF-PQ indexes with Beam",
                       description="Train IVF-PQ once on a sample, add vectors per (input part, shard) on Apache "
                                   "Beam, merge per shard, evaluate against exact search, publish a new version "
                                   "and point LATEST at it. Unrecognised --flags are Beam pipeline options "
                                   "(e.g. --runner=FlinkRunner); the default is the DirectRunner.")
    p.add_argument("--embeddings", required=True, help="embeddings root (with manifest.json)")
    p.add_argument("--out", required=True, help="index root URI")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--vector", choices=["image", "text", "fused"], default="image")
    p.add_argument("--factory", help="explicit faiss factory string, e.g. IVF1024,PQ64x4fs")
    p.add_argument("--max-index-memory", help="memory budget for the whole index, e.g. 4G")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@10 (vs exact) the default nprobe must reach")
    p.add_argument("--min-recall", type=float, help="do not publish below this recall@10 at the default nprobe")
    p.add_argument("--queries", help="street queries to evaluate with (encoded with the embeddings' model)")
    p.add_argument("--eval-queries", type=int, default=1000, help="held-out catalog vectors to evaluate with")
    p.add_argument("--train-size", type=int, help="training sample size (default: 64 per IVF list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-metadata", action="store_true", help="id maps without the catalog's metadata columns")
    p.set_defaults(handler=_run_build_index, passes_through=True)


def _run_build_index(args: argparse.Namespace) -> int:
    from mimdex.indexing.params import parse_memory
    from mimdex.pipelines.build_index.job import BuildConfig, QualityGateFailed, run
    from mimdex.pipelines.report import write_report

    cfg = BuildConfig(embeddings=args.embeddings, out=args.out, shards=args.shards, vector=args.vector,
                      factory=args.factory,
                      max_index_memory=parse_memory(args.max_index_memory) if args.max_index_memory else None,
                      recall_target=args.recall_target, min_recall=args.min_recall, queries=args.queries,
                      eval_queries=args.eval_queries, train_size=args.train_size, seed=args.seed, metadata=not args.no_metadata)
    try:
        report = run(cfg, args.extra)
    except QualityGateFailed as exc:
        print(write_report(args.out, "build-index", {"published": False, "error": str(exc)}))
        raise
    held = report["evaluation"].get("held_out", {})
    row = next((r for r in held.get("sweep", []) if r["nprobe"] == report["default_nprobe"]), {})
    print(f"build-index: version {report['version']} published ({report['counts']['indexed']} vectors, "
          f"{args.shards} shards, {report['params']['factory']}, nprobe {report['default_nprobe']}: "
          + ", ".join(f"{k} {v}" for k, v in row.items() if k.startswith("recall")) + f") -> {args.out}")
    print(write_report(args.out, "build-index", report))
    return 0


def _add_search(sub) -> None:
    p = sub.add_parser("search", help="search a published index with an image and optional text")
    p.add_argument("--index", required=True, help="index root URI")
    p.add_argument("--image", help="query image file (any fsspec URI)")
    p.add_argument("--text", help="text query, or reformulation text fused with --image")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--nprobe", type=int, help="default: the manifest's, chosen at build time")
    p.add_argument("--version", help="search this version instead of LATEST")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    import json

    from mimdex.indexing.reader import IndexReader
    from mimdex.infra import storage
    from mimdex.pipelines.query import encoder_for, query_vectors

    if args.k < 1:
        raise UsageError("-k must be at least 1")
    reader = IndexReader.open(args.index, args.version)
    enc = encoder_for(reader)
    image = storage.read_bytes(args.image) if args.image else None
    try:
        vector = query_vectors(enc, [image] if image else None, [args.text] if args.text else None)
    except ValueError as exc:  # an undecodable query image
        raise DataError(f"--image {args.image}: {exc}") from exc
    results = reader.search_products(vector, args.k, args.nprobe)[0]
    if args.json:
        print(json.dumps({"version": reader.version, "results": results}, ensure_ascii=False, default=str))
        return 0
    print(f"index version {reader.version}, {reader.ntotal} products")
    for rank, r in enumerate(results, 1):
        print(f"{rank:>3}  {r['score']:.4f}  {r['product_id']}  {r.get('title') or ''}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="recall@k of a published index on street queries")
    p.add_argument("--index", required=True)
    p.add_argument("--queries", required=True, help="Parquet with query_image, product_id [, query_text]")
    p.add_argument("--nprobe", type=int)
    p.add_argument("--version")
    p.add_argument("--limit", type=int, help="evaluate the first N queries only")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    import json

    from mimdex.indexing.reader import IndexReader
    from mimdex.pipelines.query import evaluate_queries
    from mimdex.pipelines.report import write_report

    reader = IndexReader.open(args.index, args.version)
    result = evaluate_queries(reader, args.queries, args.nprobe, args.limit)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"eval: version {result['version']}, {result['queries']} queries, nprobe {result['nprobe']}: "
              + ", ".join(f"{k} {v}" for k, v in result.items() if k.startswith("recall")))
    print(write_report(args.index, "eval", {"queries_uri": args.queries, **result}))
    return 0


def _add_versions(sub) -> None:
    p = sub.add_parser("versions", help="list index versions; --prune applies retention",
                       description="List the versions under an index root (time, vectors, model, recall, which "
                                   "one LATEST names). With --prune, delete versions beyond the newest --keep, "
                                   "never LATEST, the version it replaced, or anything younger than --grace-hours.")
    p.add_argument("--index", required=True)
    p.add_argument("--json", action="store_true")
    p.add_argument("--prune", action="store_true", help="apply retention")
    p.add_argument("--keep", type=int, default=5, help="complete versions to keep (with --prune)")
    p.add_argument("--grace-hours", type=float, default=24.0,
                   help="never delete versions younger than this (readers and unpublished builds)")
    p.set_defaults(handler=_run_versions)


def _run_versions(args: argparse.Namespace) -> int:
    import json

    from mimdex.indexing import versions
    from mimdex.pipelines.report import write_report

    if args.prune:
        result = versions.prune(args.index, args.keep, args.grace_hours)
        print(f"versions: deleted {len(result['deleted'])} ({', '.join(result['deleted']) or 'none'}), "
              f"kept {len(result['kept'])}")
        print(write_report(args.index, "prune", result))
        return 0
    rows = versions.describe(args.index)
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print(f"no versions under {args.index}")
    for r in rows:
        if not r["complete"]:
            print(f"   {r['version']}  incomplete (no manifest)")
            continue
        print(f"{'*' if r['latest'] else ' '}  {r['version']}  {r['vectors']:>10} vectors  {r['shards']} shards  "
              f"{r['factory']}  nprobe {r['nprobe']}  recall@10 {r['recall_at_10']}  model {r['model']} "
              f"({r['variant']}, {r['vector']})")
    return 0


def _add_rollback(sub) -> None:
    p = sub.add_parser("rollback", help="point LATEST back at an older complete version")
    p.add_argument("--index", required=True)
    p.add_argument("--to", required=True, help="the version to serve (see `mimdex versions`)")
    p.set_defaults(handler=_run_rollback)


def _run_rollback(args: argparse.Namespace) -> int:
    from mimdex.indexing import versions
    from mimdex.pipelines.report import write_report

    result = versions.rollback(args.index, args.to)
    print(f"rollback: LATEST now names {result['to']} (was {result['from']})")
    print(write_report(args.index, "rollback", result))
    return 0


def _refresh_args(p, backfill: bool) -> None:
    p.add_argument("--catalog", required=True)
    if backfill:
        p.add_argument("--ids", required=True, help="file with one product_id per line")
    p.add_argument("--model", required=True, help="model bundle URI")
    p.add_argument("--embeddings", required=True, help="embeddings root (runs/, manifests/, manifest.json)")
    p.add_argument("--index", required=True, help="index root")
    p.add_argument("--shards", type=int, default=4, help="shards of a first build (later versions keep theirs)")
    p.add_argument("--vector", choices=["image", "text", "fused"], default="image", help="for a first build")
    p.add_argument("--max-drift", type=float, default=1.25,
                   help="retrain when the new vectors' coarse MSE exceeds this multiple of the training MSE")
    p.add_argument("--max-change", type=float, default=0.25,
                   help="retrain when more than this share of the catalog was added, changed or deleted")
    p.add_argument("--max-recall-drop", type=float, default=0.05,
                   help="retrain when new vectors find themselves (top 10) this much less often than old ones")
    p.add_argument("--keep", type=int, default=5, help="index versions retention keeps")
    p.add_argument("--grace-hours", type=float, default=24.0, help="retention never deletes younger versions")
    p.add_argument("--lock-ttl-hours", type=float, default=6.0, help="break a lock older than this")
    p.add_argument("--min-recall", type=float)
    p.add_argument("--eval-queries", type=int, default=1000)
    p.add_argument("--ray-address")
    p.add_argument("--unit-rows", type=int, default=2048)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_refresh)


def _add_refresh(sub) -> None:
    p = sub.add_parser("refresh", help="nightly refresh: re-encode changed products, publish a new version",
                       description="Diff the catalog against the current embeddings by content_hash, encode only "
                                   "new and changed products, drop deleted ones, and publish the next index version "
                                   "(reusing the trained quantizer unless drift says retrain). Exit 99 when "
                                   "nothing changed.")
    _refresh_args(p, backfill=False)


def _add_backfill(sub) -> None:
    p = sub.add_parser("backfill", help="encode and index a given set of products",
                       description="Encode the catalog rows of the product ids in --ids and publish the next "
                                   "index version with them (added, or replaced if already indexed).")
    _refresh_args(p, backfill=True)


def _run_refresh(args: argparse.Namespace) -> int:
    from mimdex.pipelines.refresh.job import RefreshConfig, check, run
    from mimdex.pipelines.report import write_report

    cfg = RefreshConfig(catalog=args.catalog, model=args.model, embeddings=args.embeddings, index=args.index,
                        ids_file=getattr(args, "ids", None), shards=args.shards, vector=args.vector,
                        max_drift=args.max_drift, max_change=args.max_change,
                        max_recall_drop=args.max_recall_drop, keep=args.keep,
                        grace_hours=args.grace_hours, lock_ttl_hours=args.lock_ttl_hours, min_recall=args.min_recall,
                        eval_queries=args.eval_queries, ray_address=args.ray_address, unit_rows=args.unit_rows,
                        progress=not args.no_progress)
    check(cfg)
    report = run(cfg)
    job = report["mode"]
    c = report["diff"]
    if report.get("nothing_to_do"):
        print(f"{job}: no change ({c['unchanged']} products unchanged): nothing encoded, no new version")
        print(write_report(args.index, job, report))
        raise NothingToDo("nothing changed since the current version")
    print(f"{job}: {c['new']} new, {c['changed']} changed, {c['deleted']} deleted, {c['unchanged']} unchanged; "
          f"encoded {report['encode']['rows']} rows; {report['decision']}; "
          f"published version {report['version']}")
    print(write_report(args.index, job, report))
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole job end to end on embedded defaults")
    p.add_argument("--workdir", default="demo-output", help="where the demo writes (default ./demo-output)")
    p.add_argument("--products", type=int, default=3000)
    p.add_argument("--queries", type=int, default=600)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--epochs", type=int, default=30, help="training epochs of each demo model (equal budgets)")
    p.add_argument("--no-s3", action="store_true",
                   help="write to --workdir instead of a local S3 server the demo starts on 127.0.0.1")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from mimdex.pipelines import demo

    return demo.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mimdex", description="Multimodal visual search over a product catalog: "
                     "train 3/4-tower towers, batch-encode on Ray, build sharded IVF-PQ indexes on Beam.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_synth(sub)
    _add_train(sub)
    _add_encode(sub)
    _add_build_index(sub)
    _add_search(sub)
    _add_eval(sub)
    _add_refresh(sub)
    _add_backfill(sub)
    _add_versions(sub)
    _add_rollback(sub)
    _add_demo(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    args.extra = extra  # build-index hands unknown --flags to Beam as pipeline options
    if extra and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except NothingToDo as exc:  # exit 99 is an outcome, not an error
        print(f"mimdex {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except MimdexError as exc:
        print(f"mimdex {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mimdex {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

