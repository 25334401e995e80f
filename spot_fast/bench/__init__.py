"""`spot-fast bench`: spot-fast against the reference's way of training SPOT, side by side.

    from spot_fast.bench import BenchConfig, run_bench, format_table
    print(format_table(run_bench(BenchConfig(sections=("stage1",)))))

timing.py (warm-up, sync, interleaved repeats), flops.py (the FLOP count behind MFU),
workloads.py (the reference and spot-fast paths), runner.py (sections, table, JSON).
"""
from spot_fast.bench.runner import SECTIONS, BenchConfig, BenchError, format_table, run_bench

__all__ = ["SECTIONS", "BenchConfig", "BenchError", "format_table", "run_bench"]
