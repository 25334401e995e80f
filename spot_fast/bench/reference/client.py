"""The caller's side of `worker.py`: start a worker process, ask for steps, always stop it."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from spot_fast.errors import UserError


class ReferenceRepoError(UserError, ValueError):
    """--reference-repo is not a checkout of the reference repository, or it cannot run here."""


REPO_FILES = ("spot.py", "transformer.py", "slot_attn.py", "utils_spot.py", "datasets.py", "ocl_metrics.py",
              "models_vit.py")


def check_repo(repo: str | Path, option: str = "--reference-repo") -> Path:
    """The checkout's path, or a ReferenceRepoError naming what is missing and the fix; `option`:
    how the caller spells the input (`--reference-repo` on the command line, `reference_repo=`)."""
    repo = Path(repo)
    missing = [f for f in REPO_FILES if not (repo / f).is_file()]
    if missing:
        raise ReferenceRepoError(f"{option}{'' if option.endswith('=') else ' '}{repo}: not a checkout of the SPOT reference repository "
                                 f"(no {', '.join(missing[:3])}); pass the folder holding spot.py and train_spot.py")
    return repo


def repo_commit(repo: str | Path) -> str | None:
    """The checkout's commit (git, or a COMMIT file beside its sources)."""
    repo = Path(repo)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    f = repo / "COMMIT"
    return f.read_text().strip() if f.is_file() else None


class Worker:
    """`Worker(impl, root, preset=..., batch=..., repo=...)`; `step(section)` -> seconds; `close()`."""

    def __init__(self, impl: str, root: str | Path, *, preset: str, batch: int, device: str = "cpu",
                 threads: int = 0, workers: int = 4, mask_size: int = 320, repo: str | Path | None = None,
                 stderr=None):
        cmd = [sys.executable, "-m", "spot_fast.bench.reference.worker", "--impl", impl, "--root", str(root),
               "--preset", preset, "--batch", str(batch), "--device", device, "--threads", str(threads),
               "--workers", str(workers), "--mask-size", str(mask_size)]
        if repo is not None:
            cmd += ["--repo", str(repo)]
        self.impl, self.last_cpu = impl, 0.0
        env = {**os.environ, "TIMM_FUSED_ATTN": "0"}   # timm's attention as DINO's (read when timm loads)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr or
                                     subprocess.DEVNULL, text=True, bufsize=1, env=env)
        self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise ReferenceRepoError(f"the {self.impl} reference worker stopped (exit code {code}); run "
                                     f"`python -m spot_fast.bench.reference.worker` with the same options to see why")
        return json.loads(line)

    def step(self, section: str) -> float:
        """One step of `section`: its wall seconds (its CPU seconds in `last_cpu`)."""
        self.proc.stdin.write(section + "\n")
        self.proc.stdin.flush()
        answer = self._read()
        self.last_cpu = answer["cpu_seconds"]
        return answer["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
