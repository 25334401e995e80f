"""The frozen stage-2 teacher: a spot-fast run / checkpoint, or a reference-format checkpoint.

    teacher_model, teacher_id = load_teacher("runs/teacher", student_cfg)   # eval mode, no gradients

A reference checkpoint is read into the student's geometry with the decoder (AR with 9 orders,
raster only, or MLP) and slot init its weights show. Anything that does not fit the student
(another encoder or size, another number of slots, a stage-2 model) is refused with the reason.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from spot_fast.checkpoint import CheckpointMismatch, load_reference
from spot_fast.config import SPOTConfig
from spot_fast.encoders import file_sha256
from spot_fast.io import load_tensors
from spot_fast.model import SPOT
from spot_fast.runs import (CHECKSUM, FORMAT, RunError, check_belongs, check_weights, checkpoint_file,
                            checkpoint_weights, read_run_config, run_folder_of, verify_checkpoint)
from spot_fast.train.config import TrainError

GEOMETRY = ("name", "image_size", "patch_size", "embed_dim")


def read_checkpoint_file(path: Path, what: str = "--teacher") -> dict:
    """Any checkpoint file, tensors and plain values only (a reference run's pickled argparse
    Namespace of options is allowed); TrainError if it cannot be read."""
    return load_tensors(path, what, TrainError, allow=(argparse.Namespace,),
                        fix="give a spot-fast stage-1 run folder, one of its checkpoints, or a reference-format .pth")


def reference_config(state: dict, like: SPOTConfig) -> SPOTConfig:
    """The stage-1 config a reference state dict was trained with, sizes taken from `like`."""
    state = state.get("model", state)
    if "dec.pos_embed" in state:
        dec = dataclasses.replace(like.decoder, kind="mlp", train_orders="standard", eval_orders="standard")
    else:
        bos = state.get("bos_tokens")
        orders = "standard" if bos is not None and bos.shape[0] == 1 else "random"
        dec = dataclasses.replace(like.decoder, kind="transformer", train_orders=orders, eval_orders="standard")
    init = "shared_gaussian" if "slot_attn.slot_mu" in state else "embedding"
    sa = dataclasses.replace(like.slot_attention, init=init, truncate="none")
    return dataclasses.replace(like, slot_attention=sa, decoder=dec, stage=1)


def _check_fits(cfg: SPOTConfig, student: SPOTConfig, where: str) -> None:
    problems = [f"encoder.{k} {getattr(cfg.encoder, k)} vs {getattr(student.encoder, k)}" for k in GEOMETRY
                if getattr(cfg.encoder, k) != getattr(student.encoder, k)]
    if cfg.slot_attention.num_slots != student.slot_attention.num_slots:
        problems.append(f"num_slots {cfg.slot_attention.num_slots} vs {student.slot_attention.num_slots}")
    if cfg.stage != 1:
        problems.append("it is a stage-2 model")
    if problems:
        raise TrainError(f"teacher {where} does not fit the student (teacher vs student: {'; '.join(problems)}): "
                         f"use the stage-1 run trained on this cache, or --set the student to match")


def load_teacher(path: str, student: SPOTConfig, device="cpu", weights: str | None = None) -> tuple[SPOT, str]:
    """(the frozen teacher for `student`, in eval mode with gradients off; its id: the checksum of
    its checkpoint). `weights`: the encoder weights id of the student's features; a spot-fast
    teacher trained on features of other weights is refused, even when the shapes match."""
    file = checkpoint_file(path) if Path(path).exists() else Path(path)
    if not file.is_file():
        raise TrainError(f"--teacher {path}: no such run folder or checkpoint")
    raw = read_checkpoint_file(file)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:      # a spot-fast checkpoint: verified
        try:
            verify_checkpoint(raw, file, "--teacher")
            check_belongs(raw, file, read_run_config(run_folder_of(file)))
            check_weights(checkpoint_weights(raw), weights, f"teacher {path}",
                          "train the teacher on this cache (or give the cache its features came from)")
        except RunError as e:
            raise TrainError(str(e)) from None
        cfg = SPOTConfig.from_dict(raw["config"])
        _check_fits(cfg, student, str(path))
        model = SPOT(cfg)
        model.load_state_dict(raw["model"])
        teacher_id = raw[CHECKSUM]
    else:
        cfg = reference_config(raw, student)
        _check_fits(cfg, student, str(path))
        model = SPOT(cfg)
        try:
            load_reference(model, raw)
        except CheckpointMismatch as e:
            raise TrainError(f"teacher {path} does not fit the student's config: {e}") from None
        teacher_id = file_sha256(file)
    return model.to(device).eval().requires_grad_(False), teacher_id
