"""Initialisers shared by SPOT's modules (the reference's conventions, spec sections 2-3)."""
from __future__ import annotations

import torch.nn as nn


def linear(in_features: int, out_features: int, bias: bool = True, init: str = "xavier",
           gain: float = 1.0) -> nn.Linear:
    """nn.Linear with xavier-uniform (given gain) or kaiming-uniform (relu) weights, zero bias."""
    m = nn.Linear(in_features, out_features, bias=bias)
    if init == "kaiming":
        nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
    else:
        nn.init.xavier_uniform_(m.weight, gain=gain)
    if bias:
        nn.init.zeros_(m.bias)
    return m


def mlp(width: int, hidden: int, out: int | None = None) -> nn.Sequential:
    """Linear [kaiming] -> ReLU -> Linear [xavier], biases zero."""
    return nn.Sequential(linear(width, hidden, init="kaiming"), nn.ReLU(), linear(hidden, out or width))


def gru_cell(size: int) -> nn.GRUCell:
    """GRUCell with xavier-uniform input weights, orthogonal hidden weights, zero biases."""
    m = nn.GRUCell(size, size)
    nn.init.xavier_uniform_(m.weight_ih)
    nn.init.orthogonal_(m.weight_hh)
    nn.init.zeros_(m.bias_ih)
    nn.init.zeros_(m.bias_hh)
    return m
