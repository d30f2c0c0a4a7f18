"""The installed `mimdex` entry point and its exit-code contract."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys


DESIGN_COMMANDS = ["synth-catalog", "train", "encode", "build-index", "search", "eval", "refresh",
                   "backfill", "versions", "rollback", "demo"]


def _mimdex(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mimdex", path=os.path.dirname(sys.executable)) or shutil.which("mimdex")
    assert exe, "the console script `mimdex` is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_design_subcommand():
    res = _mimdex("--help")
    assert res.returncode == 0
    for name in DESIGN_COMMANDS:
        assert f"    {name}" in res.stdout, f"{name} missing from mimdex --help"


def test_unknown_flag_and_missing_command_exit_2():
    assert _mimdex("synth-catalog", "--out", "x", "--products", "50", "--queries", "5",
                   "--bogus").returncode == 2
    assert _mimdex().returncode == 2


def test_bad_input_exits_65_without_a_traceback(tmp_path):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "manifest.json").write_text("{broken")
    res = _mimdex("synth-catalog", "--out", str(tmp_path / "ds"), "--products", "50",
                  "--queries", "5", "--no-progress")
    assert res.returncode == 65
    assert "manifest.json is not valid JSON" in res.stderr and "Traceback" not in res.stderr


def _without(module: str, *argv: str) -> subprocess.CompletedProcess:
    """The CLI in a process where ``module`` cannot be imported (as if not installed)."""
    code = (f"import sys; sys.modules[{module!r}] = None; from mimdex.pipelines import cli; "
            "sys.exit(cli.main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)


def test_a_missing_optional_package_names_the_pip_line_and_exits_2(tmp_path):
    for module, argv, hint in (
            ("faiss", ["build-index", "--embeddings", str(tmp_path), "--out", str(tmp_path / "i")], "mimdex[cpu]"),
            ("ray", ["encode", "--model", "m", "--catalog", "c", "--out", "o"], "ray>=2.40"),
            ("apache_beam", ["build-index", "--embeddings", "e", "--out", "o", "--runner=DirectRunner"],
             "apache-beam>=2.60")):
        res = _without(module, *argv)
        assert res.returncode == 2, (module, res.stderr)
        assert f"needs the '{module}' package" in res.stderr and hint in res.stderr
        assert "Traceback" not in res.stderr
