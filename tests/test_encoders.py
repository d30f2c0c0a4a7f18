"""The MIM towers: sharing, normalisation, learning, bundles and checkpoint loading."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mimdex.encoders.bundle import BundleError, load_bundle, save_bundle
from mimdex.encoders.checkpoints import bert_text_config, load_bert_checkpoint, load_clip_state_dict
from mimdex.encoders.config import LossWeights, preset
from mimdex.encoders.losses import mim_loss
from mimdex.encoders.model import MIMModel
from mimdex.encoders.text import configure, tokenize, train_tokenizer
from mimdex.infra import storage
from mimdex.infra.contracts.model import VECTOR_ROUNDING
from mimdex.infra.errors import EXIT_DATA

TITLES = ["Nordia red ceramic mug with black zebra stripes", "Velix blue cotton t-shirt",
          "Kalora green wool hat with white dots", "Brienne grey steel bottle with gold checks",
          "Nørdiå pink velvet cushion", "Ostica navy glass vase with red crosses"]


def _tok(cfg):
    return train_tokenizer(TITLES + ["red mug", "in blue"], cfg.text.vocab_size, cfg.text.context_length)


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_towers_are_shared_not_copied():
    torch.manual_seed(0)
    m1, m3, m4 = (MIMModel(preset("tiny", v)) for v in ("image-only", "3-tower", "4-tower"))
    assert m1.text is None
    assert _params(m1) == _params(m1.visual) + 1  # + the temperature
    # The 4-tower model's query-text tower is the title tower: not one parameter more.
    assert _params(m4) == _params(m3) == _params(m3.visual) + _params(m3.text) + 1
    # Query and product images pass through the very same parameters.
    x = torch.randn(4, 3, 64, 64)
    q, p = m3.encode_image(x[:2]), m3.encode_image(x[2:])
    (q.sum() + p.sum()).backward()
    grads = [p_.grad for p_ in m3.visual.parameters()]
    assert all(g is not None for g in grads)


@pytest.mark.parametrize("variant", ["3-tower", "4-tower"])
def test_outputs_are_normalised_and_of_dimension_d(variant):
    cfg = preset("tiny", variant)
    m = MIMModel(cfg).eval()
    tok = _tok(cfg)
    ids, mask = tokenize(tok, TITLES)
    with torch.no_grad():
        img = m.encode_image(torch.randn(5, 3, 64, 64))
        txt = m.encode_text(ids, mask)
        fused = m.encode_query(torch.randn(6, 3, 64, 64), ids, mask, alpha=0.3)
        raw = m.encode_image(torch.randn(2, 3, 64, 64), normalize=False)
    for t, n in ((img, 5), (txt, 6), (fused, 6)):
        assert t.shape == (n, cfg.embed_dim)
        assert torch.allclose(t.norm(dim=1), torch.ones(n), atol=1e-5)
    assert not torch.allclose(raw.norm(dim=1), torch.ones(2), atol=1e-3)


def test_tokenizer_handles_non_ascii_and_pads_to_the_longest_or_the_context():
    cfg = preset("tiny", "3-tower")
    tok = _tok(cfg)
    ids, mask = tokenize(tok, ["Nørdiå pink velvet cushion", ""])
    assert ids.shape == (2, int(mask[0].sum())) and int(mask[0].sum()) < cfg.text.context_length
    assert int(mask[0].sum()) >= 4 and int(mask[1].sum()) == 2  # [BOS] [EOS]
    fixed, fixed_mask = tokenize(tok, ["Nørdiå pink velvet cushion", ""], cfg.text.context_length)
    assert fixed.shape == (2, cfg.text.context_length) and torch.equal(fixed[:, :ids.shape[1]], ids)
    long_ids, _ = tokenize(tok, [" ".join(["mug"] * 200)])
    assert long_ids.shape == (1, cfg.text.context_length)  # truncated to the context
    assert tok.token_to_id("[UNK]") not in ids[0, : int(mask[0].sum())].tolist()


def test_a_few_hundred_steps_overfit_a_tiny_batch():
    torch.manual_seed(0)
    cfg = preset("tiny", "4-tower")
    m = MIMModel(cfg)
    tok = _tok(cfg)
    n = 6
    gen = torch.Generator().manual_seed(0)
    q, p, f = (torch.randn(n, 3, 64, 64, generator=gen) for _ in range(3))
    title, short = tokenize(tok, TITLES), tokenize(tok, ["mug", "t-shirt", "hat", "bottle", "cushion", "vase"])
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)

    def step():
        img = m.encode_image(torch.cat([q, p, f]))
        emb = {"query_image": img[:n], "product_image": img[n:2 * n], "fused_image": img[2 * n:],
               "title": m.encode_text(*title), "query_text": m.encode_text(*short),
               "fused_text": m.encode_text(*short)}
        return mim_loss(emb, LossWeights(), m.logit_scale, cfg.fuse_alpha)

    with torch.no_grad():
        first, terms = step()
    assert set(terms) == {"image_image", "query_title", "product_title", "text_product", "fused_product"}
    for _ in range(200):
        loss, _ = step()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final, _ = step()
    assert final.item() < 0.5 * first.item()


def test_variant_weights_drop_the_terms_a_variant_does_not_train():
    w = LossWeights()
    assert w.for_variant("image-only") == LossWeights(1.0, 0.0, 0.0, 0.0, 0.0)
    three = w.for_variant("3-tower")
    assert three.text_product == three.fused_product == 0.0 and three.query_title > 0


@pytest.fixture
def bundle(tmp_path):
    torch.manual_seed(1)
    cfg = preset("tiny", "4-tower")
    model = MIMModel(cfg).eval()
    uri = str(tmp_path / "bundle")
    save_bundle(model, _tok(cfg), uri, "# card\n")
    return uri, model


def _png_bytes(seed: int) -> bytes:
    import io

    from PIL import Image
    arr = np.random.default_rng(seed).integers(0, 255, (80, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def test_bundle_round_trip_gives_bit_identical_embeddings(bundle, tmp_path):
    uri, _ = bundle
    images = [_png_bytes(i) for i in range(5)]
    a = load_bundle(uri)
    b = load_bundle(uri)
    e1, e2 = a.encode_images(images), b.encode_images(images)
    assert e1.dtype == np.float32 and np.array_equal(e1, e2)
    assert np.array_equal(a.encode_texts(TITLES), b.encode_texts(TITLES))
    # Batch composition does not change a product's vector (GroupNorm, no batch statistics).
    assert np.abs(a.encode_images(images[:1])[0] - e1[0]).max() <= VECTOR_ROUNDING
    q = a.encode_query(images[0], "in blue")
    assert q.shape == (a.cfg.embed_dim,) and abs(np.linalg.norm(q) - 1) < 1e-5
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    assert config["preprocessing"]["image_size"] == 64 and config["variant"] == "4-tower"
    assert set(config["sha256"]) == {"model.safetensors", "tokenizer.json"}


def test_bundle_on_s3_round_trips(s3_bucket):
    torch.manual_seed(2)
    cfg = preset("tiny", "3-tower")
    model = MIMModel(cfg).eval()
    uri = s3_bucket + "/models/m1"
    sha = save_bundle(model, _tok(cfg), uri, "# card\n")
    enc = load_bundle(uri)
    assert enc.sha256 == sha
    images = [_png_bytes(9)]
    assert np.array_equal(enc.encode_images(images), load_bundle(uri).encode_images(images))


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_a_tampered_bundle_is_refused_naming_the_file(bundle, name):
    uri, _ = bundle
    path = storage.join(uri, name)
    data = bytearray(storage.read_bytes(path))
    data[len(data) // 2] ^= 0x01
    storage.write_bytes(path, bytes(data))
    with pytest.raises(BundleError) as err:
        load_bundle(uri)
    assert path in str(err.value) and "tampered" in str(err.value)
    assert err.value.exit_code == EXIT_DATA


def _clip_vit_b16_state_dict() -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of OpenAI's CLIP ViT-B/16."""
    sd: dict[str, torch.Tensor] = {}

    def blocks(prefix: str, width: int, layers: int) -> None:
        for i in range(layers):
            b = f"{prefix}transformer.resblocks.{i}."
            sd[b + "attn.in_proj_weight"] = torch.randn(3 * width, width)
            sd[b + "attn.in_proj_bias"] = torch.randn(3 * width)
            sd[b + "attn.out_proj.weight"] = torch.randn(width, width)
            sd[b + "attn.out_proj.bias"] = torch.randn(width)
            for ln in ("ln_1", "ln_2"):
                sd[b + f"{ln}.weight"], sd[b + f"{ln}.bias"] = torch.randn(width), torch.randn(width)
            sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"] = torch.randn(4 * width, width), torch.randn(4 * width)
            sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"] = torch.randn(width, 4 * width), torch.randn(width)

    sd["visual.class_embedding"] = torch.randn(768)
    sd["visual.positional_embedding"] = torch.randn(197, 768)
    sd["visual.proj"] = torch.randn(768, 512)
    sd["visual.conv1.weight"] = torch.randn(768, 3, 16, 16)
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        w = 768 if ln.startswith("visual") else 512
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = torch.randn(w), torch.randn(w)
    blocks("visual.", 768, 12)
    blocks("", 512, 12)
    sd["positional_embedding"] = torch.randn(77, 512)
    sd["text_projection"] = torch.randn(512, 512)
    sd["token_embedding.weight"] = torch.randn(49408, 512)
    sd["logit_scale"] = torch.tensor(4.6052)
    # OpenAI's file also stores hyper-parameters as entries.
    sd["input_resolution"], sd["context_length"], sd["vocab_size"] = (torch.tensor(224), torch.tensor(77),
                                                                      torch.tensor(49408))
    return sd


def test_clip_key_names_load_into_base_with_no_missing_keys():
    model = MIMModel(preset("base", "3-tower"))
    sd = _clip_vit_b16_state_dict()
    report = load_clip_state_dict(model, sd)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatch == []
    assert torch.equal(model.visual.conv1.weight, sd["visual.conv1.weight"])
    assert torch.equal(model.text.token_embedding.weight, sd["token_embedding.weight"])
    # open_clip's names are the same; a DataParallel "module." prefix is tolerated.
    report = load_clip_state_dict(model, {"module." + k: v for k, v in list(sd.items())[:10]})
    assert len(report.loaded) == 10 and report.unexpected == []


def test_clip_checkpoint_reports_missing_and_unexpected_keys():
    model = MIMModel(preset("base", "3-tower"))
    sd = _clip_vit_b16_state_dict()
    del sd["visual.proj"]
    sd["visual.attnpool.extra"] = torch.zeros(1)
    report = load_clip_state_dict(model, sd)
    assert report.missing == ["visual.proj"] and report.unexpected == ["visual.attnpool.extra"]


def test_bert_style_checkpoint_initialises_the_text_tower(tmp_path):
    """A random checkpoint in all-MiniLM-L6-v2's layout (smaller, same key names)."""
    d = tmp_path / "minilm"
    d.mkdir()
    conf = {"vocab_size": 120, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 40, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
    (d / "config.json").write_text(json.dumps(conf))
    sd = {"embeddings.word_embeddings.weight": torch.randn(120, 32),
          "embeddings.position_embeddings.weight": torch.randn(40, 32),
          "embeddings.token_type_embeddings.weight": torch.randn(2, 32),
          "embeddings.LayerNorm.weight": torch.randn(32), "embeddings.LayerNorm.bias": torch.randn(32),
          "embeddings.position_ids": torch.arange(40)[None],
          "pooler.dense.weight": torch.randn(32, 32), "pooler.dense.bias": torch.randn(32)}
    for i in range(2):
        b = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = torch.randn(32, 32), torch.randn(32)
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = torch.randn(64, 32), torch.randn(64)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = torch.randn(32, 64), torch.randn(32)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            sd[b + ln + ".weight"], sd[b + ln + ".bias"] = torch.randn(32), torch.randn(32)
    save_file(sd, str(d / "model.safetensors"))
    _tok(preset("tiny", "3-tower")).save(str(d / "tokenizer.json"))

    import dataclasses
    cfg = dataclasses.replace(preset("tiny", "3-tower"), text=bert_text_config(str(d)))
    model = MIMModel(cfg)
    report, tok = load_bert_checkpoint(model, str(d))
    assert report.missing == ["text.text_projection"]  # ours: the projection into the joint space
    assert sorted(report.unexpected) == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    assert torch.equal(model.text.encoder.layer[1].attention.self.key.weight, sd["encoder.layer.1.attention.self.key.weight"])
    ids, mask = tokenize(configure(tok, cfg.text.context_length), ["red mug"])
    out = model.encode_text(ids, mask)
    assert out.shape == (1, cfg.embed_dim)
