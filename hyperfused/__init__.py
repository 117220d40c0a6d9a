"""hyperfused: fast, faithful HyperNetworks (Ha, Dai & Le 2016) for PyTorch."""
from ._extension import HAS_EXTENSION, cpu_buffer_cache_bytes, empty_cpu_buffer_cache
from .nn import HyperConv2d, HyperLSTM, HyperLSTMCell, HyperLSTMState, StaticHyperNetwork
from . import models  # noqa: F401  (hyperfused.models.HyperMNISTNet after `import hyperfused`)
from .ops import available_backends, decompositions

__version__ = "0.1.0"
__all__ = ["HyperLSTM", "HyperLSTMCell", "HyperLSTMState", "StaticHyperNetwork", "HyperConv2d",
           "available_backends", "decompositions", "HAS_EXTENSION", "empty_cpu_buffer_cache", "cpu_buffer_cache_bytes", "__version__"]
