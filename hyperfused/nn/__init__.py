"""nn.Module front ends: argument checks and state handling; the math runs in hyperfused.ops."""
from .hyper_lstm import HyperLSTM, HyperLSTMCell, HyperLSTMState
from .static_hypernet import HyperConv2d, StaticHyperNetwork

__all__ = ["HyperLSTM", "HyperLSTMCell", "HyperLSTMState", "HyperConv2d", "StaticHyperNetwork"]
