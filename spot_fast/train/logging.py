"""What a run reports: `log.jsonl` always, TensorBoard when it is installed, a rich progress bar
(img/s, ETA, loss). Only rank 0 writes; the others get a `RunLog(None)` that does nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

LOG_FILE = "log.jsonl"


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:     # tensorboard is optional (pip install 'spot-fast[tensorboard]')
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def truncate_log(path: Path, step: int) -> None:
    """Keep only the records of steps <= `step` (a resumed run rewrites what comes after)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


class RunLog:
    """`record(kind, step, **values)` appends one JSON line (and TensorBoard scalars)."""

    def __init__(self, folder: Path | None, total_steps: int = 0, done_steps: int = 0, progress: bool = True):
        self.folder = folder
        self.file = open(folder / LOG_FILE, "a") if folder is not None else None
        self.tb = _tensorboard(folder) if folder is not None else None
        self.bar, self.task = None, None
        if folder is not None and progress:
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

    def progress(self, step: int, info: str = "") -> None:
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
