"""`mimdex` subcommands around the published index: build-index, search, eval, refresh,
backfill, compact, versions, rollback (cli.py holds the parser, the dataset/model/encode commands
and the exit-code contract)."""
from __future__ import annotations

import argparse

from mimdex.infra.contracts.queries import LIMIT as QUERY_LIMIT
from mimdex.infra.errors import DataError, NothingToDo, UsageError
from mimdex.pipelines.cli_beam import add_beam_flags, beam_args


def add_job_flags(p) -> None:
    """Flags every long-running job shares."""
    p.add_argument("--pushgateway-url", help="push job metrics (duration, counts, exit code, last success) to "
                                             "this Prometheus Pushgateway at the end, e.g. http://pushgateway:9091")


def add_commands(sub) -> None:
    for add in (_add_build_index, _add_search, _add_eval, _add_refresh, _add_backfill, _add_compact, _add_versions,
                _add_rollback):
        add(sub)


def _add_compact(sub) -> None:
    p = sub.add_parser("compact", help="fold LATEST's delta segments into new base shards (Beam)",
                       description="Write the version LATEST names with its refreshes' delta segments folded into "
                                   "new base shards, and publish it (same vectors, same search results). Exit 99 "
                                   "when there is nothing to compact. Unrecognised --flags are Beam options.")
    p.add_argument("--index", required=True, help="index root")
    _beam_job_flags(p, _run_compact)


def _beam_job_flags(p, handler, stall_help: str = "exit 75 when the Beam job writes no output for this many "
                                                    "seconds (default 900)") -> None:
    """What every command that runs a Beam job takes: the stall timeout, Beam's options,
    the job flags, and its handler."""
    p.add_argument("--stall-timeout", type=float, default=900.0, help=stall_help)
    add_beam_flags(p)
    add_job_flags(p)
    p.set_defaults(handler=handler)


def _run_compact(args: argparse.Namespace) -> int:
    from mimdex.pipelines.compact import CompactConfig, run
    from mimdex.pipelines.report import write_report

    report = args.job_report = run(CompactConfig(args.index, args.stall_timeout), beam_args(args))
    if report.get("nothing_to_do"):
        print(f"compact: {report['from']} has no delta segments: nothing to compact")
        print(write_report(args.index, "compact", report))
        raise NothingToDo("nothing to compact")
    print(f"compact: {report['from']} + {report['delta_segments']} delta segments -> {report['version']} "
          f"({report['vectors']} vectors, {report['written_bytes']} bytes written); published")
    print(write_report(args.index, "compact", report))
    return 0


def _add_build_index(sub) -> None:
    p = sub.add_parser("build-index", help="build and publish sharded IVF indexes with Beam",
                       description="Train an IVF index once on a sample, add vectors per (input part, shard) on "
                                   "Apache Beam, merge per shard, evaluate against exact search, publish a new "
                                   "version and point LATEST at it. Unrecognised --flags are Beam pipeline options "
                                   "(e.g. --runner=FlinkRunner); the default is the DirectRunner, with a worker "
                                   "process per core from 1M vectors.")
    p.add_argument("--embeddings", required=True, help="embeddings root (with manifest.json)")
    p.add_argument("--out", required=True, help="index root URI")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--vector", choices=["image", "text", "fused"], default="image")
    p.add_argument("--factory", help="explicit faiss factory string: IVF<n>[_HNSW32],<codes>[,Refine(SQ8|SQfp16)] "
                   "with codes SQ8, SQfp16, PQ<m>x4fs or PQ<m>[x8], optionally after OPQ<m>_<d>, e.g. "
                   "IVF65536_HNSW32,PQ128x4fs,Refine(SQ8) (default: chosen from n, d and --max-index-memory)")
    p.add_argument("--max-index-memory", help="memory budget for the whole index, e.g. 4G")
    p.add_argument("--recall-target", type=float, default=0.95,
                   help="recall@10 (vs exact) the default nprobe must reach")
    p.add_argument("--min-recall", type=float, help="do not publish below this recall@10 at the default nprobe")
    p.add_argument("--queries", help="evaluation queries (contracts.queries: street and reformulation photos), "
                                     "encoded with the embeddings' model; their recall is recorded in the version")
    p.add_argument("--eval-queries", type=int, default=1000, help="held-out catalog vectors to evaluate with")
    p.add_argument("--train-size", type=int, help="training sample size (default: 64 per IVF list)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-metadata", action="store_true", help="id maps without the catalog's metadata columns")
    p.add_argument("--filter-columns", metavar="A,B,...",
                   help="catalog columns (strings, integers, bools) that search --filter may name; refreshes keep "
                        "them current without re-encoding, e.g. marketplace,category,in_stock")
    p.add_argument("--photos", choices=["every", "main", "pooled"], default="every",
                   help="a multi-photo catalog: index every photo (default; search returns distinct products), "
                        "the main (first usable) photo only, or one pooled vector per product")
    _beam_job_flags(p, _run_build_index)


def _run_build_index(args: argparse.Namespace) -> int:
    from mimdex.indexing.params import parse_memory
    from mimdex.indexing.release import QualityGateFailed
    from mimdex.infra.contracts.attributes import parse_flag
    from mimdex.pipelines.build_index import BuildConfig, run
    from mimdex.pipelines.report import write_report

    cfg = BuildConfig(embeddings=args.embeddings, out=args.out, shards=args.shards, vector=args.vector,
                      factory=args.factory,
                      max_index_memory=parse_memory(args.max_index_memory) if args.max_index_memory else None,
                      recall_target=args.recall_target, min_recall=args.min_recall, queries=args.queries,
                      eval_queries=args.eval_queries, train_size=args.train_size, seed=args.seed, metadata=not args.no_metadata,
                      filter_columns=parse_flag(args.filter_columns), photos=args.photos,
                      stall_timeout=args.stall_timeout)
    try:
        result = run(cfg, beam_args(args))
    except QualityGateFailed as exc:
        print(write_report(args.out, "build-index", {"published": False, "error": str(exc)}))
        raise
    from mimdex.indexing.evaluate import held_out_at

    report = args.job_report = result.report
    row = held_out_at(result.evaluation, result.default_nprobe)
    print(f"build-index: version {result.version} published ({result.counts['indexed']} vectors, "
          f"{args.shards} shards, {report['params']['factory']}, nprobe {result.default_nprobe}: "
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
    p.add_argument("--filter", help="only products whose filter columns (build-index --filter-columns) satisfy this, e.g. "
                   "'category=mug,in_stock=true', 'colour=red|blue', 'family=3..7' (docs/cli.md)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--with-vector", action="store_true",
                   help="with --json: include the query vector (to compare with the encode pipeline's)")
    p.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    import json

    from mimdex.indexing.filters import parse
    from mimdex.indexing.reader import IndexReader
    from mimdex.infra import storage

    if args.k < 1:
        raise UsageError("-k must be at least 1")
    flt = parse(args.filter) if args.filter is not None else None   # a malformed one fails before any load
    reader = IndexReader.open(args.index, args.version)
    if flt is not None:
        reader.selection(flt)   # an unknown column or a mistyped value: exit 2 before the model loads
    # torch only now: a process that imported torch and faiss and exits without running
    # torch can abort at exit in their OpenMP runtimes ("terminate called ...")
    from mimdex.pipelines.query import encoder_for, search_vector

    enc = encoder_for(reader)
    image = storage.read_bytes(args.image) if args.image else None
    try:
        vector = search_vector(enc, [image] if image else None, [args.text] if args.text else None)
    except ValueError as exc:  # an undecodable query image
        raise DataError(f"--image {args.image}: {exc}") from exc
    results = reader.search_products(vector, args.k, args.nprobe, flt)[0]
    if args.json:
        out = {"version": reader.version, "results": results}
        if flt is not None:
            out["filter"] = {"text": str(flt), "rows": reader.selection(flt).count}
        if args.with_vector:  # float32 -> float is exact, and so is its JSON repr
            out["query_vector"] = [float(x) for x in vector[0]]
        print(json.dumps(out, ensure_ascii=False, default=str))
        return 0
    print(f"index version {reader.version}, {reader.products} products"
          + (f" ({reader.ntotal} photos)" if reader.ntotal != reader.products else "")
          + (f"; filter {flt}: {reader.selection(flt).count} rows" if flt is not None else ""))
    for rank, r in enumerate(results, 1):
        photo = f"  photo {r['photo']}" if r.get("photo") is not None else ""
        print(f"{rank:>3}  {r['score']:.4f}  {r['product_id']}{photo}  {r.get('title') or ''}")
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="recall of a published index on evaluation queries (the gate's figures)")
    p.add_argument("--index", required=True)
    p.add_argument("--queries", required=True, help="Parquet with query_image, product_id [, kind, query_text] "
                                                    "(docs/contracts.md, evaluation queries)")
    p.add_argument("--nprobe", type=int, help="default: the version's")
    p.add_argument("--version")
    p.add_argument("--limit", type=int, default=QUERY_LIMIT,
                   help=f"the first N queries of each kind (default {QUERY_LIMIT}, as the gate)")
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
        print(f"eval: version {result['version']}, nprobe {result['nprobe']}: "
              + ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("version", "uri", "nprobe")))
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
    p.add_argument("--photos", choices=["every", "main", "pooled"], default="every",
                   help="for a first build of a multi-photo catalog (build-index --photos); later versions keep theirs")
    p.add_argument("--filter-columns", metavar="A,B,...",
                   help="build-index --filter-columns for a first build, or to change the index's set (default: "
                        "the index's); a product whose filter columns alone changed is retagged, not re-encoded")
    p.add_argument("--max-drift", type=float, default=1.25,
                   help="retrain when the new vectors' coarse MSE exceeds this multiple of the training MSE")
    p.add_argument("--max-change", type=float, default=0.25,
                   help="retrain when more than this share of the catalog was added, changed or deleted")
    p.add_argument("--max-code-drift", type=float, default=2.0,
                   help="retrain when the new vectors' code error (vector to its decoded list code) exceeds this "
                        "multiple of the held-out old vectors'")
    p.add_argument("--max-delta-share", type=float, default=0.10,
                   help="compact when the delta segments hold more than this share of the index's vectors")
    p.add_argument("--keep", type=int, default=5, help="index versions retention keeps")
    p.add_argument("--grace-hours", type=float, default=24.0, help="retention never deletes younger versions")
    p.add_argument("--lock-ttl-hours", type=float, default=6.0, help="break a lock older than this")
    p.add_argument("--min-recall", type=float)
    p.add_argument("--eval-queries", type=int, default=1000)
    p.add_argument("--queries", help="evaluation queries (street and reformulation photos) the gate records the "
                                     "recall of, as build-index's --queries")
    p.add_argument("--full-evaluation", action="store_true",
                   help="recompute the gate's ground truth from every vector (default: update the previous "
                        "version's from the change; docs/contracts.md, \"Ground truth\")")
    p.add_argument("--ray-address")
    p.add_argument("--runtime-env", help="Ray runtime env file (e.g. infra/ray/runtime_env.yaml)")
    p.add_argument("--unit-rows", type=int, default=2048)
    p.add_argument("--no-progress", action="store_true")
    _beam_job_flags(p, _run_refresh, "exit 75 when a Beam job (the diff, compaction, a rebuild) writes nothing "
                                     "for this many seconds (default 900)")


def _add_refresh(sub) -> None:
    p = sub.add_parser("refresh", help="nightly refresh: re-encode changed products, publish a new version",
                       description="Diff the catalog against the current embeddings (a bucketed Beam join of "
                                   "change fingerprints: no image behind a URI is read), encode only new and "
                                   "changed products, and publish the next index version as a delta segment over "
                                   "the previous one (reusing the trained quantizer unless drift says retrain; "
                                   "compacting past --max-delta-share). Exit 99 when nothing changed.")
    _refresh_args(p, backfill=False)


def _add_backfill(sub) -> None:
    p = sub.add_parser("backfill", help="encode and index a given set of products",
                       description="Encode the catalog rows of the product ids in --ids and publish the next "
                                   "index version with them (added, or replaced if already indexed).")
    _refresh_args(p, backfill=True)


def _run_refresh(args: argparse.Namespace) -> int:
    from mimdex.infra.contracts.attributes import parse_flag
    from mimdex.pipelines.refresh import RefreshConfig, check, run
    from mimdex.pipelines.report import write_report

    cfg = RefreshConfig(catalog=args.catalog, model=args.model, embeddings=args.embeddings, index=args.index,
                        ids_file=getattr(args, "ids", None), shards=args.shards, vector=args.vector,
                        photos=args.photos,
                        filter_columns=parse_flag(args.filter_columns) if args.filter_columns is not None else None,
                        max_drift=args.max_drift, max_change=args.max_change,
                        max_code_drift=args.max_code_drift, keep=args.keep,
                        grace_hours=args.grace_hours, lock_ttl_hours=args.lock_ttl_hours, min_recall=args.min_recall,
                        eval_queries=args.eval_queries, queries=args.queries, ray_address=args.ray_address,
                        full_evaluation=args.full_evaluation,
                        runtime_env=args.runtime_env,
                        unit_rows=args.unit_rows, max_delta_share=args.max_delta_share,
                        stall_timeout=args.stall_timeout,
                        progress=not args.no_progress, beam_args=tuple(beam_args(args)))
    check(cfg)
    report = args.job_report = run(cfg)
    job = report["mode"]
    c = report["diff"]
    if report.get("nothing_to_do"):
        print(f"{job}: no change ({c['unchanged']} products unchanged, {c['still_rejected']} still rejected): "
              "nothing encoded, no new version")
        print(write_report(args.index, job, report))
        raise NothingToDo("nothing changed since the current version")
    what = ("the whole catalog" if "full" in c else
            f"{c['new']} new, {c['changed']} changed, {c['rejudged']} re-judged, {c['deleted']} deleted, "
            f"{c['retagged']} retagged, {c['unchanged']} unchanged")
    print(f"{job}: {what}; encoded {report['encode']['rows']} rows; {report['decision']}; "
          f"published version {report['version']}")
    print(write_report(args.index, job, report))
    return 0
