"""What made a run's numbers: the machine, the float kernels, and a digest of every evaluated model.

Two runs of the same study on two machines agree to the bit only when the same kernels ran: the torch
build, its BLAS (MKL, OpenBLAS), the vector instructions ATen dispatched to (``AVX512``, ``AVX2``, ...),
MKL's code path (``MKL_CBWR``) and the thread counts. :func:`machine_info` records them; where two runs
differ, comparing the digests of their models (:func:`model_digest`) finds the first stage whose output
moved.
"""

from __future__ import annotations

import hashlib
import json
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


LOCATION_KEYS = ("model", "retain_result")


def evaluation_digest(eval_file: str | os.PathLike) -> str:
    """A digest of an evaluation file's results (canonical JSON without the paths it names in
    ``LOCATION_KEYS``), so the same evaluation in two study folders, or on two machines, has one digest."""
    data = json.loads(Path(eval_file).read_text())
    for key in LOCATION_KEYS:
        data.pop(key, None)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def peak_rss_gib() -> float:
    """The largest resident set of this process or any of its finished children, in GiB (Linux: KiB units)."""
    largest = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return largest * scale / 2**30


def compare_studies(first: dict[str, Any], second: dict[str, Any]) -> list[str]:
    """Where two studies' results (``study.json`` data) part: machine and kernel differences, then per seed
    and split the first evaluated model (in the order the seed's report lists them) whose weights differ.
    Empty when both ran on the same kernels and every shared model is bit for bit the same."""
    lines = []
    m1, m2 = first.get("machine", {}), second.get("machine", {})
    for key in sorted(set(m1) | set(m2)):
        if m1.get(key) != m2.get(key) and key not in ("platform",):
            lines.append(f"machine.{key}: {m1.get(key)!r} != {m2.get(key)!r}")
    for phase in ("validation", "test"):
        seeds1, seeds2 = first.get("models", {}).get(phase, {}), second.get("models", {}).get(phase, {})
        for seed in sorted(set(seeds1) & set(seeds2), key=int):
            for split in sorted(set(seeds1[seed]) & set(seeds2[seed])):
                other = {(r["method"], r["alpha"]): r for r in seeds2[seed][split]}
                for row in seeds1[seed][split]:
                    twin = other.get((row["method"], row["alpha"]))
                    if twin is not None and twin["model_digest"] != row["model_digest"]:
                        alpha = "" if row["alpha"] is None else f" α = {row['alpha']:g}"
                        lines.append(f"{phase} seed {seed} {split}: first differing model {row['method']}{alpha} "
                                     f"({row['model_digest']} != {twin['model_digest']})")
                        break
    return lines


#: What every study result (``study.json``) holds: the keys ``perta compare`` and the replication table read.
STUDY_KEYS = ("settings", "test", "machine", "models")


def load_study_result(path: str | os.PathLike) -> dict[str, Any]:
    """A study's ``study.json`` (or the folder holding it), refused in one line when it is missing, not JSON,
    or not a study's result (an evaluation file, a seed's report)."""
    from perta_lightning.errors import PertaFileNotFoundError, PertaValueError

    file = Path(path)
    if file.is_dir():
        file = file / "study.json"
    if not file.is_file():
        raise PertaFileNotFoundError(f"{file}: no study result here (perta study writes <output>/study.json)")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as error:
        raise PertaValueError(f"{file}: cannot read a study result ({error})") from error
    missing = [key for key in STUDY_KEYS if not isinstance(data, dict) or key not in data]
    if missing:
        raise PertaValueError(f"{file}: not a study result (perta study's study.json): no key(s) {missing}")
    return data


def compare_main(argv: list[str]) -> None:
    """``perta compare A/study.json B/study.json``: print where two study runs part (nothing if nowhere)."""
    from perta_lightning.errors import PertaValueError

    if argv and argv[0] in ("-h", "--help"):
        print("usage: perta compare FIRST/study.json SECOND/study.json\n\n" + (compare_studies.__doc__ or ""))
        return
    if len(argv) != 2:
        raise PertaValueError(f"compare takes two study.json files, got {len(argv)} argument(s)")
    data = [load_study_result(path) for path in argv]
    lines = compare_studies(*data)
    print("\n".join(lines) if lines else "the same kernels and the same bytes in every shared model")
