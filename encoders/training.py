"""Training the towers: AdamW with warm-up and cosine decay, in-batch negatives,
checkpoints every N steps, exact resume, validation recall@k every epoch.

Deterministic on the CPU for a given seed: each batch's products and augmentations are
drawn from generators seeded by (seed, epoch) and (seed, step), so a resumed run takes
the same steps as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from tokenizers import Tokenizer
from tqdm import tqdm

from mimdex.encoders.augment import augment
from mimdex.encoders.batching import BATCHINGS, category_groups, colour_clusters
from mimdex.encoders.config import AUGMENTS, PRETRAINED_PRESETS, LossWeights, ModelConfig
from mimdex.encoders.losses import mim_loss
from mimdex.encoders.metrics import retrieval_metrics, top_k
from mimdex.encoders.model import MIMModel
from mimdex.encoders.preprocess import to_tensor
from mimdex.encoders.text import configure, tokenize
from mimdex.encoders.train_data import TrainData
from mimdex.infra import storage
from mimdex.infra.errors import UsageError

CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 4
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    seed: int = 0
    checkpoint_every: int = 100
    weights: LossWeights = field(default_factory=LossWeights)
    # "random": batches of random distinct products. "similar": batches built from groups
    # of products whose catalog images have similar colour statistics, so that colour
    # alone cannot tell the in-batch negatives apart (hard negatives, no labels needed).
    # "category": groups of products of one catalog category (hard negatives by label).
    batching: str = "random"
    group_size: int = 16
    halt_after: int | None = None  # stop (as if killed) after this step's checkpoint; tests only
    # Fine-tuning pretrained towers (recipe_for gives the pretrained presets' values):
    freeze_image_blocks: int = 0   # stem + this many EfficientNet blocks run frozen, without autograd
    freeze_text: bool = False      # text tower frozen (its pooled features computed once), projection trained
    text_layers: int | None = None  # with freeze_text off: only the top N text layers (and the projection) train
    backbone_lr_scale: float = 1.0  # lr multiplier of pretrained weights; projections get the full lr
    augment: str = "shift"         # augment.AUGMENTS
    compile: bool | None = None    # torch.compile the image path; None: on CUDA yes, on a CPU no
    bf16_cpu: bool = False         # bf16 autocast on a CPU too (CUDA always trains in bf16)
    validate_every: int = 1        # epochs between validations (the last epoch always validates; 0: never)


def recipe_for(preset: str) -> dict:
    """TrainConfig defaults of a preset (docs/benchmarks.md, "Pretrained towers", says
    how they were chosen on the synthetic benchmark)."""
    if preset in PRETRAINED_PRESETS:
        return dict(lr=3e-3, freeze_image_blocks=6, freeze_text=True, backbone_lr_scale=0.3,
                    augment="street", warmup_steps=20, bf16_cpu=True, validate_every=5)
    return {}


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


def _resume_key(train: dict) -> dict:
    """Training settings that must match for a checkpoint to be resumed."""
    return {k: v for k, v in train.items() if k != "halt_after"}


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: TrainData, tokenizer,
                 out: str, progress: bool = True):
        self.mcfg, self.cfg, self.data, self.tok, self.out = model_cfg, cfg, data, tokenizer, out
        self.progress = progress
        self.weights = cfg.weights.for_variant(model_cfg.variant)
        self.steps_per_epoch = len(data.train_products) // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise UsageError(f"--batch-size {cfg.batch_size} exceeds the {len(data.train_products)} "
                             "training products; lower it")
        total = cfg.epochs * self.steps_per_epoch
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        if cfg.augment not in AUGMENTS:
            raise UsageError(f"augment must be one of {AUGMENTS}, got {cfg.augment!r}")
        torch.manual_seed(cfg.seed)
        # CUDA: bf16 autocast, pinned host batches, non-blocking copies. CPU: fp32 (bf16 with bf16_cpu).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = MIMModel(model_cfg).to(self.device)
        self._freeze()
        self.channels_last = getattr(self.model.visual, "channels_last", False) or self.device.type == "cuda"
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.AdamW(self._param_groups(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # the compiled function shares the parameters; checkpoints use self.model's names
        compile_ = self.device.type == "cuda" if cfg.compile is None else cfg.compile
        self._encode_image = torch.compile(self.model.encode_image) if compile_ else self.model.encode_image
        self.step = 0
        self.history: list[dict] = []
        self.meta: dict = {}  # kept with checkpoints and in the bundle's config.json (e.g. "pretrained")
        self._rows_of = {}
        for row, p in enumerate(data.street_product):
            self._rows_of.setdefault(int(p), []).append(row)
        self._reform_of = {}
        for row, p in enumerate(data.reform_product):
            self._reform_of.setdefault(int(p), []).append(row)
        # Token ids (or a frozen text tower's features) are made when fit() starts: after
        # the caller has loaded pretrained or checkpointed weights, which the features need.
        self._titles = self._street_tokens = self._reform_tokens = None
        self._order, self._order_epoch = None, -1
        if cfg.batching not in BATCHINGS:
            raise UsageError(f"batching must be one of {', '.join(BATCHINGS)}, got {cfg.batching!r}")
        self._clusters = (colour_clusters(data.product_pixels, data.train_products, cfg.seed)
                          if cfg.batching == "similar" else
                          category_groups(data.categories, data.train_products) if cfg.batching == "category" else [])

    # --- fine-tuning ---------------------------------------------------------------------

    def _freeze(self) -> None:
        m, cfg = self.model, self.cfg
        if cfg.freeze_image_blocks:
            if not hasattr(m.visual, "freeze"):
                raise UsageError(f"freeze_image_blocks: the {self.mcfg.image.kind} image tower has no blocks "
                                 "to freeze (EfficientNet-Lite presets only)")
            m.visual.freeze(cfg.freeze_image_blocks)
        if cfg.freeze_text and m.has_text:
            m.text.requires_grad_(False)
            m.text.text_projection.requires_grad_(True)
        elif cfg.text_layers is not None and m.has_text:
            layers = getattr(getattr(m.text, "encoder", None), "layer", None)
            if layers is None:
                raise UsageError("text_layers: the text tower has no BERT layers (the MiniLM presets only)")
            m.text.requires_grad_(False)
            for layer in list(layers)[::-1][:cfg.text_layers]:   # the top N
                layer.requires_grad_(True)
            m.text.text_projection.requires_grad_(True)

    def _param_groups(self) -> list[dict]:
        """Pretrained weights at lr x backbone_lr_scale, new projections at the full lr."""
        new, backbone = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                fresh = name == "logit_scale" or name.startswith("visual.proj") or name.endswith("text_projection")
                (new if fresh else backbone).append(p)
        groups = [{"params": new, "lr_scale": 1.0}]
        if backbone:
            groups.append({"params": backbone, "lr_scale": self.cfg.backbone_lr_scale})
        return groups

    # --- batches -------------------------------------------------------------------------

    def _tokenize_all(self) -> None:
        """Token ids of every title and query text, once (texts are fixed per row), padded
        to the longest of them so street and reformulation tokens stack. With a frozen
        text tower, the pooled features of each distinct text instead, computed once:
        a step only projects them."""
        d, tok = self.data, self.tok
        self._titles = self._street_tokens = self._reform_tokens = None
        if not self.model.has_text:
            return
        sets = [d.titles, d.street_text, d.reform_text]
        if self.cfg.freeze_text:
            distinct = sorted({t for texts in sets for t in texts})
            feats = self._text_features(tokenize(tok, distinct))
            row = {t: i for i, t in enumerate(distinct)}
            self._titles, self._street_tokens, self._reform_tokens = (
                (feats[[row[t] for t in texts]], torch.ones(len(texts), 1, dtype=torch.long)) if texts else None
                for texts in sets)
            return
        width = max(tokenize(tok, texts)[0].shape[1] for texts in sets if texts)
        self._titles, self._street_tokens, self._reform_tokens = (
            tokenize(tok, texts, width) if texts else None for texts in sets)

    @torch.no_grad()
    def _text_features(self, tokens, chunk: int = 256) -> torch.Tensor:
        """Pooled features of the frozen text tower, in chunks; they stand in for token
        ids in batches."""
        ids, mask = tokens
        text = self.model.text
        return torch.cat([text.features(ids[i:i + chunk].to(self.device), mask[i:i + chunk].to(self.device)).cpu()
                          for i in range(0, len(ids), chunk)])

    def _encode_text(self, ids_or_feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.cfg.freeze_text:
            return torch.nn.functional.normalize(m.text.project(ids_or_feats), dim=-1)
        return m.encode_text(ids_or_feats, mask)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.cfg.seed, 1, epoch])
        if self.cfg.batching == "random":
            return rng.permutation(self.data.train_products)
        # Shuffle within each cluster (colour or category), cut into groups, shuffle the groups.
        groups = []
        for members in self._clusters:
            members = rng.permutation(members)
            groups += [members[i:i + self.cfg.group_size] for i in range(0, len(members), self.cfg.group_size)]
        return np.concatenate([groups[i] for i in rng.permutation(len(groups))])

    def _batch_products(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._order_epoch != epoch:
            self._order, self._order_epoch = self._epoch_order(epoch), epoch
        return self._order[k * self.cfg.batch_size:(k + 1) * self.cfg.batch_size]

    def _batch(self, step: int) -> dict:
        d, rng = self.data, np.random.default_rng([self.cfg.seed, 2, step])
        prods = self._batch_products(step)
        rows = np.array([self._rows_of[int(p)][rng.integers(len(self._rows_of[int(p)]))] for p in prods])
        images = [augment(self.cfg.augment, d.street_pixels[rows], rng), d.product_views(prods, rng)]
        batch = {"n": len(prods), "prods": prods}
        if self.model.has_text:
            batch["title"] = (self._titles[0][prods], self._titles[1][prods])
        if self.weights.text_product or self.weights.fused_product:
            street_ids, street_mask = self._street_tokens
            batch["query_text"] = (street_ids[rows], street_mask[rows])
            # Fused input: a reformulation (a sibling's photo + "in blue") when one targets
            # this product, half of the time; otherwise the product's own photo + short query.
            f_pix, f_ids, f_mask = [], [], []
            for p, r in zip(prods, rows):
                reforms = self._reform_of.get(int(p))
                if reforms and rng.random() < 0.5:
                    j = reforms[rng.integers(len(reforms))]
                    f_pix.append(d.reform_pixels[j])
                    f_ids.append(self._reform_tokens[0][j])
                    f_mask.append(self._reform_tokens[1][j])
                else:
                    f_pix.append(d.street_pixels[r])
                    f_ids.append(street_ids[r])
                    f_mask.append(street_mask[r])
            images.append(augment(self.cfg.augment, np.stack(f_pix), rng))
            batch["fused_text"] = (torch.stack(f_ids), torch.stack(f_mask))
        batch["images"] = to_tensor(np.concatenate(images), self.mcfg.mean, self.mcfg.std)
        if self.channels_last:
            batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)
        return batch

    def _to_device(self, batch: dict) -> dict:
        if self.device.type != "cuda":
            return batch
        move = lambda t: t.pin_memory().to(self.device, non_blocking=True)  # noqa: E731
        return {k: (move(v) if torch.is_tensor(v) else tuple(move(x) for x in v) if isinstance(v, tuple) else v)
                for k, v in batch.items()}

    def _autocast(self, training: bool = True):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        if self.cfg.bf16_cpu and training:  # validation stays fp32, as CPU encoding is
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, batch: dict):
        n, m = batch["n"], self.model
        img = self._encode_image(batch["images"])
        emb = {"query_image": img[:n], "product_image": img[n:2 * n]}
        if "title" in batch:
            emb["title"] = self._encode_text(*batch["title"])
        if "query_text" in batch:
            emb["query_text"] = self._encode_text(*batch["query_text"])
            emb["fused_image"] = img[2 * n:3 * n]
            emb["fused_text"] = self._encode_text(*batch["fused_text"])
        return mim_loss(emb, self.weights, m.logit_scale, self.mcfg.fuse_alpha)

    # --- validation ----------------------------------------------------------------------

    @torch.inference_mode()
    def validate(self, k: int = 10) -> dict:
        d = self.data
        if not len(d.val_product):
            return {}
        self.model.eval()
        def embed(px):
            with self._autocast(training=False):
                return torch.cat([self.model.encode_image(
                    to_tensor(px[i:i + 512], self.mcfg.mean, self.mcfg.std).to(self.device)).float().cpu()
                    for i in range(0, len(px), 512)])
        gallery, queries = embed(d.product_pixels), embed(d.val_pixels)
        self.model.train()
        cats = np.array(d.categories) if d.categories[0] is not None else None
        top = top_k(queries.numpy(), gallery.numpy(), k)
        return {"val_queries": int(len(d.val_product)), **retrieval_metrics(top, d.val_product, cats)}

    # --- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        base = storage.join(self.out, CHECKPOINT_DIR)
        opt = self.opt.state_dict()
        opt_tensors = {f"{i}.{name}": t.contiguous().cpu() for i, s in opt["state"].items() for name, t in s.items()}
        model_state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        storage.write_bytes(storage.join(base, "model.safetensors"), st_save(model_state))
        storage.write_bytes(storage.join(base, "optimizer.safetensors"), st_save(opt_tensors))
        storage.write_bytes(storage.join(base, "tokenizer.json"), self.tok.to_str().encode("utf-8"))
        storage.write_json(storage.join(base, "state.json"), {  # last: marks the checkpoint whole
            "step": self.step, "param_groups": opt["param_groups"], "history": self.history,
            "model": self.mcfg.to_dict(), "train": dataclasses.asdict(self.cfg), "meta": self.meta,
        })

    def load_checkpoint(self) -> bool:
        base = storage.join(self.out, CHECKPOINT_DIR)
        if not storage.exists(storage.join(base, "state.json")):
            return False
        state = storage.read_json(storage.join(base, "state.json"))
        if state["model"] != _jsonable(self.mcfg.to_dict()) or _resume_key(state["train"]) != _resume_key(
                _jsonable(dataclasses.asdict(self.cfg))):
            raise UsageError(f"{base}: the checkpoint was made with other model or training settings; "
                             "resume with the same flags or drop --resume")
        self.model.load_state_dict(st_load(storage.read_bytes(storage.join(base, "model.safetensors"))))
        flat = st_load(storage.read_bytes(storage.join(base, "optimizer.safetensors")))
        opt_state: dict[int, dict] = {}
        for key, t in flat.items():
            i, name = key.split(".", 1)
            opt_state.setdefault(int(i), {})[name] = t
        self.opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
        self.step, self.history, self.meta = state["step"], state["history"], state.get("meta", {})
        # The token ids the checkpointed weights learnt, whatever the data looks like now.
        self.tok = configure(Tokenizer.from_str(storage.read_bytes(storage.join(base, "tokenizer.json")).decode()),
                             self.mcfg.text.token_limit)
        return True

    # --- the loop ------------------------------------------------------------------------

    def fit(self) -> dict:
        self._tokenize_all()
        self.model.train()
        start = self.step
        bar = tqdm(total=self.total_steps, initial=start, desc=f"train {self.mcfg.variant}", unit="step",
                   disable=not self.progress, mininterval=1.0)
        t0, seen = time.perf_counter(), 0
        while self.step < self.total_steps:
            lr = lr_at(self.step, self.total_steps, self.cfg)
            for g in self.opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            batch = self._to_device(self._batch(self.step))
            with self._autocast():
                loss, terms = self._loss(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            with torch.no_grad():
                self.model.logit_scale.clamp_(0, math.log(100.0))
            self.step += 1
            seen += batch["n"]
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix({**{k: f"{v:.3f}" for k, v in terms.items()}, "pairs/s": f"{rate:.0f}"}, refresh=False)
            bar.update(1)
            end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
            epoch = math.ceil(self.step / self.steps_per_epoch)
            if end_of_epoch and self.cfg.validate_every and (self.step == self.total_steps
                                                             or epoch % self.cfg.validate_every == 0):
                metrics = self.validate()
                self.history.append({"step": self.step, "epoch": math.ceil(self.step / self.steps_per_epoch),
                                     "loss": float(loss.detach()), "terms": terms, "lr": lr, **metrics})
                if metrics:
                    bar.write(f"[train] step {self.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                                      if isinstance(v, float)))
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.total_steps:
                self.save_checkpoint()
            if self.cfg.halt_after is not None and self.step >= self.cfg.halt_after:
                break
        bar.close()
        return {"steps": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                "pairs_per_s": round(seen / max(time.perf_counter() - t0, 1e-9), 1),
                "history": self.history, "halted": self.step < self.total_steps, "resumed_from": start}


