"""Fused kernels (Triton) and, beside each, the plain PyTorch reference with the same signature."""
