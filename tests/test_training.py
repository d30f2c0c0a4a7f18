"""`mimdex train` end to end on a small synthetic dataset: bundle, resume, refusals."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mimdex.encoders.bundle import load_bundle
from mimdex.encoders.training import TrainConfig
from mimdex.infra import storage
from mimdex.pipelines import cli
from mimdex.pipelines import train as train_job
from mimdex.pipelines.synth import job as synth
from mimdex.pipelines.synth import SynthConfig

FAST = ["--batch-size", "16", "--no-progress", "--threads", "2"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth") / "ds")
    synth.run(SynthConfig(products=120, queries=20, seed=5, pairs_per_product=1), out, workers=1, progress=False)
    return out


def _weights_sha(uri: str) -> str:
    return hashlib.sha256(storage.read_bytes(storage.join(uri, "model.safetensors"))).hexdigest()


def test_train_cli_writes_a_loadable_bundle_with_card_and_report(dataset, tmp_path, capsys):
    out = str(tmp_path / "m4")
    rc = cli.main(["train", "--data", dataset, "--catalog", f"{dataset}/catalog", "--variant", "4-tower",
                   "--preset", "tiny", "--out", out, "--max-steps", "4", "--checkpoint-every", "2", *FAST])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = storage.read_json(lines[-1])
    assert report["train"]["steps"] == 4 and report["variant"] == "4-tower"
    assert set(report["history"][-1]["terms"]) == {"image_image", "query_title", "product_title",
                                                    "text_product", "fused_product"}
    assert "recall@10" in report["history"][-1]
    enc = load_bundle(out)
    assert enc.sha256 == report["model_sha256"] == _weights_sha(out)
    card = storage.read_bytes(storage.join(out, "README.md")).decode()
    assert "fused_product" in card and "recall@1" in card and dataset in card
    vec = enc.encode_query(storage.parquet_dataset(f"{dataset}/queries").to_table().column("query_image")[0].as_py(),
                           "in blue")
    assert vec.shape == (enc.cfg.embed_dim,)


def test_image_only_bundle_has_no_text_tower(dataset, tmp_path):
    out = str(tmp_path / "m1")
    assert cli.main(["train", "--data", dataset, "--catalog", f"{dataset}/catalog", "--variant", "image-only",
                     "--preset", "tiny", "--out", out, "--max-steps", "2", *FAST]) == 0
    enc = load_bundle(out)
    assert enc.model.text is None
    with pytest.raises(ValueError, match="image-only"):
        enc.encode_texts(["red mug"])


def test_resume_after_an_interruption_equals_an_uninterrupted_run(dataset, tmp_path):
    def job(out, resume=False):
        return train_job.TrainJob(data=dataset, catalog=f"{dataset}/catalog", out=out, variant="3-tower",
                                  resume=resume, threads=2)

    cfg = TrainConfig(max_steps=6, batch_size=16, checkpoint_every=3, seed=3)
    full = str(tmp_path / "full")
    train_job.run(job(full), cfg, progress=False)

    cut = str(tmp_path / "cut")
    halted = train_job.run(job(cut), TrainConfig(**{**cfg.__dict__, "halt_after": 3}), progress=False)
    assert halted["train"]["halted"] and not storage.exists(storage.join(cut, "config.json"))
    resumed = train_job.run(job(cut, resume=True), cfg, progress=False)
    assert resumed["resumed"] and resumed["train"]["resumed_from"] == 3
    assert _weights_sha(cut) == _weights_sha(full)


def test_an_existing_checkpoint_needs_resume_and_matching_settings(dataset, tmp_path, capsys):
    out = str(tmp_path / "m")
    base = ["train", "--data", dataset, "--catalog", f"{dataset}/catalog", "--variant", "3-tower", "--preset", "tiny",
            "--out", out, "--max-steps", "2", *FAST]
    assert cli.main(base) == 0
    assert cli.main(base) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert cli.main(base[:-len(FAST)] + ["--batch-size", "8", "--no-progress", "--resume"]) == 2
    assert "other model or training settings" in capsys.readouterr().err


def test_pairs_naming_unknown_products_exit_65(dataset, tmp_path, capsys):
    pairs = str(tmp_path / "pairs.parquet")
    pq.write_table(pa.table({"query_image": [b"x"], "product_id": ["NOPE-1"]}), pairs)
    rc = cli.main(["train", "--data", pairs, "--catalog", f"{dataset}/catalog", "--variant", "3-tower",
                   "--preset", "tiny", "--out", str(tmp_path / "m"), *FAST])
    assert rc == 65
    err = capsys.readouterr().err
    assert pairs in err and "NOPE-1" in err


def test_missing_column_exits_65_naming_column_and_file(dataset, tmp_path, capsys):
    bad = str(tmp_path / "catalog.parquet")
    pq.write_table(pa.table({"product_id": ["a"], "image": [b"x"]}), bad)
    rc = cli.main(["train", "--data", dataset, "--catalog", bad, "--variant", "3-tower", "--preset", "tiny",
                   "--out", str(tmp_path / "m"), *FAST])
    assert rc == 65
    err = capsys.readouterr().err
    assert "'title'" in err and bad in err


def test_train_reads_and_writes_s3(s3_bucket, capsys):
    data = s3_bucket + "/ds"
    synth.run(SynthConfig(products=60, queries=8, seed=6, pairs_per_product=1), data, workers=1, progress=False)
    out = s3_bucket + "/models/three"
    rc = cli.main(["train", "--data", data, "--catalog", data + "/catalog", "--variant", "3-tower", "--preset", "tiny",
                   "--out", out, "--max-steps", "2", *FAST])
    assert rc == 0
    report_uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert report_uri.startswith(out + "/_reports/train-")
    assert load_bundle(out).sha256 == storage.read_json(report_uri)["model_sha256"]


@pytest.mark.parametrize("batching", ["random", "similar", "category"])
def test_an_epoch_visits_every_training_product_once(dataset, batching, tmp_path):
    from mimdex.encoders.config import preset
    from mimdex.encoders.text import train_tokenizer
    from mimdex.encoders.train_data import load_train_data
    from mimdex.encoders.training import Trainer

    cfg = preset("tiny", "3-tower")
    data = load_train_data(dataset, f"{dataset}/catalog", 64, progress=False)
    tok = train_tokenizer(data.titles, cfg.text.vocab_size, cfg.text.context_length)
    tr = Trainer(cfg, TrainConfig(batch_size=8, group_size=4, batching=batching), data, tok, str(tmp_path),
                 progress=False)
    order = tr._epoch_order(0)
    assert sorted(order.tolist()) == sorted(data.train_products.tolist())
    batch = tr._batch_products(0)
    assert len(set(batch.tolist())) == len(batch) == 8
    if batching == "similar":
        cluster_of = {int(p): c for c, members in enumerate(tr._clusters) for p in members}
        assert len(tr._clusters) >= 2
        # groups of 4 from one colour cluster each: a batch of 8 spans at most 2 clusters
        # (3 where a cluster's last group was short).
        assert len({cluster_of[int(p)] for p in batch}) <= 3
    if batching == "category":
        # each cluster is exactly one category's training products
        assert sorted(sorted(data.categories[int(p)] for p in members)[0] for members in tr._clusters) == \
            sorted({data.categories[int(p)] for p in data.train_products})
        assert all(len({data.categories[int(p)] for p in members}) == 1 for members in tr._clusters)
        assert len({data.categories[int(p)] for p in batch}) <= 3


def test_the_compiled_training_path_runs_on_the_cpu_and_trains_as_eager_does(dataset, tmp_path):
    """CUDA trains through torch.compile (the default there); on a CPU it compiles too
    (inductor's C++ backend), so the path runs here: its graphs are really compiled, one
    step's loss and gradients equal the eager ones up to float rounding, and three steps
    of AdamW stay within the bound that sign-like first updates allow (2 x the summed lr:
    a near-zero gradient whose sign rounding flips moves a weight by lr the other way)."""
    import torch
    import torch._dynamo

    from mimdex.encoders.config import preset
    from mimdex.encoders.text import train_tokenizer
    from mimdex.encoders.train_data import load_train_data
    from mimdex.encoders.training import Trainer, lr_at

    cfg = preset("tiny", "3-tower")
    data = load_train_data(dataset, f"{dataset}/catalog", 64, progress=False)
    tok = train_tokenizer(data.titles, cfg.text.vocab_size, cfg.text.context_length)
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        tcfg = TrainConfig(batch_size=8, max_steps=3, seed=11, compile=compiled)
        tr = Trainer(cfg, tcfg, data, tok, str(tmp_path / str(compiled)), progress=False)
        assert (tr._encode_image == tr.model.encode_image) is not compiled
        tr._tokenize_all()
        torch.manual_seed(0)
        loss, _ = tr._loss(tr._to_device(tr._batch(0)))
        loss.backward()
        grads = {k: p.grad.clone() for k, p in tr.model.named_parameters() if p.grad is not None}
        tr.opt.zero_grad(set_to_none=True)
        tr.fit()
        assert (torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0) is compiled
        runs[compiled] = (float(loss.detach()), grads, {k: v.detach().clone() for k, v in tr.model.state_dict().items()})
    (loss_e, grads_e, w_e), (loss_c, grads_c, w_c) = runs[False], runs[True]
    assert abs(loss_e - loss_c) <= 1e-5 * abs(loss_e)
    assert grads_e.keys() == grads_c.keys() and len(grads_e) > 10
    for k in grads_e:
        assert torch.allclose(grads_c[k], grads_e[k], atol=1e-4 * float(grads_e[k].abs().max()) + 1e-8, rtol=1e-3), k
    bound = 2 * sum(lr_at(s, 3, tcfg) for s in range(3))
    for k in w_e:
        if w_e[k].is_floating_point():
            assert float((w_e[k] - w_c[k]).abs().max()) <= bound, k
