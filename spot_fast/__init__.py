"""spot-fast: SPOT (CVPR 2024) trained from cached frozen ViT features."""
__version__ = "0.1.0"
