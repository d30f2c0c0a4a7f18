"""The faster decoder, text tower and actor paths give the same answers: reject reasons
do not depend on draft decoding or on who decodes, vectors of existing bundles do not
change, and length bucketing leaves text vectors as they were. The nvjpeg decoder runs here
through torchvision on the CPU device; its fallback is forced; the CUDA-only branches are
listed in docs/testing.md."""
from __future__ import annotations

import dataclasses
import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dirty_catalog as dc
from mimdex.encoders import gpu_decode
from mimdex.encoders.bundle import load_bundle
from mimdex.encoders.config import TextTowerConfig, preset
from mimdex.encoders.images import ImageDecodeError, decode_rgb, load_pixels, to_array
from mimdex.encoders.inference import embed_texts, length_buckets
from mimdex.encoders.model import MIMModel
from mimdex.encoders.preprocess import to_tensor
from mimdex.encoders.text import tokenize_arrays, train_tokenizer
from mimdex.indexing.kmeans import assign_chunk
from mimdex.infra import storage

TITLES = ["Nordia red ceramic mug with black zebra stripes", "hat", "Ørsted blue linen cushion, 45 cm",
          "t-shirt", "very " * 30 + "long title", "Helio green glass vase with gold dots and a wide base"]


def _reason(data: bytes, draft: bool) -> str | None:
    try:
        load_pixels(data, 64, draft)
        return None
    except ImageDecodeError as exc:
        return exc.reason


@pytest.mark.parametrize("kind", list(dc.BAD) + list(dc.AWKWARD))
def test_draft_decode_rejects_exactly_what_full_decode_rejects(kind):
    _, objects, _ = dc.row(kind, "P1", 3)
    for data in objects.values():
        assert _reason(data, True) == _reason(data, False)


def test_draft_decode_is_close_to_full_decode_and_jpeg_only():
    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 1000)
    img = np.stack([np.add.outer(x, x) / 2, np.add.outer(x[::-1], x) / 2, np.tile(x, (1000, 1))], -1)
    img = (img + rng.normal(0, 8, img.shape)).clip(0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=90)
    data = out.getvalue()
    assert decode_rgb(data, draft=64).size == (125, 125)  # 1/8 scale, still >= 64
    assert decode_rgb(data, draft=224).size == (250, 250)  # 1/4 scale
    diff = np.abs(load_pixels(data, 64, True).astype(int) - load_pixels(data, 64, False).astype(int))
    assert diff.mean() < 2.0 and diff.max() < 40
    png = io.BytesIO()
    Image.fromarray(img).save(png, "PNG")
    assert np.array_equal(load_pixels(png.getvalue(), 64, True), load_pixels(png.getvalue(), 64, False))


@pytest.fixture(scope="module")
def old_bundle(tmp_path_factory):
    """A bundle as made before jpeg_draft existed (the key absent from its config)."""
    from conftest import random_bundle

    uri = str(tmp_path_factory.mktemp("b") / "model")
    random_bundle(uri, TITLES, "3-tower")
    config = storage.read_json(uri + "/config.json")
    del config["model"]["image"]["jpeg_draft"]
    storage.write_json(uri + "/config.json", config)
    return uri


def test_an_existing_bundle_embeds_exactly_as_before(old_bundle):
    enc = load_bundle(old_bundle)
    assert enc.cfg.image.jpeg_draft is False
    images = [dc.picture(i, kind) for i, kind in enumerate(("plain", "cmyk", "exif_rotated", "plain", "rgba"))]
    # the code before this change: full decode, a fixed-length context, one plain batch
    pixels = np.stack([to_array(decode_rgb(b), enc.cfg.image.image_size) for b in images])
    with torch.no_grad():
        before = enc.model.encode_image(to_tensor(pixels, enc.cfg.mean, enc.cfg.std)).numpy()
        ids, mask = tokenize_arrays(enc.tokenizer, TITLES, enc.cfg.text.context_length)
        text_before = enc.model.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long()).numpy()
    assert np.abs(enc.encode_images(images) - before).max() < 1e-5
    assert np.abs(enc.encode_texts(TITLES) - text_before).max() < 1e-5


@pytest.mark.parametrize("kind", ["clip", "bert"])
def test_length_bucketing_leaves_text_vectors_unchanged(kind):
    torch.manual_seed(0)
    text = TextTowerConfig(kind=kind, vocab_size=2048, context_length=48, width=64, layers=2, heads=4)
    cfg = dataclasses.replace(preset("tiny", "3-tower"), text=text)
    model = MIMModel(cfg).eval()
    tok = train_tokenizer(TITLES, 2048, 48)
    titles = TITLES * 7
    ids, mask = tokenize_arrays(tok, titles, 48)  # padded to the context, as before
    padded = embed_texts(model, ids, mask, batch_size=8, bucket=False)
    bucketed = embed_texts(model, ids, mask, batch_size=8)
    assert np.abs(padded - bucketed).max() < 1e-5
    shortest = tokenize_arrays(tok, titles)  # padded to the longest title only
    assert shortest[0].shape[1] < 48 and np.abs(embed_texts(model, *shortest, batch_size=8) - padded).max() < 1e-5
    batches = length_buckets(mask, 8)
    assert sorted(np.concatenate([rows for rows, _ in batches]).tolist()) == list(range(len(titles)))
    assert all(length == int(mask[rows].sum(1).max()) for rows, length in batches)


def test_gpu_decode_falls_back_per_image_to_the_cpu_path(monkeypatch):
    images = [dc.picture(i) for i in range(4)]
    _, bad, _ = dc.row("truncated_image", "P9", 9)
    data = images[:2] + list(bad.values()) + images[2:]
    calls = []

    def nvjpeg_fails_on_some(blobs, size, device):  # as if nvjpeg read only the first image
        calls.append(len(blobs))
        first = torch.from_numpy(np.array(load_pixels(blobs[0], size, True)))
        return [first] + [None] * (len(blobs) - 1)

    monkeypatch.setattr(gpu_decode, "_nvjpeg", nvjpeg_fails_on_some)
    pixels = torch.zeros((6, 64, 64, 3), dtype=torch.uint8)
    failed, fallbacks = gpu_decode.decode_into(pixels, [0, 1, 2, 3, 4], data, 64, True)
    assert calls == [5] and fallbacks == 4
    assert [(row, exc.reason) for row, exc in failed] == [(2, "image_corrupt")]
    for row, blob in ((0, data[0]), (1, data[1]), (3, data[3]), (4, data[4])):
        assert torch.equal(pixels[row], torch.from_numpy(np.array(load_pixels(blob, 64, True))))
    # no torchvision: every image takes the CPU path, and the actor says so
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.io", None)
    pixels2 = torch.zeros((6, 64, 64, 3), dtype=torch.uint8)
    failed2, fallbacks2 = gpu_decode.decode_into(pixels2, [0, 1, 2, 3, 4], data, 64, True)
    assert fallbacks2 == 5 and [r for r, _ in failed2] == [2] and torch.equal(pixels, pixels2)
    assert gpu_decode.decoder(torch.device("cuda")) == "cpu (torchvision missing)"


def test_the_nvjpeg_decoder_runs_through_torchvision_on_the_cpu_device(monkeypatch):
    """The function a GPU actor runs, reached here: torchvision.io.decode_jpeg on the CPU
    device (libjpeg-turbo where a GPU has nvjpeg), one batched call, a batch with a corrupt
    JPEG retried one by one, that JPEG's reject reason from the CPU path. Replacing the
    function by the CPU fallback fails this: the fallback count and the pixels differ."""
    import torchvision.io

    good = [dc.picture(1), dc.picture(3, "exif_rotated"), dc.picture(5, "cmyk"), dc.picture(7)]
    _, bad, _ = dc.row("truncated_image", "P9", 9)
    calls = []
    real = torchvision.io.decode_jpeg

    def spy(data, *args, **kwargs):
        calls.append(len(data) if isinstance(data, list) else 1)
        return real(data, *args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    pillow = [torch.from_numpy(np.array(load_pixels(b, 64, True))) for b in good]

    pixels = torch.zeros((5, 64, 64, 3), dtype=torch.uint8)
    failed, fallbacks = gpu_decode.decode_into(pixels, [0, 1, 2, 3], good, 64, True)
    assert (failed, fallbacks, calls) == ([], 0, [4])  # one batched call, no image left to the CPU path
    # torchvision's decode and antialiased bicubic resize: Pillow's picture, not Pillow's bytes
    assert not all(torch.equal(pixels[i], pillow[i]) for i in range(4))
    assert all((pixels[i].int() - pillow[i].int()).abs().float().mean() < 2 for i in range(4))

    calls.clear()
    data = good[:2] + list(bad.values()) + good[2:]
    pixels2 = torch.zeros((5, 64, 64, 3), dtype=torch.uint8)
    failed, fallbacks = gpu_decode.decode_into(pixels2, [0, 1, 2, 3, 4], data, 64, True)
    assert calls == [5, 1, 1, 1, 1, 1]  # the batch fails on the corrupt JPEG: each alone
    assert fallbacks == 1 and [(row, exc.reason) for row, exc in failed] == [(2, "image_corrupt")]
    assert all(torch.equal(pixels2[row], pixels[i]) for row, i in ((0, 0), (1, 1), (3, 2), (4, 3)))
    assert gpu_decode.decoder(torch.device("cpu")) == "cpu (no GPU on the encoder actor)"
    assert gpu_decode.decoder(torch.device("cuda")) == f"gpu (nvjpeg, torchvision {torchvision.__version__})"


def test_assignment_chunks_fit_the_device():
    assert assign_chunk(torch.device("cpu"), 4096) == 512
    assert assign_chunk(torch.device("cuda"), 4096) == 65536
    assert assign_chunk(torch.device("cuda"), 1 << 20) == 512


def test_the_pipeline_with_gpu_decode_forced_to_fall_back_gives_the_same_rows(tmp_path, local_ray):
    """--gpu-decode on CPU actors: JPEGs travel to the actor as bytes and are decoded there
    by the CPU fallback. Rejects, their reasons and the vectors equal a normal run's."""
    from conftest import random_bundle
    from mimdex.infra.contracts import embeddings as emb
    from mimdex.pipelines.encode import EncodeConfig, run

    root = str(tmp_path / "cat")
    rows = dc.write_kinds(root, ["plain"] * 20 + list(dc.AWKWARD) + list(dc.BAD), row_group_size=16)
    model = str(tmp_path / "model")
    random_bundle(model, [r["title"].decode("utf-8", "replace") for r in rows if r["title"]], "3-tower")
    out = {}
    for gpu in (False, True):
        result = run(EncodeConfig(model=model, catalog=root + "/catalog.parquet", out=str(tmp_path / f"emb-{gpu}"),
                                  unit_rows=16, gpu_decode=gpu, progress=False))
        assert result.complete
        assert result.report["throughput"]["bound_by"] in ("decode", "model", "transfer", "write")
        assert result.report.get("decode") == ("cpu (no GPU on the encoder actor)" if gpu else None)
        manifest = emb.read_manifest(str(tmp_path / f"emb-{gpu}"))
        parts = emb.read_all(str(tmp_path / f"emb-{gpu}"), manifest)
        rejects = emb.read_all(str(tmp_path / f"emb-{gpu}"), manifest, "rejects")
        out[gpu] = (dict(zip(parts.column("product_id").to_pylist(),
                             np.array(parts.column("image_emb").to_pylist(), np.float32))),
                    sorted(zip(rejects.column("product_id").to_pylist(), rejects.column("reason").to_pylist(),
                               rejects.column("row").to_pylist())))
    (vec_cpu, rej_cpu), (vec_gpu, rej_gpu) = out[False], out[True]
    assert rej_gpu == rej_cpu and len(rej_cpu) == len(dc.BAD)
    assert vec_gpu.keys() == vec_cpu.keys()
    assert max(float(np.abs(vec_gpu[p] - vec_cpu[p]).max()) for p in vec_cpu) < 2e-3  # fp16 rounding


def test_the_compiled_image_tower_gives_the_eager_vectors():
    """torch.compile for the one fixed batch shape (the last batch padded to it), as the
    GPU actors use it; on the CPU it compiles too (about 25 s here), so it is checked here."""
    from mimdex.encoders.inference import ImageEmbedder

    torch.manual_seed(0)
    model = MIMModel(preset("tiny", "3-tower")).eval()
    pixels = (np.random.default_rng(0).random((150, 64, 64, 3)) * 255).astype(np.uint8)
    eager = ImageEmbedder(model, 64)(pixels)
    compiled = ImageEmbedder(model, 64, compile=True)
    assert np.abs(compiled(pixels) - eager).max() < 1e-5
    assert np.abs(compiled(pixels[:10]) - eager[:10]).max() < 1e-5  # a short unit: padded, not recompiled
