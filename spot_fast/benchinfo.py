"""What every benchmark records beside its figures: the hardware, the versions, the date, and
a result file named with the hardware and date, in the folder the caller names or, by default,
`bench-results/` under the current folder (never inside the installed package or its checkout)."""
from __future__ import annotations

import json
import os
import platform
import re
from datetime import datetime, timezone
from pathlib import Path

import torch

DEFAULT_FOLDER = "bench-results"     # under the current folder


def hardware() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "sms": p.multi_processor_count, "memory_gib": round(p.total_memory / 2**30, 1),
               "capability": f"{p.major}.{p.minor}"}
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "ram_gib": round(ram, 1),
            "platform": platform.platform(), "gpu": gpu}


def versions(*modules: str) -> dict:
    """Python, torch, CUDA, triton and spot-fast, plus the named modules' versions."""
    import importlib

    import spot_fast
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "spot_fast": spot_fast.__version__}
    for name in ("triton", *modules):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            out[name] = None
    return out


def hardware_tag(hw: dict | None = None) -> str:
    """A file-name-safe name of the machine: the GPU's (e.g. nvidia-h100-80gb-hbm3) or cpuN."""
    hw = hw or hardware()
    name = hw["gpu"]["name"] if hw["gpu"] else f"cpu{hw['cores_usable']}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def result_path(benchmark: str, out: str | os.PathLike | None = None) -> Path:
    """`<out or ./bench-results>/<benchmark>-<hardware>-<YYYYMMDDTHHMMSSZ>.json`."""
    folder = Path(out) if out else Path.cwd() / DEFAULT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{benchmark}-{hardware_tag()}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.json"


def save_result(benchmark: str, payload: dict, path: Path | None = None) -> Path:
    """Write `payload` with hardware, versions and date (unless it has them) to `path`
    (default: a new `result_path`); returns the path. Call again with the same path to update."""
    payload = {"benchmark": benchmark, "date": datetime.now(timezone.utc).isoformat(), "hardware": hardware(),
               "versions": versions(), **payload}
    path = path or result_path(benchmark)
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def evict(files) -> str:
    """Drop `files` from the page cache before a cold read; returns how: "drop_caches" (the whole
    page cache, where this process may write /proc/sys/vm/drop_caches) or "posix_fadvise"
    (DONTNEED per file: clean pages only, after a sync)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return "drop_caches"
    except OSError:
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise"
