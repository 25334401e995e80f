"""`spot-fast demo`: generate the synthetic dataset, cache it, train stage 1, stage 2 and DINOSAUR,
evaluate them beside two trivial baselines, and write a table, pictures and a Markdown report.

    spot-fast demo                          # runs/demo, a random-init ViT, minutes on a CPU
    spot-fast demo --weights dino_deitsmall8_pretrain.pth --encoder dino_vits8 --out runs/demo-dino
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from spot_fast.cli.errors import at_least


def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Folder for the data, cache, runs and report "
                             "(re-running reuses what is there)."),
    weights: Optional[Path] = typer.Option(None, help="Real encoder weights (.pth/.safetensors); default: a "
                                           "small random-init ViT."),
    encoder: str = typer.Option("dino_vits8", help="With --weights: which ViT they belong to."),
    num_train: int = typer.Option(1000, help="Synthetic training images."),
    num_val: int = typer.Option(200, help="Synthetic val images."),
    epochs: Optional[int] = typer.Option(None, help="Stage-1 and DINOSAUR epochs (default: the demo preset's "
                                         "50; DINOSAUR 30)."),
    stage2_epochs: Optional[int] = typer.Option(None, help="Stage-2 epochs (default: the demo preset's)."),
    seed: int = typer.Option(0, help="Seed of the data, the encoder and training."),
    device: Optional[str] = typer.Option(None, help="cpu | cuda | cuda:N (default: cuda if present)."),
    threads: Optional[int] = typer.Option(None, callback=at_least(1), help="Intra-op CPU threads (default: "
                                          "the thread policy: one for the demo's small model)."),
    progress: bool = typer.Option(True, metavar="", help="Show progress bars."),
):
    """Show SPOT learning on a CPU in minutes: one table of FG-ARI, mBO^i, mBO^c, mIoU against trivial baselines."""
    from spot_fast.demo import DemoConfig, run_demo
    from spot_fast.errors import UserError
    cfg = DemoConfig(out=str(out), weights=None if weights is None else str(weights), encoder=encoder,
                     num_train=num_train, num_val=num_val, epochs=epochs, stage2_epochs=stage2_epochs, seed=seed,
                     device=device, progress=progress)
    try:
        run_demo(cfg, say=typer.echo)
    except OSError as e:        # a DemoError is a UserError: the root command group reports it
        raise UserError(f"cannot write under {out} ({e.filename or out}): {e.strerror or e}; what is finished "
                        f"there is kept: fix it (space, permissions) or pass another --out, and rerun") from None
