"""M variants trained in ONE sweep against the same M variants trained as M separate runs
(`spot-fast bench --sections sweep --sweep-variants M` runs the same; the work is `spot_fast.bench.sweep`).

    python benchmarks/bench_sweep.py                          # tiny preset on a synthetic cache (CPU)
    python benchmarks/bench_sweep.py --cache CACHE --preset coco --steps 200 --save   # a real cache (GPU)
"""
from __future__ import annotations

import argparse

import torch

from spot_fast.bench.sweep import SweepBenchConfig, format_sweep_table, run_sweep_bench
from spot_fast.benchinfo import save_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=int, default=4, help="M: variants per grid")
    p.add_argument("--cache", help="an existing train cache (default: build a synthetic one)")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--images", type=int, default=128, help="images of the synthetic cache")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=24, help="steps per variant")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--save", action="store_true", help="write JSON to ./bench-results/")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_sweep_bench(SweepBenchConfig(args.variants, args.preset, args.cache, args.images, args.batch_size,
                                              args.steps, args.device))
    print(format_sweep_table(result))
    if args.save:
        print(f"saved {save_result('bench_sweep', result)}")


if __name__ == "__main__":
    main()
