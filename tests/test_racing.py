"""Operators racing on one index root (tests/racing.py): refresh, compact, rollback,
retention, backfill and two readers started together as processes at seeded random
offsets against the local S3 server. Each trial keeps every invariant (LATEST complete,
no referenced file lost to retention, every operation took effect or exited 75/99, no
refresh's change silently lost), and a serial re-run converges to the catalog. More
trials, with processes killed mid-race: tests/benchmarks/bench_racing.py."""
from __future__ import annotations

import pytest

from conftest import random_bundle
from racing import converge, make_world, run_trial

pytestmark = pytest.mark.slow  # processes racing: the slow tier (make test-slow), as the guide asks of races


@pytest.fixture(scope="module")
def world(s3_server, tmp_path_factory):
    from mimdex.infra.local_s3 import create_bucket

    tmp = tmp_path_factory.mktemp("race")
    random_bundle(str(tmp / "model"), ["product title"], "3-tower")
    return make_world(create_bucket(s3_server, "mimdex-race"), str(tmp / "model"), str(tmp))


@pytest.mark.parametrize("seed", [11, 12])
def test_operators_racing_keep_every_invariant(world, seed):
    trial = run_trial(world, seed)
    assert trial.violations == [], (trial.codes, trial.violations)
    assert sum(code == 0 for code in trial.codes.values()) >= 3  # the readers and at least one writer


def test_a_serial_rerun_after_the_races_converges_to_the_catalog(world):
    assert converge(world) == []
