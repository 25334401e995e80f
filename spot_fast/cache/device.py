"""Batches onto the accelerator, overlapped with the step: non-blocking copies on a side stream, cast on the device.

    for batch in device_batches(cache.train_reader(64, dtype=None), "cuda", torch.bfloat16):
        step(batch)                      # features / split_tokens are bf16 CUDA tensors

On CUDA, batch i+1 is copied (from pinned memory, on a side stream) and cast while the step of
batch i runs; the step's stream waits for the copy by an event, never the host. On other devices
it is a plain move + cast. 8-bit caches' tokens travel as stored (one byte a value) with their
per-token scales and are dequantised on the device, in `dtype` (codec.dequantize). Host buffers are released in the order TrainReader's ring expects: a
host batch is not needed once its copy has finished, which is checked before the reader is asked
for the batch that may overwrite it (two batches later).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator

import torch

from spot_fast.cache.codec import dequantize, scale_name

TOKENS = ("features", "split_tokens")      # the entries cast to the compute dtype


def _move(batch: dict, device: torch.device, dtype: torch.dtype, non_blocking: bool,
          targets: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
    """Every tensor of `batch` on `device` (tokens cast to `dtype` there, 8-bit tokens dequantised
    there with their `<name>_scale`, which the result no longer holds); other entries as they are."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=non_blocking)
        out[k] = v
    for k in TOKENS:
        if k in out:
            scale = out.pop(scale_name(k), None)
            out[k] = out[k].to(dtype) if scale is None else dequantize(out[k], scale, dtype)
    targets = out.pop("targets", None) or targets         # a batch may carry its own (CacheBatches)
    if targets is not None and "split_tokens" in out:     # the stage-2 target from what the student reads
        if isinstance(targets, torch.nn.Module):
            targets.to(device)                             # once: a no-op when it is there already
        out["features"] = targets(out["split_tokens"]).to(dtype)
    return out


def device_batches(batches: Iterable[dict], device: str | torch.device, dtype: torch.dtype = torch.float32,
                   targets: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Iterator[dict]:
    """`batches` with every tensor on `device` and the token tensors cast to `dtype` on the device.
    `targets` (e.g. tail.FrozenTail), or a batch's own "targets" entry: replaces `features` by
    targets(split_tokens), on the device."""
    device = torch.device(device)
    if device.type != "cuda":
        for batch in batches:
            yield _move(batch, device, dtype, non_blocking=False, targets=targets)
        return
    yield from _cuda_batches(iter(batches), device, dtype, targets)


def _cuda_batches(host: Iterator[dict], device: torch.device, dtype: torch.dtype, targets=None) -> Iterator[dict]:
    side = torch.cuda.Stream(device)
    copies: deque[torch.cuda.Event] = deque()      # copy events of the last two host batches

    def send(batch: dict) -> tuple[dict, torch.cuda.Event]:
        with torch.cuda.stream(side):
            out = _move(batch, device, dtype, non_blocking=True, targets=targets)
            event = torch.cuda.Event()
            event.record(side)
        copies.append(event)
        return out, event

    try:
        yield from _overlapped(host, send, copies, device)
    finally:                                # host buffers may be reused once we return: copies done
        for event in copies:
            event.synchronize()


def _overlapped(host: Iterator[dict], send, copies: deque, device: torch.device) -> Iterator[dict]:
    nxt = next(host, None)
    nxt = send(nxt) if nxt is not None else None
    while nxt is not None:
        out, event = nxt
        main = torch.cuda.current_stream(device)
        main.wait_event(event)
        for v in out.values():
            if isinstance(v, torch.Tensor):
                v.record_stream(main)       # allocated on the side stream, used on the main one
        if len(copies) == 2:                # the next host batch may overwrite the one before `out`
            copies.popleft().synchronize()  # its copy finished a step ago: no wait in practice
        batch = next(host, None)
        nxt = send(batch) if batch is not None else None
        yield out
