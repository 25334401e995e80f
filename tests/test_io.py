"""spot_fast.io: the one torch.load of untrusted files refuses what is not a torch.save file in
one line, and the atomic writer leaves the old file or the new one, and the OS's own error."""
from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
import torch

from spot_fast.errors import UserError
from spot_fast.io import load_tensors, save_torch_atomic, write_json_atomic
from train_case import REPO, run_env


@pytest.mark.parametrize("content", [os.urandom(4096), b"hello, I am a text file\n" * 10, b""])
def test_load_tensors_refuses_what_is_not_a_torch_save_file(tmp_path, content):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_tensors(path, "--teacher", fix="give a run folder")
    assert str(err.value) == f"--teacher {path} cannot be read (not a torch.save file of tensors): give a run folder"


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert path.read_text() == '{\n "a": 1\n}\n' and os.listdir(tmp_path) == ["a.json"]


def test_a_file_size_limit_is_the_os_error_naming_the_file(tmp_path):
    """torch's writer reports a refused write as "unexpected pos"; the checkpoint writer says EFBIG."""
    code = ("import sys, torch; from spot_fast.io import save_torch_atomic\n"
            "try:\n    save_torch_atomic({'x': torch.zeros(100000)}, sys.argv[1])\n"
            "except OSError as e:\n    print(e.errno, e.filename)\n")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))   # noqa: E731
    target = tmp_path / "ck.pt"
    res = subprocess.run([sys.executable, "-c", code, str(target)], env=run_env(), cwd=REPO, capture_output=True,
                         text=True, preexec_fn=limit, timeout=120)
    assert res.stdout.split() == ["27", str(target)], res.stderr
    assert not list(tmp_path.iterdir())
    save_torch_atomic({"x": torch.zeros(3)}, target)
    assert torch.equal(load_tensors(target)["x"], torch.zeros(3))
