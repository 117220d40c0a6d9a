"""Plain-PyTorch oracles that follow the paper line by line. Imports torch only."""
from .hyper_lstm import (GATES, LN_EPS, PARAM_NAMES, HyperLSTMParams, embeddings, hyper_cell_step,
                         hyper_lstm_sequence, hyper_lstm_step, layer_norm, project, scaling_vectors)
from .static_hypernet import generate_kernel, generate_tile

__all__ = ["GATES", "LN_EPS", "PARAM_NAMES", "HyperLSTMParams", "embeddings", "hyper_cell_step",
           "hyper_lstm_sequence", "hyper_lstm_step", "layer_norm", "project", "scaling_vectors", "generate_kernel",
           "generate_tile"]
