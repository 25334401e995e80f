"""A process that runs the reference's steps on request: the transcription (`--impl ours`) or a
checkout of the reference repository (`--impl checkout --repo PATH`), so that the two can be
timed turn about, each in a process of its own (the checkout's generic module names stay out of
the caller).

    python -m spot_fast.bench.reference.worker --impl checkout --repo PATH --root DATA --preset coco --batch 8

Protocol (one JSON object per line): the worker prints {"ready": true}; each line sent, a section
name ("stage1" | "stage2" | "eval"), runs one step of it (built on first use; the other
sections' loaders are dropped) and answers {"section": ..., "seconds": ..., "cpu_seconds": ...}, the
step's wall time with the device synchronised and this process's CPU time (its loader workers'
excluded: they overlap the step, as in the reference); "quit" ends it. The checkout's own prints go to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("ours", "checkout"), required=True)
    p.add_argument("--repo", help="the reference checkout (with --impl checkout)")
    p.add_argument("--root", required=True, help="the bench's COCO-format data (reference.data.write_dataset)")
    p.add_argument("--preset", default="coco")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave as is)")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (the reference's 4)")
    p.add_argument("--mask-size", type=int, default=320)
    args = p.parse_args(argv)
    if os.environ.get("TIMM_FUSED_ATTN") != "0":   # timm's attention as DINO's: explicit q @ k^T, softmax
        sys.exit("run the worker with TIMM_FUSED_ATTN=0 in its environment (timm reads it when it loads)")
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout = sys.stderr                        # the checkout prints; the protocol owns fd 1's copy
    import torch
    from spot_fast.config import preset
    from spot_fast.encoders import FrozenEncoder
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.impl == "checkout":
        sys.path.insert(0, os.path.abspath(args.repo))
        from spot_fast.bench.reference import checkout as impl
    else:
        from spot_fast.bench.reference import steps as impl
    cfg = preset(args.preset)
    vit_state = FrozenEncoder.create(cfg.encoder, random_init=True).vit.state_dict()
    device = torch.device(args.device)
    built: dict[str, object] = {}
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        section = line.strip()
        if section == "quit":
            break
        if section not in built:
            built.clear()
            torch.manual_seed(0)
            built[section] = impl.SECTIONS[section](cfg, vit_state, args.root, args.batch, device,
                                                    workers=args.workers, mask_size=args.mask_size)
        t0, c0 = time.perf_counter(), time.process_time()
        built[section]()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        protocol.write(json.dumps({"section": section, "seconds": time.perf_counter() - t0,
                                   "cpu_seconds": time.process_time() - c0}) + "\n")


if __name__ == "__main__":
    main()
