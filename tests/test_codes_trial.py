"""The codes trial (indexing/trial.py): which options it is offered, how it sweeps and
picks, and that build-index builds the codes it picked and records why."""
from __future__ import annotations

import re

import faiss
import numpy as np
import pytest

from mimdex.indexing import params as index_params
from mimdex.indexing.exact import exact_search
from mimdex.indexing.params import choose
from mimdex.indexing.trial import CodesTrial, measure, pick, trial_nlist
from mimdex.infra.contracts.recall import recall_at
from test_index_scale import _build, clustered

FAST = "PQ128x4fs,Refine(SQ8)"


def test_the_trial_is_offered_where_both_codes_fit_and_its_choice_becomes_the_factory():
    first = choose(1_000_000, 256)
    assert first.factory == "IVF4096,SQ8" and first.code_options == ("SQ8", FAST)
    assert choose(50_000, 256).code_options == ()                       # below TRIAL_MIN_VECTORS
    assert choose(1_000_000, 256, factory="IVF4096,SQ8").code_options == ()
    # room for SQ8 (256 bytes) but not for 64 fast-scan bytes on top of them
    tight = choose(1_000_000, 256, max_memory=1_000_000 * (300 + 8) + 4096 * 256 * 4)
    assert tight.factory == "IVF4096,SQ8" and tight.code_options == ()
    chosen = choose(1_000_000, 256, codes=(FAST, "measured: 3x"))
    assert chosen.factory == f"IVF4096,{FAST}" and chosen.k_factor == 10 and chosen.code_options == ()
    assert "measured: 3x" in chosen.reasons and not any(r.startswith("SQ8 codes") for r in chosen.reasons)
    assert chosen.train_size == first.train_size          # the sample drawn before the trial fits either
    assert "code_options" not in chosen.to_dict()
    assert choose(300_000, 100).code_options == ("SQ8", "PQ50x4fs,Refine(SQ8)")
    assert trial_nlist(341_000, 2048, 65_536) == 394 and trial_nlist(10_000, 256, 65_536) == 256


def _t(codes, recall, qps, nprobe=8, target=0.95):
    return CodesTrial(codes, nprobe, recall, qps, recall >= target)


def test_pick_keeps_the_default_unless_another_is_clearly_faster_at_the_target():
    assert pick([_t("SQ8", 0.96, 1000), _t(FAST, 0.96, 1400)])[0].codes == "SQ8"      # within PREFER
    chosen, why = pick([_t("SQ8", 0.96, 1000), _t(FAST, 0.95, 16000)])
    assert chosen.codes == FAST and "16.0x the default" in why
    assert pick([_t("SQ8", 0.96, 1000), _t(FAST, 0.80, 90000)])[0].codes == "SQ8"     # fast, but short of it
    chosen, why = pick([_t("SQ8", 0.90, 1000), _t(FAST, 0.95, 1100)])
    assert chosen.codes == FAST and "default does not reach" in why
    chosen, why = pick([_t("SQ8", 0.90, 1000), _t(FAST, 0.85, 9000)])
    assert chosen.codes == "SQ8" and "highest recall@10" in why


def test_measure_stops_at_the_smallest_nprobe_that_reaches_the_target():
    x, q = clustered(20_000, seed=5, clusters=400, noise=0.9), clustered(300, seed=6, clusters=400, noise=0.9)
    index = faiss.index_factory(x.shape[1], "IVF128,SQ8")
    index.train(x)
    index.add(x)
    truth = exact_search(q, [(x, np.arange(len(x)))], 1)[1][:, 0]
    recalls = {}
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):          # the sweep, done here by hand
        index.nprobe = nprobe
        recalls[nprobe] = recall_at(index.search(q, 10)[1], truth)["recall@10"]
    target = recalls[8] - 0.001                          # reached first at 8 on this data
    assert recalls[4] < target
    trial = measure(index, "SQ8", q, truth, target, 1)
    assert (trial.nprobe, trial.recall10, trial.reached) == (8, recalls[8], True) and trial.qps > 0
    unreachable = measure(index, "SQ8", q, truth, 1.01, 1)
    assert not unreachable.reached and unreachable.recall10 == max(recalls.values())


@pytest.fixture
def trial_from_small_n(monkeypatch):
    monkeypatch.setattr(index_params, "TRIAL_MIN_VECTORS", 1000)


def test_build_index_builds_the_codes_the_trial_picked_and_records_the_trial(tmp_path, trial_from_small_n):
    report, _ = _build(tmp_path, "trial", clustered(20_000))
    trials = [CodesTrial(**t) for t in report["training"]["codes_trial"]]
    assert [t.codes for t in trials] == ["SQ8", "PQ32x4fs,Refine(SQ8)"]
    assert all(t.nprobe >= 1 and 0 <= t.recall10 <= 1 and t.qps > 0 for t in trials)
    chosen = pick(trials)[0].codes
    assert report["params"]["factory"] == f"IVF512,{chosen}"
    assert any(re.match(rf"{re.escape(chosen)} codes, from a trial on 19\d\d\d sample rows in 5\d\d lists", r)
               for r in report["params"]["reasons"])
    assert report["params"]["k_factor"] == (10 if "Refine" in chosen else 1)
