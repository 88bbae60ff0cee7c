"""What made a run's numbers: the machine, the float kernels, and a digest of every evaluated model.

Two runs of the same study on two machines agree to the bit only when the same kernels ran: the torch
build, its BLAS (MKL, OpenBLAS), the vector instructions ATen dispatched to (``AVX512``, ``AVX2``, ...),
MKL's code path (``MKL_CBWR``) and the thread counts. :func:`machine_info` records them; where two runs
differ, comparing the digests of their models (:func:`model_digest`) finds the first stage whose output
moved.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import resource
import sys
from pathlib import Path
from typing import Any

#: Environment variables that choose kernels or thread counts, recorded when set.
KERNEL_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "MKL_NUM_THREADS", "OMP_NUM_THREADS",
                      "MKL_ENABLE_INSTRUCTIONS", "CUBLAS_WORKSPACE_CONFIG")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what ``platform`` says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    except OSError:
        pass
    return []


def machine_info() -> dict[str, Any]:
    """The machine and the float kernels of this process, as plain JSON."""
    import torch

    config = torch.__config__.show()
    build = dict(re.findall(r"(\w+)=([^,\s]*)", config))
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_vector_flags": _cpu_flags(),
        "torch": torch.__version__,
        "torch_commit": build.get("COMMIT_SHA"),
        "blas": build.get("BLAS_INFO"),
        "lapack": build.get("LAPACK_INFO"),
        "blas_library": next((line.strip(" -") for line in config.splitlines()
                              if "Math Kernel Library" in line or "OpenBLAS" in line), None),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "environment": {name: os.environ[name] for name in KERNEL_ENVIRONMENT if name in os.environ},
    }
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def model_digest(model_dir: str | os.PathLike) -> str | None:
    """A digest of a model folder's weight files (``*.safetensors``, by name and checksum); ``None`` if none."""
    from perta_lightning.stages import checksum_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    hasher = hashlib.blake2b(digest_size=16)
    for file in files:
        hasher.update(f"{file.name}:{checksum_file(file)}\n".encode())
    return hasher.hexdigest()


def peak_rss_gib() -> float:
    """The largest resident set of this process or any of its finished children, in GiB (Linux: KiB units)."""
    largest = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return largest * scale / 2**30
