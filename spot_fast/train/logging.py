"""What a run reports: `log.jsonl` always, TensorBoard when it is installed, and progress: on a
terminal a rich bar that ticks every step (img/s, ETA, the last logged loss); without one (make,
CI, nohup) a plain line every `PLAIN_EVERY_S` seconds. Only rank 0 writes; the others get a
`RunLog(None)` that does nothing."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from spot_fast.io import write_atomic

LOG_FILE = "log.jsonl"
PLAIN_EVERY_S = 30.0    # seconds between progress lines without a terminal


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:     # tensorboard is optional (pip install 'spot-fast[tensorboard]')
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (a resumed run rewrites what comes after); a line a
    kill cut in half is dropped."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_atomic(path, lambda f: f.write("".join(line + "\n" for line in keep)), mode="w")


class RunLog:
    """`record(kind, step, **values)` appends one JSON line (and TensorBoard scalars); `tick` moves
    the progress every step, `progress` also updates its loss text at log steps."""

    def __init__(self, folder: Path | None, total_steps: int = 0, done_steps: int = 0, progress: bool = True,
                 terminal: bool | None = None, plain_every: float = PLAIN_EVERY_S):
        self.folder, self.total = folder, total_steps
        self.file = open(folder / LOG_FILE, "a") if folder is not None else None
        self.tb = _tensorboard(folder) if folder is not None else None
        self.bar, self.task, self.info = None, None, ""
        terminal = sys.stdout.isatty() if terminal is None else terminal
        self.plain_every = plain_every if folder is not None and progress and not terminal else None
        self.last_plain = time.monotonic()
        if folder is not None and progress and terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)
            self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, info="")
            self.bar.start()

    def record(self, kind: str, step: int, **values) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def tick(self, step: int, epoch: int) -> None:
        """After every step: the host's step count, no device value (no sync)."""
        if self.bar is not None:
            self.bar.update(self.task, completed=step)
        elif self.plain_every is not None and time.monotonic() - self.last_plain >= self.plain_every:
            self.last_plain = time.monotonic()
            self.say(f"step {step}/{self.total} (epoch {epoch + 1}){'  ' + self.info if self.info else ''}")

    def progress(self, step: int, info: str = "") -> None:
        self.info = info
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=info)

    def say(self, message: str) -> None:
        if self.folder is None:
            return
        if self.bar is not None:
            self.bar.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
