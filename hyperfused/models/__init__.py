"""The paper's static-hypernetwork CNNs."""
from .ln_lstm import LayerNormLSTM
from .mnist import HyperMNISTNet
from .wrn import HyperWRN, PAPER_PARAMS

__all__ = ["LayerNormLSTM", "HyperMNISTNet", "HyperWRN", "PAPER_PARAMS", "count_parameters"]


def count_parameters(model) -> int:
    """Trainable parameters, each shared tensor counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
