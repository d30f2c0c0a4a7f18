"""`make bench` (tests/benchmarks/run_quick.py) runs every benchmark script: each has a
quick mode whose flags the script defines."""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "benchmarks"))
import run_quick  # noqa: E402


def test_every_benchmark_script_has_a_quick_mode_with_flags_it_defines():
    names = run_quick.scripts()
    assert names and set(names) == set(run_quick.QUICK), set(names) ^ set(run_quick.QUICK)
    for name, argv in run_quick.QUICK.items():
        source = open(os.path.join(run_quick.HERE, name)).read()
        defined = set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', source))
        used = {a for a in argv if a.startswith("--")} | ({"--out"} if name in run_quick.WRITES_OUT else set())
        assert used <= defined, (name, used - defined)
