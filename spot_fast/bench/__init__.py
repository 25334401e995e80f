"""`spot-fast bench`: spot-fast against the reference's way of training SPOT, side by side.

    from spot_fast.bench import BenchConfig, run_bench, format_table
    print(format_table(run_bench(BenchConfig(sections=("stage1",)))))

config.py (BenchConfig: the options, each a `spot-fast bench` flag), reference/ (the reference
code's steps, transcribed; or a checkout's own, in a worker), workloads.py (every row as one
callable), fixtures.py (the data and caches the rows read), sections.py (what each section
runs), timing.py (warm-up, sync, interleaved repeats), flops.py + peaks.py (MFU), contended.py
(stage 1 beside busy neighbours), table.py, runner.py.
"""
from spot_fast.bench.config import SECTIONS, BenchConfig, BenchError
from spot_fast.bench.table import format_table


def run_bench(cfg: BenchConfig, log=print) -> dict:
    """Run the configured sections (spot_fast.bench.runner); the package itself stays light, so
    that the command line lists the bench's options without loading the model and the caches."""
    from spot_fast.bench.runner import run_bench as run
    return run(cfg, log)

__all__ = ["SECTIONS", "BenchConfig", "BenchError", "format_table", "run_bench"]
