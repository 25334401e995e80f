"""spot-fast against the reference's way of training SPOT, side by side in one run.

    python benchmarks/bench_train.py                      # COCO shapes, batch 8 on CPU / 64 on GPU
    python benchmarks/bench_train.py --sections stage1,eval --repeats 5
    python benchmarks/bench_train.py --cache CACHE        # read a real cache (a --split both folder for eval)
    python benchmarks/bench_train.py --reference-repo PATH    # the reference rows run a checkout's own code
    python benchmarks/bench_train.py --sections contended --preset demo    # stage 1 beside busy neighbours

The same as `spot-fast bench` (spot_fast/bench/ holds the code); every option of it applies.
"""
from spot_fast.cli.app import app

if __name__ == "__main__":
    import sys
    app(["bench", *sys.argv[1:]])
