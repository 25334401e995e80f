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
    """{section: {"wall": {impl: [s]}, "cpu": {impl: [s]}}}, the order alternating per repeat."""
    out = {}
    names = list(workers)
    for section in sections:
        for name in names:
            for _ in range(warmup):
                workers[name].step(section)
        wall, cpu = {name: [] for name in names}, {name: [] for name in names}
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                wall[name].append(workers[name].step(section))
                cpu[name].append(workers[name].last_cpu)
            log(f"  {section} repeat {r + 1}/{repeats}: " + ", ".join(
                f"{n} {wall[n][-1]:.2f} s ({cpu[n][-1]:.2f} s CPU)" for n in names))
        out[section] = {"wall": wall, "cpu": cpu}
    return out


def ratios(times: dict) -> dict:
    """{section: {"wall": transcription / checkout, "cpu": ...}} of the medians."""
    return {s: {k: statistics.median(t[k]["ours"]) / statistics.median(t[k]["checkout"]) for k in ("wall", "cpu")}
            for s, t in times.items()}


def table(times: dict, header: str) -> str:
    lines = [header, f"{'section':<8} {'wall s: ours':>13} {'checkout':>9} {'ratio':>6} {'CPU s: ours':>12} "
             f"{'checkout':>9} {'ratio':>6}  within +-15%", "-" * 82]
    for section, r in ratios(times).items():
        t = times[section]
        cells = [statistics.median(t[k][n]) for k in ("wall", "cpu") for n in ("ours", "checkout")]
        ok = "yes" if all(abs(v - 1) <= TOLERANCE for v in r.values()) else \
            "CPU only" if abs(r["cpu"] - 1) <= TOLERANCE else "NO"
        lines.append(f"{section:<8} {cells[0]:>13.2f} {cells[1]:>9.2f} {r['wall']:>6.3f} {cells[2]:>12.2f} "
                     f"{cells[3]:>9.2f} {r['cpu']:>6.3f}  {ok}")
    lines.append("median of the repeats, one step each; wall: the step as timed (the loader's wait included); "
                 "CPU: the step's process CPU time (steady on a shared machine; the loader workers' CPU "
                 "excluded); ratio = transcription / checkout")
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
    repo = check_repo(args.repo, option="--repo")
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
    result = {"config": vars(args), "checkout_commit": repo_commit(repo), "times_s": times, "ratio": ratios(times)}
    print(f"saved {save_result('reference_parity', result, result_path('reference_parity', args.out))}")


if __name__ == "__main__":
    main()
