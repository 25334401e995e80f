"""`spot-fast demo` quiet and beside a busy neighbour on every core: the whole demo's wall time
(synthetic data, caches, stage 1, stage 2, DINOSAUR, report), as a user on a shared machine
sees it.

    python benchmarks/bench_demo_contended.py              # quiet, then contended (~7 + ~12 min on 2 cores)
    python benchmarks/bench_demo_contended.py --order contended-first

Each run is the installed CLI (`python -m spot_fast.cli.app demo --out <tmp>`) with its default
thread policy. The neighbour is `spot_fast.bench.contended.busy_neighbours`: one spinning process
per usable core, each in a session of its own (as another job is), killed when the run ends.
Printed and saved (benchmarks/results/): both wall times and contended / quiet.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from spot_fast.bench.contended import busy_neighbours
from spot_fast.benchinfo import result_path, save_result
from spot_fast.threads import usable_cores


def run_demo(out: Path, extra: list[str]) -> float:
    """Wall seconds of one `spot-fast demo` into `out` (an error if it fails)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spot_fast.cli.app", "demo", "--out", str(out), *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--order", choices=("quiet-first", "contended-first"), default="quiet-first")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    p.add_argument("demo_args", nargs="*", help="extra `spot-fast demo` options (after --)")
    args = p.parse_args()
    path = result_path("bench_demo_contended", args.out or Path(__file__).parent / "results")
    work = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    result: dict = {"args": vars(args), "neighbours": usable_cores()}
    order = ("quiet", "contended") if args.order == "quiet-first" else ("contended", "quiet")
    try:
        for kind in order:
            out = work / kind
            if kind == "quiet":
                result["quiet_s"] = run_demo(out, args.demo_args)
            else:
                with busy_neighbours(usable_cores(), limit_s=7200):
                    result["contended_s"] = run_demo(out, args.demo_args)
            print(f"{kind}: {result[kind + '_s']:.0f} s", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            save_result("bench_demo_contended", result, path)
        result["contended_over_quiet"] = result["contended_s"] / result["quiet_s"]
        print(f"demo wall time: quiet {result['quiet_s']:.0f} s, beside {result['neighbours']} busy "
              f"neighbour(s) {result['contended_s']:.0f} s: {result['contended_over_quiet']:.2f}x")
        print(f"wrote {save_result('bench_demo_contended', result, path)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
