"""File I/O every layer shares (it imports nothing of spot-fast but the error base class).

- `write_atomic(path, write)`: write a temporary file, fsync it, rename it over `path`, fsync the
  folder: a reader (or a crash) sees the old file or the new one, never half of one.
  `write_json_atomic` and `save_torch_atomic` are its two uses.
- `load_tensors(path)`: the one `torch.load` of a file we did not write ourselves in this process
  (checkpoints, teachers, weights): tensors and plain values only, and one refusal, in one line,
  of anything that is not a torch.save file (random bytes, text), before torch sees it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Callable

import torch

from spot_fast.errors import UserError

TMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync, rename it to `path`, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, str(path)) from None     # the CLI's message names the file
        raise
    os.replace(tmp, path)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:                 # a folder that cannot be opened (some platforms): the rename stands
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """`obj` as indented, key-sorted JSON, written atomically."""
    data = json.dumps(obj, indent=1, sort_keys=True) + "\n"
    write_atomic(path, lambda f: f.write(data), mode="w")


def save_torch_atomic(obj, path: str | os.PathLike) -> None:
    """torch.save, written atomically (the folder is created if needed). Serialised in memory first:
    a write the OS refuses (disk full, `ulimit -f`) then raises its own OSError naming the file,
    where torch's writer reports only "unexpected pos"."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, lambda f: f.write(buf.getbuffer()))


def is_torch_save_file(path: str | os.PathLike) -> bool:
    """Whether a file starts as torch.save writes: a zip archive, or (the legacy format) a pickle."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    except OSError:
        return False


def load_failure(err: Exception) -> str:
    """One line on why torch.load / safetensors refused a file (their messages run to paragraphs)."""
    text = str(err)
    pickled = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if pickled:
        return f"it pickles Python objects ({pickled.group(1)}) besides tensors; save only the state dict"
    if "WeightsUnpickler" in text or isinstance(err, pickle.UnpicklingError):
        return "not a torch.save file of tensors"
    return (text.strip().splitlines() or [type(err).__name__])[0][:160]


def load_tensors(path: str | os.PathLike, what: str = "checkpoint", error: type[Exception] = UserError,
                 fix: str = "", allow: tuple = (), pickled_fix: str = "") -> object:
    """torch.load(path, weights_only=True) on the CPU. A missing file, a file that is not a
    torch.save file, or one torch cannot read raises `error("{what} {path} ...: {fix}")`, one line.
    `allow`: extra classes the file may pickle (a reference run's argparse.Namespace);
    `pickled_fix`: the advice (instead of `fix`) for a file that pickles other Python objects."""
    path = Path(path)
    tail = f": {fix}" if fix else ""
    if not path.is_file():
        raise error(f"{what} {path}: no such file")
    if not is_torch_save_file(path):
        raise error(f"{what} {path} cannot be read (not a torch.save file of tensors){tail}")
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:    # noqa: BLE001 - pickle, zip and torch each raise their own types
        reason = load_failure(err)
        if pickled_fix and reason.startswith("it pickles"):
            tail = f": {pickled_fix}"
        raise error(f"{what} {path} cannot be read ({reason}){tail}") from None
