"""`spot-fast demo`: generate the synthetic dataset, cache it, train stage 1, stage 2 and DINOSAUR,
evaluate them beside two trivial baselines, and write a table, pictures and a Markdown report.
Its options are DemoConfig's fields (generated, as `train`'s are from TrainConfig).

    spot-fast demo                          # runs/demo, a random-init ViT, minutes on a CPU
    spot-fast demo --weights dino_deitsmall8_pretrain.pth --encoder dino_vits8 --out runs/demo-dino
"""
from __future__ import annotations

import typer

from spot_fast.cli.options import command, config_flags, values_of


def demo_command():
    """The `spot-fast demo` command function, its options read from DemoConfig."""
    from spot_fast.demo import DemoConfig
    flags = config_flags(DemoConfig, skip=("extra",))

    def demo(**values):
        """Show SPOT learning on a CPU in minutes: one table of FG-ARI, mBO^i, mBO^c, mIoU against trivial baselines."""
        from spot_fast.demo import run_demo
        from spot_fast.errors import UserError
        cfg = DemoConfig(**values_of(flags, values))
        try:
            run_demo(cfg, say=typer.echo)
        except OSError as e:        # a DemoError is a UserError: the root command group reports it
            raise UserError(f"cannot write under {cfg.out} ({e.filename or cfg.out}): {e.strerror or e}; what is "
                            f"finished there is kept: fix it (space, permissions) or pass another --out, "
                            f"and rerun") from None
    return command(demo, flags)
