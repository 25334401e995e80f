"""The `spot-fast` command line (typer)."""
