"""spot-fast: SPOT (CVPR 2024) trained from cached frozen ViT features.

The main names are available from the package (imported on first use, so the CLI starts fast):
`SPOT`, `SPOTConfig`, `preset`, `load_reference`, `export_reference`, `stage2_loss`,
`open_cache`, `FrozenEncoder`.
"""
__version__ = "0.1.0"

_LAZY = {
    "SPOT": "spot_fast.model", "SPOTOutput": "spot_fast.model",
    "SPOTConfig": "spot_fast.config", "preset": "spot_fast.config",
    "load_reference": "spot_fast.checkpoint", "export_reference": "spot_fast.checkpoint",
    "stage2_loss": "spot_fast.losses", "open_cache": "spot_fast.cache", "FrozenEncoder": "spot_fast.encoders",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'spot_fast' has no attribute {name!r}")
