"""The bench's transcription of the reference code beside a checkout of the reference repository,
section by section (stage 1, stage 2, evaluation): the same preset, batch, data and threads, each
in a worker process of its own, timed turn about (the order alternates every repeat, so a drift
of the machine falls on both alike). The transcription stands in for the reference in
`spot-fast bench`, so it must cost what the real code costs: target within +-15% per section.

    python benchmarks/reference_parity.py --repo PATH_TO_SPOT_CHECKOUT            # COCO, batch 8, 1 thread
    python benchmarks/reference_parity.py --repo PATH --preset tiny --batch 4 --repeats 2 --mask-size 32

The checkout needs its own imports: timm, torchvision, pycocotools, scipy, einops, torchmetrics.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

from spot_fast.bench.reference.client import Worker, check_repo, repo_commit
from spot_fast.bench.reference.data import write_dataset
from spot_fast.benchinfo import result_path, save_result

SECTIONS = ("stage1", "stage2", "eval")
TOLERANCE = 0.15


def measure(workers: dict[str, Worker], sections, warmup: int, repeats: int, log) -> dict:
    """{section: {impl: [seconds per repeat]}}, the implementations' order alternating per repeat."""
    out = {}
    names = list(workers)
    for section in sections:
        for name in names:
            for _ in range(warmup):
                workers[name].step(section)
        times = {name: [] for name in names}
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                times[name].append(workers[name].step(section))
            log(f"  {section} repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
        out[section] = times
    return out


def table(times: dict, header: str) -> str:
    lines = [header, f"{'section':<8} {'transcription s':>16} {'checkout s':>11} {'ratio':>7}  within +-15%",
             "-" * 60]
    for section, t in times.items():
        ours, theirs = statistics.median(t["ours"]), statistics.median(t["checkout"])
        ratio = ours / theirs
        lines.append(f"{section:<8} {ours:>16.3f} {theirs:>11.3f} {ratio:>7.3f}  "
                     f"{'yes' if abs(ratio - 1) <= TOLERANCE else 'NO'}")
    lines.append("times: median of the repeats, one step each (the loader's wait included); "
                 "ratio = transcription / checkout")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", required=True, help="a checkout of the SPOT reference repository")
    p.add_argument("--preset", default="coco")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each worker")
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers (the reference's 4)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=16, help="distinct images of the data")
    p.add_argument("--mask-size", type=int, default=320)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="JSON folder (default ./bench-results)")
    args = p.parse_args()
    repo = check_repo(args.repo)
    sections = [s for s in args.sections.split(",") if s]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)   # noqa: E731
    with tempfile.TemporaryDirectory(prefix="reference-parity-") as tmp:
        from spot_fast.config import preset
        size = preset(args.preset).encoder.image_size
        entries = args.batch * (args.warmup + args.repeats + 2 * args.workers + 4)
        root = write_dataset(tmp, args.images, entries, short_side=max(size, 480 if size >= 224 else size))
        kw = dict(preset=args.preset, batch=args.batch, device=args.device, threads=args.threads,
                  workers=args.workers, mask_size=args.mask_size)
        workers = {}
        try:
            workers["ours"] = Worker("ours", root, **kw)
            workers["checkout"] = Worker("checkout", root, repo=repo, **kw)
            times = measure(workers, sections, args.warmup, args.repeats, log)
        finally:
            for w in workers.values():
                w.close()
    header = (f"reference parity: preset {args.preset}, batch {args.batch}, {args.threads} torch thread(s) per "
              f"process, {args.workers} loader workers, {args.repeats} repeats, checkout {repo} "
              f"@ {repo_commit(repo) or 'unknown commit'}")
    print(table(times, header))
    result = {"config": vars(args), "checkout_commit": repo_commit(repo), "times_s": times,
              "ratio": {s: statistics.median(t["ours"]) / statistics.median(t["checkout"]) for s, t in times.items()}}
    print(f"saved {save_result('reference_parity', result, result_path('reference_parity', args.out))}")


if __name__ == "__main__":
    main()
