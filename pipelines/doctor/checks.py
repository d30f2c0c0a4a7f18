"""What this node has, each as a Check: pure look-ups, no measurement.

A check is ``required`` when its absence stops a job that runs here: torch, faiss, Ray
and Beam on every node, the store when one is named, and on a GPU node (CUDA present, or
``--gpu`` said) CUDA itself, bf16, nvjpeg and faiss's GPU indexes.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str       # the version, device or reason, as the table prints it
    required: bool

    def to_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "required": self.required}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module(name: str, dist: str, required: bool = True) -> Check:
    try:
        importlib.import_module(name)
    except ImportError as exc:
        return Check(name, False, f"not importable ({exc})", required)
    return Check(name, True, _version(dist) or "installed", required)


def torch_checks(gpu: bool | None) -> tuple[list[Check], bool]:
    """torch, CUDA (device, memory), bf16 and nvjpeg; and whether this is a GPU node."""
    try:
        import torch
    except ImportError as exc:
        return [Check("torch", False, f"not importable ({exc})", True)], bool(gpu)
    cuda = torch.cuda.is_available()
    gpu = cuda if gpu is None else gpu
    out = [Check("torch", True, torch.__version__, True)]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.append(Check("cuda", True, f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, CUDA "
                         f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)", gpu))
        out.append(Check("bf16", torch.cuda.is_bf16_supported(), "CUDA bf16" if torch.cuda.is_bf16_supported()
                         else "this GPU has no bf16", gpu))
    else:
        out.append(Check("cuda", False, "no CUDA device" + (" (torch built without CUDA)" if not torch.version.cuda
                                                           else ""), gpu))
        from mimdex.indexing.kmeans import cpu_has_bf16

        has = cpu_has_bf16()
        out.append(Check("bf16", has, "CPU AVX512-BF16/AMX" if has else "CPU without native bf16 (fp32 GEMMs)",
                         gpu))
    from mimdex.encoders.gpu_decode import decoder

    path = decoder(torch.device("cuda" if cuda else "cpu"))
    out.append(Check("nvjpeg", path.startswith("gpu"), path, gpu))
    return out, gpu


def faiss_checks(gpu: bool) -> list[Check]:
    try:
        import faiss
    except ImportError as exc:
        return [Check("faiss", False, f"not importable ({exc})", True)]
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    build = "faiss-gpu" if hasattr(faiss, "StandardGpuResources") else "faiss-cpu"
    return [Check("faiss", True, f"{faiss.__version__} ({build})", True),
            Check("faiss_gpu", gpus > 0, f"{gpus} GPU(s) visible to faiss" if build == "faiss-gpu"
                  else "a CPU-only faiss build", gpu)]


def store_check(uri: str) -> Check:
    """The object store answers for ``uri``: a listing (or a HEAD of an object) succeeds."""
    from mimdex.infra import storage
    from mimdex.infra.errors import MimdexError

    try:
        found = storage.exists(uri)
    except (MimdexError, OSError) as exc:
        return Check("store", False, f"{uri}: {exc}", True)
    return Check("store", True, f"{uri} reachable ({'exists' if found else 'empty: nothing there yet'})", True)


def all_checks(gpu: bool | None, store: str | None) -> tuple[list[Check], bool]:
    out, gpu = torch_checks(gpu)
    out += faiss_checks(gpu)
    out += [_module("ray", "ray"), _module("apache_beam", "apache-beam"), _module("tokenizers", "tokenizers")]
    if store:
        out.append(store_check(store))
    return out, gpu
